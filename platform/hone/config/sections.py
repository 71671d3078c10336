"""The sections of a job YAML: model, task, data, method, distributed and training.

Each section is a typed model and the only place its fields are declared; docstrings under the
fields are the documentation ``hone schema`` and docs/reference.md print.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from hone import assets, storage
from hone.config.base import NAME_PATTERN, Section
from hone.config.privacy import PiiConfig

__all__ = ["CLS_METRICS", "DATA_FILE_TYPES", "LM_METRICS", "DataColumns", "DataConfig", "DeepSpeedConfig", "DistributedConfig",
           "MethodConfig", "ModelConfig", "TaskConfig", "TrainingConfig", "metric_mode"]

# File extensions that mark a data source as a local file (or glob) rather than a hub id.
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class ModelConfig(Section):
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


class TaskConfig(Section):
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


class DataColumns(Section):
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
    prompt: str = "prompt"
    """Prompt (``preference``, ``unpaired``, ``prompts``): a string, or a list of ``{role, content}`` messages."""
    chosen: str = "chosen"
    """Preferred response (``preference``): a string, an assistant message, or a list of messages."""
    rejected: str = "rejected"
    """Dispreferred response (``preference``), as ``chosen``."""
    completion: str = "completion"
    """Response (``unpaired``), judged desirable or not by the boolean ``label`` column."""
    answer: str = "answer"
    """Reference answer (``prompts``): what exact_match rewards and evaluations compare with."""


def _source_problem(source: str) -> str | None:
    """Return why ``source`` cannot be read on this machine, or None. Hub ids pass unchecked; object-store URIs are
    looked up (credentials, endpoint, bucket, the file or at least one match of a pattern)."""
    if storage.is_uri(source):
        try:
            storage.check(source)
            found = storage.glob_files(source) if glob.has_magic(source) else storage.list_files(source)
        except storage.StorageError as e:
            return str(e)
        return None if found else f"data source {source} does not exist (no object matches it)"
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


class DataConfig(Section):
    """Where the training data comes from and how it becomes tokens."""

    source: str
    """A jsonl/json/csv/parquet path or glob, a ``datasets.save_to_disk`` directory, a hub dataset id, or a built-in."""
    format: Literal["text", "alpaca", "sharegpt", "messages", "classification", "preference", "unpaired", "prompts"] = "text"
    """Row layout: ``text`` (train on all tokens), ``alpaca`` (instruction/input/output), ``sharegpt``
    (``conversations`` of from/value), ``messages`` (OpenAI-style role/content, rendered with the
    tokenizer's chat template), ``classification`` (text + label), ``preference`` (prompt/chosen/rejected pairs,
    with a ``preference:`` section), ``unpaired`` (prompt/completion/label, for ``preference.loss: kto``), ``prompts`` (for ``grpo:``).
    Preference and prompt rows given as message lists use the chat template; strings as they are, or with ``prompt_template: chat``."""
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
    through the tokenizer's chat template (best for instruct models). For string ``preference``/``unpaired``/``prompts`` rows,
    ``chat`` renders them as a user turn and an assistant turn; otherwise they are used as they are."""
    system_prompt: str | None = None
    """System message prepended to chat-formatted rows that have none."""
    mask_pii: PiiConfig | None = None
    """Mask personal data (e-mails, phones, cards, IBANs, IPs, secrets) in every row before tokenising: ``true`` or a section."""

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


class LoraSettings(Section):
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


