"""The comparison YAML (``hone compare``): one task (a job's data, its held-out split and a scorer) and the methods to try
on it, from prompting to RL, each scored on the same held-out rows.

:func:`load_compare` validates the comparison and every job it names, reporting every problem at once, before any Ray
work: method names, what each method starts from, and that no method trains on the rows every method is scored on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from hone.config.base import NAME_PATTERN, ConfigError, Problem, Section, problems_from_validation, read_mapping
from hone.config.job import JobConfig, JobConfigError, load_job

__all__ = ["Comparison", "CompareConfig", "CompareConfigError", "MethodSpec", "ScoringConfig", "load_compare"]


class CompareConfigError(ConfigError):
    """A comparison YAML failed validation; ``problems`` lists every problem with its path."""

    what = "the comparison"


class ScoringConfig(Section):
    """The task every method is scored on: the held-out rows of one job's data, the same rows and scorer for all."""

    job: str
    """The job YAML whose data (and its held-out ``split``) every method is scored on, relative to this file; prompting
    methods use its model."""
    overrides: list[str] = Field(default_factory=list)
    """``key.path=value`` overrides applied to that job."""
    split: Literal["validation", "test"] = "test"
    """Held-out split the rows come from (the first ``rows`` of it)."""
    rows: int = Field(default=200, ge=1)
    """How many held-out rows (the first of the split)."""
    max_tokens: int = Field(default=12, ge=1)
    """Generated tokens per answer (greedy)."""
    constrained: bool = True
    """When the held-out answers form a small label set (2 to 20 distinct), every method answers as a constrained choice
    among them (the serving engines' ``structured_outputs: {choice: [...]}``); otherwise free greedy text, its first label
    counted."""


class MethodSpec(Section):
    """One method: prompting (``shots``, no job) or a training run (``job``), optionally from an earlier method's model."""

    name: str = Field(pattern=NAME_PATTERN)
    """The method's row in the table (and its registered model: ``models:/COMPARISON-METHOD``)."""
    shots: int | None = Field(default=None, ge=0)
    """Prompting: this many in-context examples (0: zero-shot) drawn from the task job's training split with ``seed``,
    before each held-out prompt; no training."""
    seed: int = 0
    """Which training rows a few-shot prompt shows."""
    balanced: bool = True
    """When the answers form a label set: the examples' labels take turns (as many of each as the shots allow)."""
    job: str | None = None
    """Training: the job YAML, relative to this file: a causal LM job (SFT, LoRA or full, DPO-family, GRPO), or a
    ``sequence_classification`` job (e.g. a MiniLM head) on the same reviews, scored by its predicted label on the same
    held-out rows (its own view of them: each row's text must be in the task row's prompt, its label the task's answer)."""
    overrides: list[str] = Field(default_factory=list)
    """``key.path=value`` overrides applied to that job."""
    start_from: str | None = None
    """Start from an earlier method's trained model (its job's ``model.name`` replaced), e.g. DPO or GRPO from SFT."""

    @model_validator(mode="after")
    def _one_kind(self) -> MethodSpec:
        if (self.shots is None) == (self.job is None):
            raise ValueError("give shots (prompting) or job (training), not both and not neither")
        if self.shots is not None and (self.start_from or self.overrides):
            raise ValueError("a prompting method (shots) takes no start_from or overrides")
        return self

    @property
    def prompting(self) -> bool:
        return self.shots is not None


class CompareConfig(Section):
    """A comparison: methods scored side by side on one held-out set."""

    name: str = Field(pattern=NAME_PATTERN)
    """The comparison's folder under the storage path and the registered name of its trained models."""
    kind: Literal["compare"] = Field(default="compare", exclude=True)
    """What this YAML is (``hone validate`` also tells a comparison by its ``methods``)."""
    task: ScoringConfig
    """What every method is scored on."""
    methods: list[MethodSpec] = Field(min_length=1)
    """The methods, run in this order (a method's ``start_from`` names one above it)."""


