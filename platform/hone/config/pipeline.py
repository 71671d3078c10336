"""The pipeline YAML: a job, optionally a second job trained from its result (align), and how each later stage behaves
(prune, quantise, serve, smoke test).

:func:`load_pipeline` validates the pipeline, the job file it names, the quantisation method on this
machine and the serve settings it derives, reporting every problem at once, before any Ray work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from hone.config.base import NAME_PATTERN, ConfigError, Problem, Section, problems_from_validation, read_mapping
from hone.config.job import JobConfig, JobConfigError, load_job
from hone.config.quantization import GateThresholds, PruneMethod, QuantMethod, check_method, default_method
from hone.config.serve import ServeConfig, ServeConfigError, validate_serve_config
from hone.errors import QuantizeError

__all__ = ["AlignStage", "Pipeline", "PipelineConfig", "PipelineConfigError", "PruneStage", "QuantizeStage", "SmokeTestStage",
           "TrainStage", "load_pipeline", "registered_name"]


class PipelineConfigError(ConfigError):
    """A pipeline YAML failed validation; ``problems`` lists every problem with its path."""

    what = "the pipeline"


class TrainStage(Section):
    """Stage 1: one training run, or a Ray Tune sweep over the job's ``tune:`` section."""

    job: str
    """The job YAML, relative to the pipeline file."""
    overrides: list[str] = Field(default_factory=list)
    """``key.path=value`` overrides applied to the job, as on the command line."""
    sweep: bool | None = None
    """Run the job's ``tune:`` section (default: when the job has one) rather than one training run."""
    model: str | None = Field(default=None, pattern=r"^models:/")
    """A registered model to take instead of training, e.g. ``models:/NAME@winner`` from ``hone compare``: the stage
    trains nothing and ``job`` only names the data the later stages evaluate on (the quality gate uses the model's own)."""


class AlignStage(Section):
    """Stage 1b: one more training run that starts from the train stage's model, typically preference tuning (DPO and
    its relatives) after supervised fine-tuning. Its job's ``model.name`` is replaced by the train stage's model; its
    result is registered under the job's name and is what the later stages quantise and serve."""

    job: str
    """The job YAML (usually with a ``preference:`` section), relative to the pipeline file."""
    overrides: list[str] = Field(default_factory=list)
    """``key.path=value`` overrides applied to the job, as on the command line."""


