"""The job: a YAML file of sections, validated once, before any Ray work.

:class:`JobConfig` ties the sections together with the Ray Tune search space and the checks that
need more than one section; :func:`load_job` reads a file with ``key=value`` overrides and reports
every problem at once.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from hone import assets
from hone.config.base import (
    NAME_PATTERN,
    ConfigError,
    Problem,
    Section,
    apply_overrides_to,
    model_of,
    path_problem,
    problems_from_validation,
    read_mapping,
    set_path,
)
from hone.config.grpo import GRPO_METRICS, GRPOConfig, grpo_problems
from hone.config.preference import PREF_METRICS, PreferenceConfig
from hone.config.sections import (
    CLS_METRICS,
    LM_METRICS,
    DataConfig,
    DistributedConfig,
    MethodConfig,
    ModelConfig,
    TaskConfig,
    TrainingConfig,
    metric_mode,
)

__all__ = ["HINTS", "PBT_MUTABLE", "JobConfig", "JobConfigError", "SearchDomain", "TuneConfig", "apply_overrides", "load_job",
           "validate_job"]


class JobConfigError(ConfigError):
    """A job failed validation. ``problems`` lists every problem found, each with its path."""

    what = "the job"


# --------------------------------------------------------------------------- tune


# --------------------------------------------------------------------------- tune


class SearchDomain(Section):
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


class TuneConfig(Section):
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


class JobConfig(Section):
    """A hone job: one YAML file."""

    name: str = Field(default="job", pattern=NAME_PATTERN)
    """Job name; runs and exports are named after it. Defaults to the YAML file's stem."""
    kind: Literal["job"] = Field(default="job", exclude=True)
    """What this YAML is (``hone validate`` also tells a job by its ``data`` section)."""
    model: ModelConfig
    task: TaskConfig = TaskConfig()
    data: DataConfig
    method: MethodConfig = MethodConfig()
    distributed: DistributedConfig = DistributedConfig()
    training: TrainingConfig = TrainingConfig()
    preference: PreferenceConfig | None = None
    """Preference fine-tuning (DPO, IPO, SimPO, ORPO, KTO) on preference rows instead of supervised fine-tuning."""
    grpo: GRPOConfig | None = None
    """Online reinforcement learning (GRPO) on prompt rows, with rollouts on vLLM actors and declared rewards."""
    tune: TuneConfig | None = None
    """Search space for ``hone tune``; ignored by ``hone train``."""

    @model_validator(mode="before")
    @classmethod
    def _grpo_metric(cls, raw: Any) -> Any:
        """A GRPO job is judged by its held-out reward unless it names another metric (it has no eval_loss)."""
        if isinstance(raw, dict) and raw.get("grpo") is not None:
            raw = dict(raw)
            for section, key in (("training", "eval_metric"), ("tune", "metric")):
                if isinstance(raw.get(section), dict) and key not in raw[section]:
                    raw[section] = {**raw[section], key: "eval_reward"}
            if raw.get("training") is None:
                raw["training"] = {"eval_metric": "eval_reward"}
        return raw

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

    def summary(self) -> str:
        """One line: what this job trains, on what, where."""
        d, t = self.distributed, self.training
        zero = f"ZeRO-{d.deepspeed.stage}" if d.deepspeed else "DDP"
        length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epoch(s)"
        objective = f" {self.preference.loss}" if self.preference else " grpo" if self.grpo else ""
        return (f"job {self.name!r}: {self.task.type}{objective} on {self.model.name} ({self.method.type}), "
                f"{self.data.source} ({self.data.format}), "
                f"{d.workers_text()} worker(s) {zero} {'GPU' if d.use_gpu else 'CPU'} {self.precision}, {length}"
                + (f", tune: {len(self.tune.search_space)} searched path(s)" if self.tune else ""))


HINTS = {
    "distributed.deepspeed.stage": "ZeRO stages are 0 (off), 1 (optimizer states), 2 (+gradients), 3 (+parameters)",
    "task": "use `task: causal_lm` or `task: {type: sequence_classification, num_labels: 2}`",
    "training.precision": "fp32 on CPU; bf16 (or fp16) on GPUs",
    "data.source": "a file path/glob, a save_to_disk directory, a hub dataset id, or " + ", ".join(assets.BUILTIN_DATASETS),
}