class QLoraSettings(Section):
    """4/8-bit base-model quantisation for QLoRA (bitsandbytes, CUDA only)."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class AdaLoraSettings(Section):
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


class PrefixTuningSettings(Section):
    """Prefix tuning: trained virtual key/value prefixes (``peft.PrefixTuningConfig``)."""

    num_virtual_tokens: int = Field(default=20, ge=1)
    prefix_projection: bool = False
    """Reparameterise the prefix through an MLP."""
    encoder_hidden_size: int | None = None


class IA3Settings(Section):
    """IA3: learned rescaling vectors on attention and feed-forward activations (``peft.IA3Config``)."""

    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None


_METHOD_SECTIONS = {"lora": "lora", "qlora": "lora", "adalora": "adalora", "prefix_tuning": "prefix_tuning", "ia3": "ia3"}


class MethodConfig(Section):
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
            raise ValueError(f"method.type is {self.type!r} but settings for {', '.join(stray)} are given; "
                             "remove them or change method.type")
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


class DeepSpeedConfig(Section):
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


class DistributedConfig(Section):
    """Where training runs: Ray Train workers and the sharding strategy."""

    num_workers: int | tuple[int, int] = 1
    """Ray Train workers (one process each; one GPU each with ``use_gpu``). ``[min, max]``: elastic (Ray Train's elastic
    scaling): the run starts with as many as fit, continues on fewer when a worker or node is lost and grows back when
    resources return, with the same global batch (per-worker accumulation adapts; see ``training.grad_accum``)."""
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

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, tuple) and (len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"give a worker count or [min, max], got {list(v)}")
        if isinstance(v, tuple) and not 1 <= v[0] <= v[1]:
            raise ValueError(f"[min, max] needs 1 <= min <= max, got {list(v)}")
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"at least 1 worker, got {v}")
        return v

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple) and self.num_workers[0] != self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run can have: what its global batch and its resource request are sized by."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def workers_text(self) -> str:
        return f"{self.min_workers}-{self.max_workers} (elastic)" if self.elastic else str(self.max_workers)

    @model_validator(mode="after")
    def _gpu(self) -> DistributedConfig:
        if not self.use_gpu and self.resources_per_worker.get("GPU", 0) > 0:
            raise ValueError("resources_per_worker asks for GPUs but use_gpu is false; set distributed.use_gpu: true")
        if any(v < 0 for v in self.resources_per_worker.values()):
            raise ValueError("resources_per_worker values must be >= 0")
        if self.elastic and self.max_failures == 0:
            raise ValueError(f"elastic num_workers {list(self.num_workers)} restarts the worker group when a worker is lost, which "
                             "needs distributed.max_failures >= 1 (or -1: unlimited)")
        return self


# --------------------------------------------------------------------------- training

MIN_METRICS = ("loss", "eval_loss", "eval_perplexity")
LM_METRICS = ("loss", "eval_loss", "eval_perplexity")
CLS_METRICS = ("loss", "eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall")


def metric_mode(metric: str) -> Literal["min", "max"]:
    """Whether a lower or a higher value of ``metric`` is better."""
    return "min" if metric in MIN_METRICS else "max"


class TrainingConfig(Section):
    """Optimisation, schedule and bookkeeping."""

    lr: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps (optimizer steps): the i-th of n steps uses i/(n+1) of ``lr`` (the first step already learns)."""
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
    """Micro-batches accumulated per optimizer step by each worker (with the most workers an elastic run may have:
    with fewer, each accumulates proportionally more, so the global batch stays ``batch_size × grad_accum × max``)."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping norm; ``null``: no clipping."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A non-finite loss or gradient norm on any worker: ``stop`` the run there (nothing is exported or
    registered), or ``skip_step`` (the update is discarded, the run goes on)."""
    max_skipped_steps: int = Field(default=3, ge=1)
    """With ``skip_step``: consecutive skipped steps after which the run stops anyway."""
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
    eval_on_start: bool = False
    """Also evaluate before the first step (a new run only); reported as ``initial_eval_*`` with the first step."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Checkpoint every N steps (and at the end); ``null``: only at the end."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept: the most recent ones plus the best by ``eval_metric``."""
    eval_metric: str = "eval_loss"
    """Metric that picks the best checkpoint and drives early stopping."""
    early_stopping_patience: int | None = Field(default=None, ge=1)
    """Stop after this many evaluations without improvement of ``eval_metric``."""
    output_name: str | None = Field(default=None, pattern=NAME_PATTERN)
    """Run/export name (one folder name: letters, digits, ``_.-``); defaults to the job's ``name``."""
    storage_path: str | None = None
    """Where runs, checkpoints, exports and the tokenised-data cache go: a folder, or object storage (``s3://bucket/runs``)
    that every node reaches; default ``$HONE_HOME/runs``."""

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and storage.is_uri(v) and (info.context or {}).get("check_paths", True):
            storage.check(v)  # a StorageError is a ValueError: reported as this field's problem
        return v

    @model_validator(mode="after")
    def _warmup(self) -> TrainingConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self
