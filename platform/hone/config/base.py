"""The validation machinery every hone YAML shares (jobs, serve configs, pipelines).

A schema is a tree of :class:`Section` models. Loading a YAML file, applying ``key.path=value``
overrides and turning pydantic's errors into :class:`Problem` lines (path, message, hint, with
did-you-mean suggestions) work the same for every kind of file, so every command reports every
problem at once in the same format.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "NAME_PATTERN", "ConfigError", "Problem", "Section", "apply_overrides_to", "dict_value_model", "fields_at",
    "is_dict", "model_of", "parse_overrides", "path_problem", "problems_from_validation", "read_mapping", "set_path",
    "shipped_recipe", "unwrap_annotation",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""What a name that becomes a folder may look like (a job, a run's output, a pipeline): one path segment, no ``/``,
no leading dot (so never ``..``)."""


class Section(BaseModel):
    """Base of every schema section: unknown keys are errors, docstrings are field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

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
        return f"{self.path or '<top level>'}: {self.message}" + (f"\n    hint: {self.hint}" if self.hint else "")


class ConfigError(Exception):
    """A YAML (job, serve config, pipeline) failed validation. ``problems`` lists every problem found, each with its path."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self._text())

    what = "the config"
    """What failed validation, as the message names it (subclasses: the job, the serve config, the pipeline)."""

    def _text(self) -> str:
        head = f"{self.source}: " if self.source else ""
        n = len(self.problems)
        return head + f"{n} problem{'s' if n != 1 else ''} in {self.what}:\n" + "\n".join(f"  - {p}" for p in self.problems)


# --------------------------------------------------------------------------- schema walking


def unwrap_annotation(annotation: Any) -> list[Any]:
    """The concrete types of an annotation (Optional/Union members)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in unwrap_annotation(arg)]
    return [annotation]


def model_of(annotation: Any) -> type[BaseModel] | None:
    for a in unwrap_annotation(annotation):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def is_dict(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict or a is dict for a in unwrap_annotation(annotation))


def path_problem(path: str, root: type[BaseModel]) -> tuple[str, str] | None:
    """Why a dotted path does not name a field of the schema (message, hint), or None."""
    model: type[BaseModel] | None = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return (f"{'.'.join(parts[:i])} has no sub-fields", "")
        if part not in model.model_fields:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1)
            prefix = ".".join(parts[:i])
            return (
                f"unknown field {part!r}" + (f" in {prefix}" if prefix else ""),
                f"did you mean {'.'.join(parts[:i] + close)!r}?" if close else f"fields here: {', '.join(model.model_fields)}",
            )
        annotation = model.model_fields[part].annotation
        if is_dict(annotation) and i + 1 < len(parts):
            return None  # free-form mapping (e.g. resources_per_worker.CPU)
        model = model_of(annotation)
    return None


def problems_from_validation(err: ValidationError, root: type[BaseModel], hints: Mapping[str, str] | None = None) -> list[Problem]:
    """Turn pydantic's errors into path + message + hint, merging union alternatives."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        path = _clean_loc(e["loc"], root)
        grouped.setdefault(path, []).append(e)
    out = []
    for path, errors in grouped.items():
        if len(errors) > 1 and all(e["type"] != "extra_forbidden" for e in errors):
            messages = sorted({_message(e) for e in errors})
            out.append(Problem(path, "; or ".join(messages), (hints or {}).get(path, "")))
            continue
        for e in errors:
            hint = (hints or {}).get(path, "")
            if e["type"] == "extra_forbidden":
                parent, _, key = path.rpartition(".")
                fields = fields_at(parent, root)
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


def dict_value_model(annotation: Any) -> type[BaseModel] | None:
    for a in unwrap_annotation(annotation):
        if typing.get_origin(a) is dict:
            return model_of(typing.get_args(a)[1])
    return None


def _clean_loc(loc: Sequence[Any], root: type[BaseModel]) -> str:
    """Drop pydantic's union/validator tags from an error location, keeping field names and keys."""
    parts: list[str] = []
    model: type[BaseModel] | None = root
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
            if is_dict(annotation):
                model = dict_value_model(annotation)
                mode = "key" if model is not None else "free"
            else:
                model = model_of(annotation)
        elif not _TYPE_TAG.search(s):
            parts.append(s)  # an unknown key (extra_forbidden)
            model = None
    return ".".join(parts)