def _cross_section_problems(sections: Mapping[str, Any]) -> list[Problem]:
    """Checks that need more than one section; each runs only if its sections validated."""
    out: list[Problem] = []
    method, dist, task, data, training, tune = (sections.get(k) for k in ("method", "distributed", "task", "data", "training", "tune"))
    pref = sections.get("preference")
    out += _preference_problems(pref, task, data, training)
    grpo = sections.get("grpo")
    out += grpo_problems(grpo, pref, task, data, sections.get("method"))
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
    if training is not None and dist is not None and training.on_nonfinite == "skip_step" and dist.deepspeed is not None \
            and dist.deepspeed.stage == 0:
        out.append(Problem("training.on_nonfinite", "skip_step needs an optimizer that can discard a step: ZeRO stage 0 applies it",
                           "use distributed.deepspeed.stage 1-3, distributed.deepspeed: null (DDP), or on_nonfinite: stop"))
    if training is not None and dist is not None and dist.elastic:
        micro = training.grad_accum * dist.max_workers
        uneven = [w for w in range(dist.min_workers, dist.max_workers + 1) if micro % w]
        if uneven:
            fits = next(a for a in range(1, 1000) if all(a * dist.max_workers % w == 0
                                                          for w in range(dist.min_workers, dist.max_workers + 1)))
            out.append(Problem("training.grad_accum", f"a step of {training.grad_accum} × {dist.max_workers} = {micro} micro-batches "
                               f"cannot be shared evenly by {', '.join(map(str, uneven))} worker(s), so the global batch would change "
                               f"when distributed.num_workers {list(dist.num_workers)} shrinks",
                               f"set training.grad_accum: {fits} (or a multiple), or narrow num_workers"))
    if method is not None and task is not None and task.type == "sequence_classification" and method.type == "prefix_tuning":
        out.append(Problem("method.type", "prefix_tuning is supported for causal_lm only here", "use lora or ia3 for classifiers"))
    allowed = (CLS_METRICS if task is not None and task.type == "sequence_classification" else PREF_METRICS if pref
               else GRPO_METRICS if grpo else LM_METRICS)
    if training is not None and task is not None and training.eval_metric not in allowed:
        out.append(Problem("training.eval_metric", f"unknown metric {training.eval_metric!r} for {task.type}",
                           f"one of {', '.join(allowed)}"))
    if tune is not None:
        if task is not None and tune.metric not in allowed:
            out.append(Problem("tune.metric", f"unknown metric {tune.metric!r} for {task.type}", f"one of {', '.join(allowed)}"))
        out += _search_path_problems(tune.search_space)
        if tune.scheduler == "pbt":
            out += _pbt_problems(tune, training)
    return out


def _preference_problems(pref: PreferenceConfig | None, task: TaskConfig | None, data: DataConfig | None,
                         training: TrainingConfig | None) -> list[Problem]:
    """A ``preference:`` section and preference data go together, on a causal LM, without packing."""
    out: list[Problem] = []
    pref_format = data is not None and data.format in ("preference", "unpaired")
    if pref is None:
        if pref_format:
            out.append(Problem("data.format", f"format {data.format} rows train a preference objective, which needs a "
                               "preference: section", "add `preference: {loss: dpo}` (or kto for unpaired rows)"))
        return out
    if task is not None and task.type != "causal_lm":
        out.append(Problem("preference", "preference objectives train a causal LM", "set task: causal_lm"))
    if data is not None:
        want = "preference" if pref.paired else "unpaired"
        if data.format != want:
            out.append(Problem("data.format", f"preference.loss {pref.loss} reads {want} rows, not format {data.format!r}",
                               f"set data.format: {want}" + (" (prompt, chosen, rejected)" if pref.paired
                                                                 else " (prompt, completion, label)")))
        if data.packing:
            out.append(Problem("data.packing", "preference pairs are compared whole: they cannot be packed", "set data.packing: false"))
        if pref.max_prompt_length is not None and pref.max_prompt_length >= data.max_length:
            out.append(Problem("preference.max_prompt_length", f"{pref.max_prompt_length} leaves no room for a response within "
                               f"data.max_length={data.max_length}", "lower it, or raise data.max_length"))
    if pref.loss == "kto" and training is not None and training.batch_size < 2:
        out.append(Problem("training.batch_size", "KTO estimates its KL term from mismatched completions of the same "
                           "micro-batch, so a micro-batch of 1 makes it equal to the implied reward", "set training.batch_size ≥ 2"))
    return out