class PruneStage(Section):
    """Stage 1c: structured pruning of the trained model (``hone prune``), an optional recovery fine-tune, then the quality
    gate against the unpruned model with decode speed on the engine that serves it. The later stages (quantise, serve)
    take the pruned model only when it passes its gate and decodes faster; otherwise the pipeline says why and goes on
    with the unpruned one."""

    method: PruneMethod = "mlp-channels"
    """What is cut: ``mlp-channels``, the same MLP channels from every layer (Wanda-sp / FLAP importance), or ``layers``,
    whole decoder layers (ShortGPT's Block Influence)."""
    sparsity: float = Field(gt=0, lt=1)
    """The fraction removed: of each layer's MLP channels (a multiple of 32 kept), or of the layers."""
    calibration_rows: int = Field(default=64, ge=1)
    """Training rows the channel importance is scored on."""
    eval_rows: int = Field(default=64, ge=1)
    """Held-out rows the gate evaluates both models on."""
    recover_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps of a recovery fine-tune: the train job again (its method, data, learning rate) from the pruned
    model, through Ray Train; null: none."""
    recover_overrides: list[str] = Field(default_factory=list)
    """``key.path=value`` overrides of the recovery run, e.g. ``method.lora.target_modules=[...]`` to adapt the MLP too."""
    max_loss_increase: float | None = 0.05
    """Allowed relative eval-loss increase over the unpruned model; null: not checked."""
    max_accuracy_drop: float | None = 0.01
    """Allowed drop of generated-answer accuracy (a fraction); null: not checked."""
    require_speedup: bool = True
    """Take the pruned model only if it decodes faster than the unpruned one on the serving engine."""


class QuantizeStage(Section):
    """Stage 2: quantise the trained model and compare it with the original (``hone quantize``)."""

    method: QuantMethod | list[QuantMethod] | None = None
    """Quantisation method, or a list of candidates each quantised and gated: the fastest that passes its gate (and is
    worth serving, see ``require_speedup``) is served (default: int8-dynamic on CPU, int8-weight-only on GPU)."""
    calibration_rows: int = Field(default=64, ge=0)
    """Training rows ``w8a8-int8`` is calibrated on (SmoothQuant, then GPTQ); 0 rounds each weight to the nearest level."""
    eval_rows: int = Field(default=64, ge=1)
    """Validation rows the quality gate evaluates both models on."""
    max_loss_increase: float | None = 0.01
    """Allowed relative eval-loss increase (causal LM); null: not checked."""
    max_accuracy_drop: float | None = 0.01
    """Allowed accuracy drop as a fraction (classification accuracy, or generated-answer accuracy); null: not checked."""
    require_speedup: bool = True
    """Serve the quantised model only if it decodes faster than full precision, or within 5% of its speed with a smaller
    peak memory (both measured by the gate); otherwise say so and serve full precision."""


class SmokeTestStage(Section):
    """Stage 4: held-out rows sent to the endpoint through the ``openai`` client; every request must succeed."""

    split: Literal["validation", "test"] = "test"
    """Held-out split the requests come from."""
    requests: int = Field(default=100, ge=1)
    """Rows sent (the first N of the split)."""
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once."""
    max_tokens: int = Field(default=12, ge=1)
    """``max_tokens`` of each request (also what the untuned model gets)."""
    compare_untuned: bool = True
    """Also measure the untuned base model on the same rows (in this process, greedy) for comparison."""
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Fail the pipeline when the endpoint answers fewer than this fraction right."""
    constrained: bool = True
    """When the held-out answers form a small label set (2 to 20 distinct), ask for the answer as a constrained choice
    among them (``structured_outputs: {choice: [...]}``), so every answer is one of the labels."""


class PipelineConfig(Section):
    """A pipeline: train → quantise → serve → smoke test, each stage feeding the next through the registry."""

    name: str = Field(pattern=NAME_PATTERN)
    """Pipeline name (its directory under the storage path, so one folder name: letters, digits, ``_.-``; the Ray Serve
    application name by default)."""
    kind: Literal["pipeline"] = Field(default="pipeline", exclude=True)
    """What this YAML is (``hone validate`` also tells a pipeline by its ``train`` stage)."""
    train: TrainStage
    align: AlignStage | None = None
    """Omit for train → quantise → serve; give to continue training from the train stage's model first."""
    prune: PruneStage | None = None
    """Omit to serve the trained model unpruned."""
    quantize: QuantizeStage | None = None
    """Omit to serve the trained model in full precision."""
    serve: dict[str, Any] = Field(default_factory=dict)
    """Serve YAML settings (``hone serve``'s schema) except ``model`` and ``quantization``, which come from the earlier stages."""
    smoke_test: SmokeTestStage | None = Field(default_factory=SmokeTestStage)
    """Omit (null) to deploy without a smoke test."""


