"""The job schema: one set of typed models that everything else derives from.

A job is one YAML file. The pydantic models below are the only place a field is
declared: the YAML loader, the CLI's ``key=value`` overrides, Ray Tune search
spaces (dotted paths into these models) and ``hone schema`` (the JSON schema for
editors) all read them. Validation happens once, here, before any Ray work, and
reports every problem at once with its YAML path and a hint.
"""

from __future__ import annotations

import copy
import difflib
import glob
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from hone import assets

__all__ = [
    "DataColumns",
    "DataConfig",
    "DeepSpeedConfig",
    "DistributedConfig",
    "JobConfig",
    "JobConfigError",
    "MethodConfig",
    "ModelConfig",
    "Problem",
    "SearchDomain",
    "TaskConfig",
    "TrainingConfig",
    "TuneConfig",
    "apply_overrides",
    "json_schema",
    "load_job",
    "validate_job",
]

# File extensions that mark a data source as a local file (or glob) rather than a hub id.
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class _Section(BaseModel):
    """Base of every schema section: unknown keys are errors, docstrings are field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------- model


class ModelConfig(_Section):
    """The base model to fine-tune."""

    name: str
    """A Hugging Face hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local directory, or a
    built-in asset (``builtin:tiny-llama``, ``builtin:smollm2-135m-instruct``, ``builtin:minilm``)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name`` is a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype when loading. ``auto`` follows ``training.precision`` (fp32 on CPU, bf16 on GPU)."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run. Off unless you trust the repository."""

    @field_validator("name")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        if v.startswith(assets.PREFIX):
            assets.check_builtin_model(v)
        if not v.strip():
            raise ValueError("model name is empty")
        return v


# --------------------------------------------------------------------------- task