def fields_at(path: str, root: type[BaseModel]) -> list[str]:
    model: type[BaseModel] | None = root
    for part in [p for p in path.split(".") if p]:
        if model is None or part not in model.model_fields:
            return []
        model = model_of(model.model_fields[part].annotation)
    return list(model.model_fields) if model else []


# --------------------------------------------------------------------------- loading


def set_path(raw: dict[str, Any], dotted: str, value: Any, root: type[BaseModel] | None = None) -> None:
    """Set ``dotted`` in a raw mapping, creating sections on the way. With the schema ``root``, a mapping of
    sections keyed by dotted paths (``tune.search_space.training.lr``) takes the rest of the path as one key."""
    node = raw
    parts = dotted.split(".")
    model: type[BaseModel] | None = root
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        field = model.model_fields.get(part) if model is not None else None
        child = node.get(part)
        if isinstance(child, str):  # shorthand such as `method: lora`
            child = {"type": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError([Problem(dotted, f"{part!r} holds a value, not a section", "")])
        node[part] = child
        node = child
        if field is not None and is_dict(field.annotation) and dict_value_model(field.annotation) is not None:
            node[".".join(parts[i + 1 :])] = value
            return
        model = model_of(field.annotation) if field is not None else None
        i += 1
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str], root: type[BaseModel]) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """``key.path=value`` items → (key, YAML-parsed value) pairs, and a problem per malformed or unknown key."""
    pairs: list[tuple[str, Any]] = []
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(item, "an override must look like key.path=value", f"e.g. {_example_override(root)}"))
            continue
        key = key.strip()
        problem = path_problem(key, root)
        if problem:
            problems.append(Problem(key, problem[0] + " (from the command line)", problem[1]))
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs, problems


def _example_override(root: type[BaseModel]) -> str:
    """A sample ``key=value`` for the schema at ``root`` (for hints)."""
    fields = root.model_fields
    for path in ("training.lr", "serve.port", "port"):
        head = path.split(".")[0]
        if head in fields:
            return path + ("=1e-4" if path == "training.lr" else "=8001")
    return f"{next(iter(fields))}=..."


def apply_overrides_to(raw: Mapping[str, Any], overrides: Sequence[str], root: type[BaseModel]) -> tuple[dict[str, Any], list[Problem]]:
    """A copy of ``raw`` with ``key.path=value`` overrides applied (values parsed as YAML, typed later by the
    schema), and a problem for each malformed or unknown key."""
    out = copy.deepcopy(dict(raw))
    pairs, problems = parse_overrides(overrides, root)
    for key, value in pairs:
        try:
            set_path(out, key, value, root)
        except ConfigError as e:
            problems += e.problems
    return out, problems


def read_mapping(
    path: str | os.PathLike[str],
    error: type[ConfigError],
    what: str,
    root: type[BaseModel],
    overrides: Sequence[str] = (),
    *,
    name_from_stem: bool = True,
) -> dict[str, Any]:
    """A YAML file as a mapping with ``overrides`` applied; ``error`` lists every problem (missing file, bad YAML,
    not a mapping, malformed or unknown override keys). ``name`` defaults to the file's stem unless told not to."""
    path = Path(path)
    if not path.is_file():
        raise error([Problem("", f"{what} file {str(path)!r} does not exist")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error([Problem("", f"not valid YAML: {e}")], str(path)) from None
    if not isinstance(raw, dict):
        raise error([Problem("", f"a {what} must be a mapping of keys, got {type(raw).__name__}")], str(path))
    if name_from_stem and "name" in root.model_fields:
        raw.setdefault("name", path.stem)
    raw, problems = apply_overrides_to(raw, overrides, root)
    if problems:
        raise error(problems, str(path))
    return raw


def shipped_recipe(name: str) -> Path:
    """A recipe shipped in jobs/ (``name`` relative to it: ``pipelines/quickstart.yaml``), from ``$HONE_RECIPES``, ./jobs,
    or the jobs/ folder of the checkout hone runs from."""
    for jobs in (os.environ.get("HONE_RECIPES"), "jobs", Path(__file__).resolve().parents[3] / "jobs"):
        if jobs and (Path(jobs) / name).is_file():
            return Path(jobs) / name
    raise ConfigError([Problem("", f"the shipped recipe jobs/{name} is not here", "run hone from a hone checkout, or set "
                                                                                 "HONE_RECIPES to its jobs/ folder")])