@dataclass
class Pipeline:
    """A validated pipeline: its config, the resolved job and the serve config it deploys."""

    config: PipelineConfig
    job: JobConfig
    serve: ServeConfig
    sweep: bool
    methods: list[str]
    """The quantisation candidates (empty: no quantize stage)."""
    source: str
    align_job: JobConfig | None = None
    recover_job: JobConfig | None = None
    """The prune stage's recovery run (its ``model.name`` replaced by the pruned model when it runs)."""

    @property
    def registered_model(self) -> str:
        """Where the train stage registers its model."""
        return registered_name(self.job, self.sweep)

    def summary(self) -> str:
        """One line: the stages this pipeline runs."""
        c = self.config
        align = f"{self.align_job.preference.loss if self.align_job.preference else 'train'} → " if self.align_job else ""
        first = f"take {c.train.model}" if c.train.model else "sweep" if self.sweep else "train"
        prune = f"prune {c.prune.sparsity:g} → " if c.prune else ""
        return (f"pipeline {c.name}: {first} → {align}{prune}{'quantise → ' if c.quantize else ''}serve"
                f"{' → smoke test' if c.smoke_test else ''} ({self.job.summary()})")

    def to_yaml(self) -> str:
        return self.config.to_yaml()


def registered_name(job: JobConfig, sweep: bool) -> str:
    return (job.tune.registered_model if sweep and job.tune else None) or job.name