class TaskConfig(_Section):
    """What the model learns. ``task: causal_lm`` is shorthand for ``task: {type: causal_lm}``."""

    type: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """``causal_lm``: supervised fine-tuning of a decoder; ``sequence_classification``: a classifier head."""
    num_labels: int | None = Field(default=None, ge=2)
    """Number of classes (sequence_classification). Derived from ``labels`` when those are given."""
    labels: list[str] | None = None
    """Class names in label-id order, e.g. ``[negative, positive]``; string labels in the data map onto these."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _labels(self) -> TaskConfig:
        if self.type == "sequence_classification":
            if self.labels is not None:
                if len(set(self.labels)) != len(self.labels):
                    raise ValueError(f"task.labels has duplicates: {self.labels}")
                if self.num_labels is not None and self.num_labels != len(self.labels):
                    raise ValueError(f"task.num_labels is {self.num_labels} but task.labels names {len(self.labels)} classes")
                self.num_labels = len(self.labels)
            if self.num_labels is None:
                raise ValueError(
                    "sequence_classification needs task.num_labels (or task.labels) — e.g. `num_labels: 2` for binary sentiment"
                )
        elif self.num_labels is not None or self.labels is not None:
            raise ValueError("task.num_labels/labels only apply to type: sequence_classification")
        return self


# --------------------------------------------------------------------------- data


class DataColumns(_Section):
    """Which dataset columns hold each field. Only the ones the chosen format reads matter."""

    text: str = "text"
    """Plain text (``text`` format) or the input text (``classification``)."""
    text_pair: str | None = None
    """Optional second text for pair classification."""
    label: str = "label"
    """Class label (``classification``): an integer id or a name from ``task.labels``."""
    instruction: str = "instruction"
    """Instruction (``alpaca``)."""
    input: str = "input"
    """Optional input/context (``alpaca``); a missing column means no input."""
    output: str = "output"
    """Response to learn (``alpaca``)."""
    messages: str = "messages"
    """List of ``{role, content}`` turns (``messages``)."""
    conversations: str = "conversations"
    """List of ``{from, value}`` turns (``sharegpt``)."""
    system: str | None = None
    """Optional per-row system prompt column (chat formats)."""


def _source_problem(source: str) -> str | None:
    """Return why ``source`` cannot be read on this machine, or None. Hub ids pass unchecked."""
    if source.startswith(assets.PREFIX):
        try:
            assets.check_builtin_dataset(source)
        except ValueError as e:
            return str(e)
        return None
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        return None if glob.glob(expanded) else f"no file matches the pattern {source!r} (relative to {os.getcwd()})"
    looks_local = (
        Path(expanded).suffix.lower() in DATA_FILE_TYPES
        or expanded.startswith(("/", "./", "../", "~"))
        or os.path.exists(expanded)
    )
    if looks_local and not os.path.exists(expanded):
        return f"data file {source!r} does not exist (relative to {os.getcwd()})"
    return None


class DataConfig(_Section):
    """Where the training data comes from and how it becomes tokens."""

    source: str
    """A jsonl/json/csv/parquet path or glob, a ``datasets.save_to_disk`` directory, a hub dataset id,
    or a built-in (``builtin:rotten-tomatoes``)."""
    format: Literal["text", "alpaca", "sharegpt", "messages", "classification"] = "text"
    """Row layout: ``text`` (train on all tokens), ``alpaca`` (instruction/input/output), ``sharegpt``
    (``conversations`` of from/value), ``messages`` (OpenAI-style role/content, rendered with the
    tokenizer's chat template), ``classification`` (text + label)."""
    columns: DataColumns = DataColumns()
    """Column mapping for the chosen format."""
    split: str = "train"
    """Split to train on when the source has several (hub ids, save_to_disk dirs, built-ins)."""
    validation: float | str | list[str] | None = 0.1
    """Validation data: a fraction of the training rows (seeded), or separate file(s). A source
    that already has a ``validation`` split uses it when this is a fraction. ``null``: no evaluation."""
    test: float | str | list[str] | None = None
    """Held-out test data, as for ``validation``; a source's own ``test`` split is used when present."""
    seed: int = 42
    """Seed for shuffling and the train/validation/test split."""
    max_samples: int | None = Field(default=None, ge=1)
    """Use at most this many training rows (after the seeded shuffle)."""
    max_eval_samples: int | None = Field(default=None, ge=1)
    """Use at most this many validation/test rows."""
    max_length: int = Field(default=512, ge=8)
    """Tokens per example; longer examples are truncated (and counted)."""
    truncation_side: Literal["right", "left"] = "right"
    """Which end of a too-long example is cut."""
    train_on_inputs: bool = False
    """Also compute the loss on prompt tokens. Default: loss on responses (assistant turns) only."""
    packing: bool = False
    """Pack several short examples into each ``max_length`` row (causal_lm only)."""
    prompt_template: Literal["alpaca", "chat"] = "alpaca"
    """How ``alpaca`` rows become a prompt: the Alpaca text template, or a user/assistant chat
    through the tokenizer's chat template (best for instruct models)."""
    system_prompt: str | None = None
    """System message prepended to chat-formatted rows that have none."""

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("check_paths", True):
            problem = _source_problem(v)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("validation", "test")
    @classmethod
    def _split_spec(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"a fraction must be between 0 and 1 (exclusive), got {v}")
        if isinstance(v, (str, list)) and (info.context or {}).get("check_paths", True):
            for path in [v] if isinstance(v, str) else v:
                problem = _source_problem(path)
                if problem:
                    raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        fractions = [x for x in (self.validation, self.test) if isinstance(x, float)]
        if sum(fractions) >= 0.9:
            raise ValueError(f"validation + test fractions leave almost no training data ({sum(fractions):.2f})")
        return self


# --------------------------------------------------------------------------- method


class LoraSettings(_Section):
    """LoRA (and QLoRA) adapter settings, passed to ``peft.LoraConfig``."""

    r: int = Field(default=8, ge=1)
    """Adapter rank."""
    alpha: float = Field(default=16, gt=0)
    """Scaling numerator (``lora_alpha``); the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names (or suffixes) to adapt, e.g. ``[q_proj, v_proj]``; ``all-linear``; ``null``: PEFT's
    default for the architecture."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. a classifier head)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""


class QLoraSettings(_Section):
    """4/8-bit base-model quantisation for QLoRA (bitsandbytes, CUDA only)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class AdaLoraSettings(_Section):
    """AdaLoRA: LoRA whose rank budget is reallocated during training (``peft.AdaLoraConfig``)."""

    init_r: int = Field(default=12, ge=1)
    target_r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    tinit: int = Field(default=0, ge=0)
    """Steps of warm-up before rank pruning starts."""
    tfinal: int = Field(default=0, ge=0)
    """Final steps with the rank budget fixed."""
    delta_t: int = Field(default=1, ge=1)
    """Steps between budget reallocations."""
    target_modules: list[str] | Literal["all-linear"] | None = None


class PrefixTuningSettings(_Section):
    """Prefix tuning: trained virtual key/value prefixes (``peft.PrefixTuningConfig``)."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    prefix_projection: bool = False
    """Reparameterise the prefix through an MLP."""
    encoder_hidden_size: int | None = None


class IA3Settings(_Section):
    """IA3: learned rescaling vectors on attention and feed-forward activations (``peft.IA3Config``)."""

    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None


_METHOD_SECTIONS = {"lora": "lora", "qlora": "lora", "adalora": "adalora", "prefix_tuning": "prefix_tuning", "ia3": "ia3"}


class MethodConfig(_Section):
    """How the weights are trained. ``method: lora`` is shorthand for ``method: {type: lora}``."""

    type: Literal["full", "lora", "qlora", "adalora", "prefix_tuning", "ia3"] = "lora"
    """``full``: every weight; ``lora``/``qlora``/``adalora``/``prefix_tuning``/``ia3``: a PEFT adapter."""
    lora: LoraSettings | None = None
    """Settings for ``lora`` and ``qlora``."""
    qlora: QLoraSettings | None = None
    """Quantisation of the frozen base for ``qlora`` (GPU only)."""
    adalora: AdaLoraSettings | None = None
    prefix_tuning: PrefixTuningSettings | None = None
    ia3: IA3Settings | None = None
    merge_adapter: bool = False
    """Also export the adapter merged into the base weights (a plain model directory)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _sections(self) -> MethodConfig:
        wanted = {_METHOD_SECTIONS.get(self.type)} | ({"qlora"} if self.type == "qlora" else set())
        stray = [s for s in ("lora", "qlora", "adalora", "prefix_tuning", "ia3") if getattr(self, s) is not None and s not in wanted]
        if stray:
            raise ValueError(f"method.type is {self.type!r} but settings for {', '.join(stray)} are given; remove them or change method.type")
        if self.type in ("lora", "qlora") and self.lora is None:
            self.lora = LoraSettings()
        if self.type == "qlora" and self.qlora is None:
            self.qlora = QLoraSettings()
        if self.type in ("adalora", "prefix_tuning", "ia3") and getattr(self, self.type) is None:
            setattr(self, self.type, {"adalora": AdaLoraSettings, "prefix_tuning": PrefixTuningSettings, "ia3": IA3Settings}[self.type]())
        if self.merge_adapter and self.type in ("full", "prefix_tuning"):
            raise ValueError(f"method.merge_adapter does not apply to {self.type!r} (nothing to merge)")
        return self

    @property
    def is_peft(self) -> bool:
        return self.type != "full"


# --------------------------------------------------------------------------- distributed


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO. The engine's JSON config is generated from this and the training section."""

    stage: int = Field(default=2, ge=0, le=3)
    """ZeRO stage: 0 off (plain data parallel), 1 optimizer states, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer states (and the step) on CPU (ZeRO-Offload; stages 1-3)."""
    offload_param: Literal["none", "cpu"] = "none"
    """Keep parameters on CPU between uses (ZeRO-Infinity; stage 3 only)."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with backward (DeepSpeed's default when unset)."""
    reduce_bucket_size: int | None = Field(default=None, ge=1)
    """Elements per gradient-reduction bucket."""
    extra: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged over the generated config (escape hatch)."""

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_param != "none" and self.stage != 3:
            raise ValueError(f"offload_param needs ZeRO stage 3 (parameters are only partitioned there); stage is {self.stage}")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
        return self


class DistributedConfig(_Section):
    """Where training runs: Ray Train workers and the sharding strategy."""

    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (one process each; one GPU each with ``use_gpu``)."""
    use_gpu: bool = False
    """Place each worker on a GPU (NCCL, bf16). Off: CPU workers over gloo, fp32."""
    resources_per_worker: dict[str, float] = {"CPU": 1.0}
    """Ray resources each worker reserves, e.g. ``{CPU: 4, GPU: 1}``."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the workers (``SPREAD`` puts them on different nodes)."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts from the last checkpoint after a failure (-1: unlimited)."""
    deepspeed: DeepSpeedConfig | None = DeepSpeedConfig()
    """DeepSpeed ZeRO settings; ``null`` trains with plain PyTorch DDP."""

    @model_validator(mode="after")
    def _gpu(self) -> DistributedConfig:
        if not self.use_gpu and self.resources_per_worker.get("GPU", 0) > 0:
            raise ValueError("resources_per_worker asks for GPUs but use_gpu is false; set distributed.use_gpu: true")
        if any(v < 0 for v in self.resources_per_worker.values()):
            raise ValueError("resources_per_worker values must be >= 0")
        return self


# --------------------------------------------------------------------------- training

_MIN_METRICS = ("loss", "eval_loss", "eval_perplexity")
_LM_METRICS = ("loss", "eval_loss", "eval_perplexity")
_CLS_METRICS = ("loss", "eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall")


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether a lower or a higher value of ``metric`` is better."""
    return "min" if metric in _MIN_METRICS else "max"


class TrainingConfig(_Section):
    """Optimisation, schedule and bookkeeping."""

    lr: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps (optimizer steps)."""
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Warm-up as a fraction of all steps (instead of ``warmup_steps``)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run; overrides ``epochs``."""
    batch_size: int = Field(default=8, ge=1)
    """Micro-batch per worker (``train_micro_batch_size_per_gpu``)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping norm; ``null``: no clipping."""
    seed: int = 42
    """Seed for model init (new heads/adapters), dropout and the data order."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: fp32 on CPU, bf16 on GPU. bf16/fp16 need ``distributed.use_gpu``."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    log_every: int = Field(default=10, ge=1)
    """Report training metrics every N optimizer steps."""
    eval_every: int | None = Field(default=None, ge=1)
    """Evaluate every N steps (and always at the end); ``null``: only at the end."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Checkpoint every N steps (and at the end); ``null``: only at the end."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept: the most recent ones plus the best by ``eval_metric``."""
    eval_metric: str = "eval_loss"
    """Metric that picks the best checkpoint and drives early stopping."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop after this many evaluations without improvement of ``eval_metric``."""
    output_name: str | None = None
    """Run/export name; defaults to the job's ``name``."""
    storage_path: str | None = None
    """Where runs, checkpoints and exports go (shared storage on a cluster); default ``$HONE_HOME/runs``."""

    @model_validator(mode="after")
    def _warmup(self) -> TrainingConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


# --------------------------------------------------------------------------- tune


class SearchDomain(_Section):
    """One searched parameter: exactly one of the keys."""

    choice: list[Any] | None = None
    """Sample one of these values."""
    grid: list[Any] | None = None
    """Try every value (grid search; multiplies ``num_samples``)."""
    uniform: tuple[float, float] | None = None
    """Uniform in [low, high]."""
    loguniform: tuple[float, float] | None = None
    """Log-uniform in [low, high] (both > 0)."""
    randint: tuple[int, int] | None = None
    """Integer in [low, high)."""

    @model_validator(mode="after")
    def _one(self) -> SearchDomain:
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a search domain needs exactly one of choice, grid, uniform, loguniform, randint (got {given or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} is empty: list at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs positive bounds, got {list(value)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that bound the domain: each listed value, or both ends of a range."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return list(value)


class TuneConfig(_Section):
    """Hyperparameter search with Ray Tune (``hone tune``)."""

    search_space: dict[str, SearchDomain] = {}
    """Dotted path into this schema → domain, e.g. ``training.lr: {loguniform: [1e-5, 1e-3]}``."""
    num_samples: int = Field(default=4, ge=1)
    """Trials to sample (each grid point is repeated this many times)."""
    metric: str = "eval_loss"
    """Reported metric that ranks trials."""
    mode: Literal["min", "max"] | None = None
    """``min`` or ``max``; default follows the metric (loss/perplexity: min, accuracy/F1: max)."""
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    """Trial scheduler: ASHA early stopping, FIFO (run all), population-based training."""
    searcher: Literal["random", "optuna"] = "random"
    """How points are chosen: random/grid (Ray's basic variant generator) or Optuna's TPE."""
    grace_period: int = Field(default=1, ge=1)
    """ASHA: training steps every trial runs before it can be stopped (the time attribute is ``step``)."""
    reduction_factor: float = Field(default=2.0, gt=1.0)
    """ASHA: keep 1/reduction_factor of trials at each rung."""
    perturbation_interval: int | None = Field(default=None, ge=1)
    """PBT: training steps between exploit/explore decisions; default and multiple of ``training.checkpoint_every``."""
    quantile_fraction: float = Field(default=0.25, gt=0.0, le=0.5)
    """PBT: trials in this bottom fraction clone a trial of the top fraction (its checkpoint, then perturbed hyperparameters)."""
    synch: bool = False
    """PBT: perturb all running trials together at each interval (early trials pause and wait), so short trials still meet."""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """Trials at once; default from the cluster's free resources."""
    registered_model: str | None = None
    """Model-registry name for the winner; default the job's name."""

    @model_validator(mode="after")
    def _mode(self) -> TuneConfig:
        if self.mode is None:
            self.mode = metric_mode(self.metric)
        return self


# --------------------------------------------------------------------------- job


class JobConfig(_Section):
    """A hone job: one YAML file."""

    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Job name; runs and exports are named after it. Defaults to the YAML file's stem."""
    model: ModelConfig
    task: TaskConfig = TaskConfig()
    data: DataConfig
    method: MethodConfig = MethodConfig()
    distributed: DistributedConfig = DistributedConfig()
    training: TrainingConfig = TrainingConfig()
    tune: TuneConfig | None = None
    """Search space for ``hone tune``; ignored by ``hone train``."""

    @model_validator(mode="after")
    def _cross_sections(self) -> JobConfig:
        problems = _cross_section_problems(self.__dict__)
        if not problems:
            problems = _search_space_value_problems(self)
        if problems:
            raise JobConfigError(problems)
        return self

    # Resolved views -----------------------------------------------------------
    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        if self.training.precision == "auto":
            return "bf16" if self.distributed.use_gpu else "fp32"
        return self.training.precision

    @property
    def run_name(self) -> str:
        return self.training.output_name or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One validation problem at a YAML path."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.path or '<job>'}: {self.message}" + (f"\n    hint: {self.hint}" if self.hint else "")


class JobConfigError(Exception):
    """A job failed validation. ``problems`` lists every problem found, each with its path."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._text())

    what = "the job"
    """What failed validation, as the message names it (subclasses: the serve config, the pipeline)."""

    def _text(self) -> str:
        head = f"{self.source}: " if self.source else ""
        n = len(self.problems)
        return head + f"{n} problem{'s' if n != 1 else ''} in {self.what}:\n" + "\n".join(f"  - {p}" for p in self.problems)


_HINTS = {
    "distributed.deepspeed.stage": "ZeRO stages are 0 (off), 1 (optimizer states), 2 (+gradients), 3 (+parameters)",
    "task": "use `task: causal_lm` or `task: {type: sequence_classification, num_labels: 2}`",
    "training.precision": "fp32 on CPU; bf16 (or fp16) on GPUs",
    "data.source": "a file path/glob, a save_to_disk directory, a hub dataset id, or " + ", ".join(assets.BUILTIN_DATASETS),
}


def _cross_section_problems(sections: Mapping[str, Any]) -> list[Problem]:
    """Checks that need more than one section; each runs only if its sections validated."""
    out: list[Problem] = []
    method, dist, task, data, training, tune = (sections.get(k) for k in ("method", "distributed", "task", "data", "training", "tune"))
    if method is not None and dist is not None and method.type == "qlora" and not dist.use_gpu:
        out.append(Problem("method.type", "qlora quantises the base model with bitsandbytes, which needs a CUDA GPU",
                           "set distributed.use_gpu: true on a GPU cluster, or use method.type: lora on CPU"))
    if training is not None and dist is not None and training.precision in ("bf16", "fp16") and not dist.use_gpu:
        out.append(Problem("training.precision", f"{training.precision} needs GPU workers; CPU training runs in fp32",
                           "set training.precision: auto (or fp32), or distributed.use_gpu: true"))
    if task is not None and data is not None:
        if task.type == "sequence_classification" and data.format != "classification":
            out.append(Problem("data.format", f"task sequence_classification reads text + label rows, not {data.format!r}",
                               "set data.format: classification"))
        if task.type == "causal_lm" and data.format == "classification":
            out.append(Problem("data.format", "the classification format needs task.type: sequence_classification",
                               "for a causal LM, use an instruction view of the data (e.g. format: alpaca)"))
        if data.packing and task.type != "causal_lm":
            out.append(Problem("data.packing", "packing only applies to causal_lm"))
    if method is not None and dist is not None and method.type == "adalora" and dist.deepspeed is not None:
        out.append(Problem("method.type", "AdaLoRA reallocates ranks from gradients between the optimizer step and zero_grad, "
                           "which DeepSpeed's step() fuses", "set distributed.deepspeed: null (plain DDP) for adalora"))
    if method is not None and task is not None and task.type == "sequence_classification" and method.type == "prefix_tuning":
        out.append(Problem("method.type", "prefix_tuning is supported for causal_lm only here", "use lora or ia3 for classifiers"))
    allowed = _CLS_METRICS if task is not None and task.type == "sequence_classification" else _LM_METRICS
    if training is not None and task is not None and training.eval_metric not in allowed:
        out.append(Problem("training.eval_metric", f"unknown metric {training.eval_metric!r} for {task.type}", f"one of {', '.join(allowed)}"))
    if tune is not None:
        if task is not None and tune.metric not in allowed:
            out.append(Problem("tune.metric", f"unknown metric {tune.metric!r} for {task.type}", f"one of {', '.join(allowed)}"))
        out += _search_path_problems(tune.search_space)
        if tune.scheduler == "pbt":
            out += _pbt_problems(tune, training)
    return out


PBT_MUTABLE = ("training.lr", "training.weight_decay")
"""Fields population-based training may change in a running trial (the rest shape the model or the data)."""


def _pbt_problems(tune: TuneConfig, training: TrainingConfig | None) -> list[Problem]:
    out = []
    for path in tune.search_space:
        if path not in PBT_MUTABLE:
            out.append(Problem(f"tune.search_space.{path}", "population-based training changes hyperparameters of running "
                               "trials from their checkpoints, and this field cannot change in flight",
                               f"search {' or '.join(PBT_MUTABLE)} with pbt, or use tune.scheduler: asha"))
    if tune.searcher != "random":
        out.append(Problem("tune.searcher", "population-based training explores by perturbing trials; it takes no searcher",
                           "set tune.searcher: random (or leave it out) with pbt"))
    population = tune.num_samples
    for d in tune.search_space.values():
        if d.kind == "grid":
            population *= len(d.grid or [])
    if population < 2:
        out.append(Problem("tune.num_samples", f"population-based training needs at least 2 trials, this sweep has {population}",
                           "raise tune.num_samples or list more grid values"))
    if training is not None:
        if training.checkpoint_every is None:
            out.append(Problem("training.checkpoint_every", "population-based training clones trials from their "
                               "checkpoints, and this job checkpoints only at the end",
                               "set training.checkpoint_every (tune.perturbation_interval defaults to it)"))
        elif tune.perturbation_interval is not None and tune.perturbation_interval % training.checkpoint_every:
            out.append(Problem("tune.perturbation_interval", f"{tune.perturbation_interval} is not a multiple of "
                               f"training.checkpoint_every ({training.checkpoint_every}): a trial could be cloned from "
                               "a step without a checkpoint", f"use a multiple of {training.checkpoint_every}"))
    return out


def _search_path_problems(paths: Iterable[str]) -> list[Problem]:
    """Searched paths must name fields of this schema."""
    out = []
    for path in paths:
        problem = ("the search space cannot search the tune section itself", "") if path.split(".")[0] == "tune" else _path_problem(path)
        if problem:
            out.append(Problem(f"tune.search_space.{path}", problem[0], problem[1]))
    return out


def _search_space_value_problems(job: JobConfig, space: Mapping[str, SearchDomain] | None = None) -> list[Problem]:
    """Validate the job with every searched value (each choice, both ends of each range)."""
    space = space if space is not None else (job.tune.search_space if job.tune else {})
    if not space:
        return []
    base = job.to_dict()
    base["tune"] = None
    out: list[Problem] = []
    for path, domain in space.items():
        if _path_problem(path):
            continue
        for value in domain.candidates():
            raw = copy.deepcopy(base)
            _set_path(raw, path, value)
            try:
                JobConfig.model_validate(raw, context={"check_paths": False})
            except ValidationError as e:
                for p in _problems_from_validation(e, raw):
                    out.append(Problem(f"tune.search_space.{path}", f"value {value!r} is invalid: {p.path}: {p.message}", p.hint))
            except JobConfigError as e:
                for p in e.problems:
                    out.append(Problem(f"tune.search_space.{path}", f"value {value!r} is invalid: {p.path}: {p.message}", p.hint))
    return out


# --------------------------------------------------------------------------- schema walking


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types of an annotation (Optional/Union members)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _unwrap(arg)]
    return [annotation]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for a in _unwrap(annotation):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _is_dict(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict or a is dict for a in _unwrap(annotation))


def _path_problem(path: str, root: type[BaseModel] | None = None) -> tuple[str, str] | None:
    """Why a dotted path does not name a field of the schema (message, hint), or None."""
    model: type[BaseModel] | None = root or JobConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return (f"{'.'.join(parts[:i])} has no sub-fields", "")
        if part not in model.model_fields:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1)
            prefix = ".".join(parts[:i])
            return (f"unknown field {part!r}" + (f" in {prefix}" if prefix else ""), f"did you mean {'.'.join(parts[:i] + close)!r}?" if close else f"fields here: {', '.join(model.model_fields)}")
        annotation = model.model_fields[part].annotation
        if _is_dict(annotation) and i + 1 < len(parts):
            return None  # free-form mapping (e.g. resources_per_worker.CPU)
        model = _model_of(annotation)
    return None


def _problems_from_validation(err: ValidationError, raw: Mapping[str, Any], root: type[BaseModel] | None = None) -> list[Problem]:
    """Turn pydantic's errors into path + message + hint, merging union alternatives."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        path = _clean_loc(e["loc"])
        grouped.setdefault(path, []).append(e)
    out = []
    for path, errors in grouped.items():
        if len(errors) > 1 and all(e["type"] != "extra_forbidden" for e in errors):
            messages = sorted({_message(e) for e in errors})
            out.append(Problem(path, "; or ".join(messages), _HINTS.get(path, "")))
            continue
        for e in errors:
            hint = _HINTS.get(path, "")
            if e["type"] == "extra_forbidden":
                parent, _, key = path.rpartition(".")
                fields = _fields_at(parent, root)
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean {close[0]!r}?" if close else (f"known keys: {', '.join(fields)}" if fields else "")
                out.append(Problem(path, "unknown key", hint))
            elif e["type"] == "missing":
                out.append(Problem(path, "required key is missing", hint))
            else:
                out.append(Problem(path, _message(e), hint))
    return out


def _message(e: Mapping[str, Any]) -> str:
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] not in ("value_error", "assertion_error", "missing", "extra_forbidden") and "input" in e:
        shown = repr(e["input"])
        if len(shown) < 60:
            msg += f" (got {shown})"
    return msg


_TYPE_TAG = re.compile(r"^(float|int|str|bool|list|dict|tuple|none|nullable)$|\[")


def _dict_value_model(annotation: Any) -> type[BaseModel] | None:
    for a in _unwrap(annotation):
        if typing.get_origin(a) is dict:
            return _model_of(typing.get_args(a)[1])
    return None


def _clean_loc(loc: Sequence[Any]) -> str:
    """Drop pydantic's union/validator tags from an error location, keeping field names and keys."""
    parts: list[str] = []
    model: type[BaseModel] | None = JobConfig
    mode = "model"  # "model": walking fields; "free": inside a free mapping; "key": next item is a mapping key
    for item in loc:
        s = str(item)
        if mode == "free" or isinstance(item, int):
            parts.append(s)
        elif mode == "key":  # e.g. the dotted path under tune.search_space
            parts.append(s)
            mode = "model"
        elif model is not None and s in model.model_fields:
            parts.append(s)
            annotation = model.model_fields[s].annotation
            if _is_dict(annotation):
                model = _dict_value_model(annotation)
                mode = "key" if model is not None else "free"
            else:
                model = _model_of(annotation)
        elif not _TYPE_TAG.search(s):
            parts.append(s)  # an unknown key (extra_forbidden)
            model = None
    return ".".join(parts)


def _fields_at(path: str, root: type[BaseModel] | None = None) -> list[str]:
    model: type[BaseModel] | None = root or JobConfig
    for part in [p for p in path.split(".") if p]:
        if model is None or part not in model.model_fields:
            return []
        model = _model_of(model.model_fields[part].annotation)
    return list(model.model_fields) if model else []


# --------------------------------------------------------------------------- loading


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str):  # shorthand such as `method: lora`
            child = {"type": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise JobConfigError([Problem(dotted, f"{part!r} holds a value, not a section", "")])
        node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str], root: type[BaseModel] | None = None) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """``key.path=value`` items → (key, YAML-parsed value) pairs, and a problem per malformed or unknown key."""
    pairs: list[tuple[str, Any]] = []
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(item, "an override must look like key.path=value",
                                    "e.g. training.lr=1e-4" if root is None else "e.g. port=8001"))
            continue
        key = key.strip()
        problem = _path_problem(key, root) if not key.startswith("tune.search_space.") else None
        if problem:
            problems.append(Problem(key, problem[0] + " (from the command line)", problem[1]))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs, problems


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML, typed later by the schema)."""
    out = copy.deepcopy(dict(raw))
    pairs, problems = parse_overrides(overrides)
    for key, value in pairs:
        if key.startswith("tune.search_space."):  # the searched field's path is one key: keep its dots
            if not isinstance(out.get("tune"), dict):
                out["tune"] = {}
            if not isinstance(out["tune"].get("search_space"), dict):
                out["tune"]["search_space"] = {}
            out["tune"]["search_space"][key.removeprefix("tune.search_space.")] = value
            continue
        _set_path(out, key, value)
    if problems:
        raise JobConfigError(problems)
    return out


def validate_job(raw: Mapping[str, Any], *, source: str | None = None, check_paths: bool = True) -> JobConfig:
    """Validate a job mapping, raising :class:`JobConfigError` listing every problem."""
    if not isinstance(raw, Mapping):
        raise JobConfigError([Problem("", f"a job must be a mapping of sections, got {type(raw).__name__}")], source)
    context = {"check_paths": check_paths}
    try:
        return JobConfig.model_validate(dict(raw), context=context)
    except JobConfigError as e:
        e.source = source
        raise JobConfigError(e.problems, source) from None
    except ValidationError as e:
        problems = _problems_from_validation(e, raw)
    # Cross-section checks on the sections that are valid on their own.
    sections: dict[str, Any] = {}
    for name, field in JobConfig.model_fields.items():
        if name not in raw:
            if not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
            continue
        model = _model_of(field.annotation)
        if model is None or raw[name] is None:
            continue
        try:
            sections[name] = model.model_validate(raw[name], context=context)
        except (ValidationError, JobConfigError):
            pass
    extra = _cross_section_problems(sections)
    if "tune" not in sections and isinstance(raw.get("tune"), Mapping) and isinstance(raw["tune"].get("search_space"), Mapping):
        space = raw["tune"]["search_space"]
        extra += _search_path_problems(space)
        extra += _valid_domain_value_problems(raw, space, context)
    seen = {(p.path, p.message) for p in problems}
    problems += [p for p in extra if (p.path, p.message) not in seen]
    raise JobConfigError(problems, source) from None


def _valid_domain_value_problems(raw: Mapping[str, Any], space: Mapping[str, Any], context: dict[str, Any]) -> list[Problem]:
    """When only the tune section is broken, still check the values of its well-formed domains."""
    try:
        job = JobConfig.model_validate({**raw, "tune": None}, context=context)
    except (ValidationError, JobConfigError):
        return []
    domains = {}
    for path, value in space.items():
        try:
            domains[path] = SearchDomain.model_validate(value)
        except ValidationError:
            pass
    return _search_space_value_problems(job, domains)


def load_job(path: str | os.PathLike[str], overrides: Sequence[str] = (), *, check_paths: bool = True) -> JobConfig:
    """Read a job YAML, apply ``key=value`` overrides, validate. The job's name defaults to the file stem."""
    path = Path(path)
    if not path.is_file():
        raise JobConfigError([Problem("", f"job file {str(path)!r} does not exist")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise JobConfigError([Problem("", f"not valid YAML: {e}")], str(path)) from None
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
    try:
        raw = apply_overrides(raw, overrides) if isinstance(raw, dict) else raw
    except JobConfigError as e:
        raise JobConfigError(e.problems, str(path)) from None
    return validate_job(raw, source=str(path), check_paths=check_paths)


def json_schema() -> dict[str, Any]:
    """The job's JSON schema (for editors: yaml-language-server, VS Code)."""
    schema = JobConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hone job"
    return schema


def _type_name(annotation: Any) -> str:
    members = _unwrap(annotation)
    names = []
    for a in members:
        if a is type(None):
            names.append("null")
        elif typing.get_origin(a) is Literal:
            names.append(" \\| ".join(repr(x).replace("'", "") for x in typing.get_args(a)))
        elif isinstance(a, type) and issubclass(a, BaseModel):
            names.append("section")
        elif typing.get_origin(a) in (list, tuple, dict):
            names.append(typing.get_origin(a).__name__)
        else:
            names.append(getattr(a, "__name__", str(a)))
    return " \\| ".join(names)


def reference_markdown() -> str:
    """The job YAML reference as Markdown tables, one per section, generated from the schema."""
    sections: list[tuple[str, type[BaseModel]]] = [("(top level)", JobConfig)]
    seen: set[type[BaseModel]] = {JobConfig}
    i = 0
    while i < len(sections):
        prefix, model = sections[i]
        for name, field in model.model_fields.items():
            sub = _model_of(field.annotation) or _dict_value_model(field.annotation)
            if sub is not None and sub not in seen:
                seen.add(sub)
                path = name if prefix == "(top level)" else f"{prefix}.{name}"
                sections.append((path + (".<path>" if _is_dict(field.annotation) else ""), sub))
        i += 1
    out = []
    for prefix, model in sections:
        out.append(f"#### `{prefix}`" + (f" — {model.__doc__.strip().splitlines()[0]}" if model.__doc__ else ""))
        out.append("")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else field.get_default(call_default_factory=True)
            if default == "required" or isinstance(default, BaseModel):
                default_text = "required" if default == "required" else "see below"
            else:
                default_text = f"`{json.dumps(default)}`"
            doc = " ".join((field.description or "").split()).replace("|", "\\|") or f"see `{name}` below"
            out.append(f"| `{name}` | {_type_name(field.annotation)} | {default_text} | {doc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"

