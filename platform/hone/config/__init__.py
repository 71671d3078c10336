"""The config machinery: one typed schema per kind of hone YAML, validated before any Ray work.

- :mod:`hone.config.base`: sections, problems, overrides, YAML reading (shared by every kind)
- :mod:`hone.config.sections`, :mod:`hone.config.preference` and :mod:`hone.config.job`: the job (``hone train``, ``hone tune``)
- :mod:`hone.config.serve`: the serve YAML (``hone serve``)
- :mod:`hone.config.pipeline`: the pipeline YAML (``hone pipeline``, ``hone quickstart``)
- :mod:`hone.config.compare`: the comparison YAML (``hone compare``)
- :mod:`hone.config.quantization`: the quantisation methods and gate thresholds
- :mod:`hone.config.reference`: JSON schema and the YAML reference (docs/reference.md)

:func:`load_file` reads any of them, telling the kind by its ``kind:`` key or by its keys.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from hone.config.base import ConfigError, Problem, Section, shipped_recipe
from hone.config.compare import CompareConfig, CompareConfigError, Comparison, load_compare
from hone.config.job import PBT_MUTABLE, JobConfig, JobConfigError, SearchDomain, TuneConfig, apply_overrides, load_job, validate_job
from hone.config.pipeline import Pipeline, PipelineConfig, PipelineConfigError, load_pipeline
from hone.config.preference import PREF_METRICS, PREFERENCE_LOSSES, PreferenceConfig
from hone.config.privacy import PiiConfig
from hone.config.quantization import METHODS, GateThresholds, QuantizeError
from hone.config.reference import json_schema, reference_markdown
from hone.config.sections import (
    DataColumns,
    DataConfig,
    DeepSpeedConfig,
    DistributedConfig,
    MethodConfig,
    ModelConfig,
    TaskConfig,
    TrainingConfig,
    metric_mode,
)
from hone.config.serve import ServeConfig, ServeConfigError, load_serve_config, validate_serve_config

__all__ = [
    "KINDS", "METHODS", "PBT_MUTABLE", "CompareConfig", "CompareConfigError", "Comparison", "ConfigError", "DataColumns", "DataConfig",
    "DeepSpeedConfig", "DistributedConfig", "GateThresholds",
    "JobConfig", "JobConfigError", "MethodConfig", "ModelConfig", "Pipeline", "PipelineConfig", "PipelineConfigError", "PiiConfig",
    "PREF_METRICS",
    "PREFERENCE_LOSSES", "PreferenceConfig", "Problem",
    "QuantizeError", "SearchDomain", "Section", "ServeConfig", "ServeConfigError", "TaskConfig", "TrainingConfig", "TuneConfig",
    "apply_overrides", "detect_kind", "json_schema", "load_compare", "load_file", "load_job", "load_pipeline", "load_serve_config",
    "metric_mode", "reference_markdown", "shipped_recipe", "validate_job", "validate_serve_config",
]

KINDS = ("job", "serve", "pipeline", "compare")


def detect_kind(raw: Any) -> str:
    """What a YAML mapping is: its ``kind:`` key, else a pipeline by its ``train`` stage, a serve config by its
    ``model`` string, a job otherwise (whose validation then names what is missing)."""
    if not isinstance(raw, dict):
        return "job"
    if raw.get("kind") in KINDS:
        return str(raw["kind"])
    if "kind" in raw:
        raise ConfigError([Problem("kind", f"unknown kind {raw['kind']!r}", f"one of {', '.join(KINDS)}")])
    if "train" in raw and "data" not in raw:
        return "pipeline"
    if "methods" in raw and "data" not in raw:
        return "compare"
    if isinstance(raw.get("model"), str) and "data" not in raw:
        return "serve"
    return "job"


def load_file(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> tuple[str, JobConfig | ServeConfig | Pipeline | Comparison]:
    """(kind, validated config) of any hone YAML; raises the kind's :class:`ConfigError` listing every problem."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    except yaml.YAMLError:
        raw = None  # the kind's loader reports the YAML error with its position
    try:
        kind = detect_kind(raw)
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    loader = {"job": load_job, "serve": load_serve_config, "pipeline": load_pipeline, "compare": load_compare}[kind]
    return kind, loader(path, overrides)