def load_pipeline(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Pipeline:
    """Read and validate a pipeline YAML with every file it names; no Ray work."""
    path = Path(path)
    raw = read_mapping(path, PipelineConfigError, "pipeline", PipelineConfig, overrides)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:  # report the job's and the serve settings' problems too
        problems = problems_from_validation(e, PipelineConfig)
        train, serve = raw.get("train"), raw.get("serve")
        if isinstance(train, dict) and isinstance(train.get("job"), str):
            problems += _job_problems(path, train["job"], train.get("overrides") or [])[1]
        if isinstance(serve, dict):
            problems += [p for p in _serve_problems(str(raw.get("name")), serve, "models:/pipeline@winner", "none")[1]
                         if p not in problems]
        raise PipelineConfigError(problems, str(path)) from None

    problems: list[Problem] = []
    job, job_problems = _job_problems(path, cfg.train.job, cfg.train.overrides)
    if job is None:
        raise PipelineConfigError(job_problems + _serve_problems(cfg.name, cfg.serve, "models:/pipeline@winner", "none")[1], str(path))
    job_path = _job_path(path, cfg.train.job)
    sweep = cfg.train.model is None and (cfg.train.sweep if cfg.train.sweep is not None else job.tune is not None)
    if cfg.train.model is not None and (cfg.train.sweep or cfg.train.overrides or cfg.align is not None):
        problems.append(Problem("train.model", "a given model is not trained: it takes no sweep, overrides or align stage",
                                "drop train.sweep / train.overrides / align, or train.model to train"))
    if sweep and (job.tune is None or not job.tune.search_space):
        problems.append(Problem("train.sweep", f"the job {job_path} has no tune.search_space to sweep",
                                "add a tune: section to the job, or set train.sweep: false for one training run"))
    align_job = None
    if cfg.align is not None:
        align_job, align_problems = _job_problems(path, cfg.align.job, cfg.align.overrides, "align.job")
        problems += align_problems
        if align_job is not None and align_job.name == registered_name(job, sweep):
            problems.append(Problem("align.job", f"the align job's name {align_job.name!r} is where the train stage registers its "
                                                 "model", "give the align job another name"))
    recover_job = None
    if cfg.prune is not None:
        recover_job, prune_problems = _prune_problems(path, cfg, job)
        problems += prune_problems
    methods: list[str] = []
    if cfg.quantize is not None:
        given = cfg.quantize.method or default_method()
        methods = list(dict.fromkeys([given] if isinstance(given, str) else given))
        if not methods:
            problems.append(Problem("quantize.method", "an empty list of candidates", "name a method, or drop the quantize stage"))
        for method in methods:
            try:
                check_method(method)
            except QuantizeError as e:
                problems.append(Problem("quantize.method", str(e)))
        try:
            GateThresholds(cfg.quantize.max_loss_increase, cfg.quantize.max_accuracy_drop)
        except QuantizeError as e:
            problems.append(Problem("quantize", str(e), "give max_loss_increase or max_accuracy_drop"))
    served = f"models:/{align_job.name if align_job is not None else registered_name(job, sweep)}@winner"
    served = cfg.train.model or served
    serve_cfg, serve_problems = _serve_problems(cfg.name, cfg.serve, served, "none")
    problems += serve_problems
    for method in methods:  # each candidate must be servable with these settings
        problems += [p for p in _serve_problems(cfg.name, cfg.serve, served, method)[1] if p not in problems]
    if cfg.smoke_test is not None and cfg.serve.get("api_keys_file") and not os.environ.get("HONE_API_KEYS"):
        problems.append(Problem("smoke_test", "the endpoint will require an API key and only key hashes are configured "
                                              "(serve.api_keys_file)", "set HONE_API_KEYS to a key for the smoke test to send"))
    if cfg.smoke_test is not None and job.task.type == "causal_lm" and job.data.format == "text":
        problems.append(Problem("smoke_test", "the job's data (format text) has no prompts and answers to send",
                                "use instruction/chat data, or smoke_test: null"))
    if problems:
        raise PipelineConfigError(problems, str(path))
    assert serve_cfg is not None
    return Pipeline(cfg, job, serve_cfg, sweep, methods, str(path), align_job, recover_job)


def _prune_problems(path: Path, cfg: PipelineConfig, job: JobConfig) -> tuple[JobConfig | None, list[Problem]]:
    """The prune stage's recovery job (the train job, its overrides and the stage's, for ``recover_steps`` steps) and its
    problems."""
    assert cfg.prune is not None
    problems: list[Problem] = []
    if job.task.type != "causal_lm":
        problems.append(Problem("prune", f"the job trains a {job.task.type} model: hone prunes causal LMs (their MLP channels)",
                                "drop the prune stage"))
    try:
        GateThresholds(cfg.prune.max_loss_increase, cfg.prune.max_accuracy_drop)
    except QuantizeError as e:
        problems.append(Problem("prune", str(e), "give max_loss_increase or max_accuracy_drop"))
    if cfg.prune.recover_steps is None:
        if cfg.prune.recover_overrides:
            problems.append(Problem("prune.recover_overrides", "apply to a recovery run, and recover_steps is not set",
                                    "set prune.recover_steps, or drop the overrides"))
        return None, problems
    overrides = [*cfg.train.overrides, *cfg.prune.recover_overrides, f"training.max_steps={cfg.prune.recover_steps}"]
    recover, recover_problems = _job_problems(path, cfg.train.job, overrides, "prune.recover_overrides")
    return recover, problems + recover_problems


def _serve_problems(name: str, serve: dict[str, Any], model: str, method: str) -> tuple[ServeConfig | None, list[Problem]]:
    """The serve config a pipeline deploys (its ``serve:`` settings with the model and quantisation of the earlier
    stages), and the problems of those settings, at their ``serve.`` paths."""
    problems = [Problem(f"serve.{key}", "comes from the earlier stages (the trained model and quantize.method)", f"remove serve.{key}")
                for key in ("model", "quantization") if key in serve]
    try:
        cfg = validate_serve_config({"name": name, **{k: v for k, v in serve.items() if k not in ("model", "quantization")},
                                     "model": model, "quantization": method})
    except ServeConfigError as e:
        return None, problems + [Problem(f"serve.{p.path}" if p.path else "serve", p.message, p.hint) for p in e.problems]
    return cfg, problems


def _job_path(pipeline: Path, job: str) -> Path:
    return Path(job) if Path(job).is_absolute() else pipeline.parent / job


def _job_problems(pipeline: Path, job: str, overrides: Sequence[str], key: str = "train.job") -> tuple[JobConfig | None, list[Problem]]:
    job_path = _job_path(pipeline, job)
    try:
        return load_job(job_path, list(overrides)), []
    except JobConfigError as e:
        return None, [Problem(f"{key} → {job_path}" + (f": {p.path}" if p.path else ""), p.message, p.hint) for p in e.problems]