@dataclass
class Comparison:
    """A validated comparison: its config, the task job, and each training method's job (``None`` for prompting)."""

    config: CompareConfig
    task: JobConfig
    jobs: dict[str, JobConfig | None]
    source: str

    def summary(self) -> str:
        shown = ", ".join(m.name for m in self.config.methods)
        return f"comparison {self.config.name}: {len(self.config.methods)} methods ({shown}) on {self.config.task.rows} " \
               f"{self.config.task.split} rows of {self.task.data.source}"

    def to_yaml(self) -> str:
        return self.config.to_yaml()


def _held_out_plan(job: JobConfig) -> tuple[object, ...]:
    """What decides a job's held-out rows: its source (built-in variants that cut only the training split count as
    one), the seeded order and the split settings. Jobs that agree train on none of each other's held-out rows."""
    d = job.data
    source = d.source.removesuffix("-balanced") if d.source.startswith("builtin:") else d.source
    return source, d.seed, d.split, d.validation, d.test


def load_compare(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Comparison:
    """Read and validate a comparison YAML with every job it names; no Ray work."""
    path = Path(path)
    raw = read_mapping(path, CompareConfigError, "comparison", CompareConfig, overrides)
    try:
        cfg = CompareConfig.model_validate(raw)
    except ValidationError as e:
        raise CompareConfigError(problems_from_validation(e, CompareConfig), str(path)) from None

    problems: list[Problem] = []

    def job(key: str, file: str, extra: Sequence[str]) -> JobConfig | None:
        where = Path(file) if Path(file).is_absolute() else path.parent / file
        try:
            return load_job(where, list(extra))
        except JobConfigError as e:
            problems.extend(Problem(f"{key} → {where}" + (f": {p.path}" if p.path else ""), p.message, p.hint) for p in e.problems)
            return None

    task = job("task.job", cfg.task.job, cfg.task.overrides)
    if task is not None and (task.task.type != "causal_lm" or task.data.format in ("text", "classification")):
        problems.append(Problem("task.job", f"the task job's data ({task.task.type}, format {task.data.format}) has no prompts and "
                                            "answers to score generated answers on", "give a causal_lm job on instruction or chat data"))
    jobs: dict[str, JobConfig | None] = {}
    for i, m in enumerate(cfg.methods):
        key = f"methods[{i}]"
        if m.name in jobs:
            problems.append(Problem(f"{key}.name", f"{m.name!r} names two methods", "give each method its own name"))
        if m.start_from is not None and not jobs.get(m.start_from):
            problems.append(Problem(f"{key}.start_from", f"{m.start_from!r} is not an earlier training method",
                                    "name a method with a job listed above this one"))
        parent = jobs.get(m.start_from) if m.start_from else None
        if parent is not None and parent.task.type != "causal_lm":
            problems.append(Problem(f"{key}.start_from", f"{m.start_from!r} trains a {parent.task.type} model, which does not "
                                                         "generate", "start from a causal LM method"))
        jobs[m.name] = None if m.job is None else job(f"{key}.job", m.job, m.overrides)
        trained = jobs[m.name]
        if trained is not None and task is not None:
            if trained.task.type == "sequence_classification" and m.start_from:
                problems.append(Problem(f"{key}.start_from", "a classifier starts from its encoder, not from another method's "
                                                             "model", "drop start_from"))
            if _held_out_plan(trained) != _held_out_plan(task):
                problems.append(Problem(f"{key}.job", f"it trains on {trained.data.source} (seed {trained.data.seed}), the task scores "
                                                      f"{task.data.source} (seed {task.data.seed}): its training rows could be "
                                                      "the held-out rows", "train every method on the task's data source and seed"))
    if problems:
        raise CompareConfigError(problems, str(path))
    assert task is not None
    return Comparison(cfg, task, jobs, str(path))