PBT_MUTABLE = ("training.lr", "training.weight_decay")
"""Fields population-based training may change in a running trial (the rest shape the model or the data)."""


def _pbt_problems(tune: TuneConfig, training: TrainingConfig | None) -> list[Problem]:
    out = []
    for path in tune.search_space:
        if path not in PBT_MUTABLE:
            out.append(
                Problem(
                    f"tune.search_space.{path}",
                    "population-based training changes hyperparameters of running "
                    "trials from their checkpoints, and this field cannot change in flight",
                    f"search {' or '.join(PBT_MUTABLE)} with pbt, or use tune.scheduler: asha",
                )
            )
    if tune.searcher != "random":
        out.append(
            Problem(
                "tune.searcher",
                "population-based training explores by perturbing trials; it takes no searcher",
                "set tune.searcher: random (or leave it out) with pbt",
            )
        )
    population = tune.num_samples
    for d in tune.search_space.values():
        if d.kind == "grid":
            population *= len(d.grid or [])
    if population < 2:
        out.append(
            Problem(
                "tune.num_samples",
                f"population-based training needs at least 2 trials, this sweep has {population}",
                "raise tune.num_samples or list more grid values",
            )
        )
    if training is not None:
        if training.checkpoint_every is None:
            out.append(
                Problem(
                    "training.checkpoint_every",
                    "population-based training clones trials from their checkpoints, and this job checkpoints only at the end",
                    "set training.checkpoint_every (tune.perturbation_interval defaults to it)",
                )
            )
        elif tune.perturbation_interval is not None and tune.perturbation_interval % training.checkpoint_every:
            out.append(
                Problem(
                    "tune.perturbation_interval",
                    f"{tune.perturbation_interval} is not a multiple of "
                    f"training.checkpoint_every ({training.checkpoint_every}): a trial could be cloned from "
                    "a step without a checkpoint",
                    f"use a multiple of {training.checkpoint_every}",
                )
            )
    return out


def _search_path_problems(paths: Iterable[str]) -> list[Problem]:
    """Searched paths must name fields of this schema."""
    out = []
    for path in paths:
        problem = (
            ("the search space cannot search the tune section itself", "")
            if path.split(".")[0] == "tune"
            else path_problem(path, JobConfig)
        )
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
        if path_problem(path, JobConfig):
            continue
        for value in domain.candidates():
            raw = copy.deepcopy(base)
            set_path(raw, path, value, JobConfig)
            try:
                JobConfig.model_validate(raw, context={"check_paths": False})
            except ValidationError as e:
                for p in problems_from_validation(e, JobConfig, HINTS):
                    out.append(Problem(f"tune.search_space.{path}", f"value {value!r} is invalid: {p.path}: {p.message}", p.hint))
            except JobConfigError as e:
                for p in e.problems:
                    out.append(Problem(f"tune.search_space.{path}", f"value {value!r} is invalid: {p.path}: {p.message}", p.hint))
    return out


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML, typed later by the schema)."""
    out, problems = apply_overrides_to(raw, overrides, JobConfig)
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
        problems = problems_from_validation(e, JobConfig, HINTS)
    # Cross-section checks on the sections that are valid on their own.
    sections: dict[str, Any] = {}
    for name, field in JobConfig.model_fields.items():
        if name not in raw:
            if not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
            continue
        model = model_of(field.annotation)
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
    raw = read_mapping(path, JobConfigError, "job", JobConfig, overrides)
    return validate_job(raw, source=str(path), check_paths=check_paths)
