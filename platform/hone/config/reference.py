"""Generated documentation of the schemas: JSON schema for editors, Markdown tables for docs/reference.md."""

from __future__ import annotations

import json
import typing
from typing import Any, Literal

from pydantic import BaseModel

from hone.config.base import dict_value_model, is_dict, model_of, unwrap_annotation
from hone.config.compare import CompareConfig
from hone.config.job import JobConfig
from hone.config.pipeline import PipelineConfig
from hone.config.serve import ServeConfig

__all__ = [
    "ROOTS", "json_schema", "reference_markdown", "reference_page",
]

ROOTS: dict[str, type[BaseModel]] = {"job": JobConfig, "serve": ServeConfig, "pipeline": PipelineConfig, "compare": CompareConfig}
"""The schema at the top of each kind of hone YAML."""


def json_schema(kind: str = "job") -> dict[str, Any]:
    """The JSON schema of a job, serve, pipeline or comparison YAML (for editors: yaml-language-server, VS Code)."""
    if kind not in ROOTS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(ROOTS)}")
    schema = ROOTS[kind].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"hone {kind}"
    return schema


def _type_name(annotation: Any) -> str:
    members = unwrap_annotation(annotation)
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


def reference_markdown(kind: str = "job") -> str:
    """The YAML reference of a kind as Markdown tables, one per section, generated from the schema."""
    root = ROOTS[kind]
    sections: list[tuple[str, type[BaseModel]]] = [("(top level)", root)]
    seen: set[type[BaseModel]] = {root}
    i = 0
    while i < len(sections):
        prefix, model = sections[i]
        for name, field in model.model_fields.items():
            items = [a for a in unwrap_annotation(field.annotation) if typing.get_origin(a) is list]
            listed = model_of(typing.get_args(items[0])[0]) if items else None
            sub = model_of(field.annotation) or dict_value_model(field.annotation) or listed
            if sub is not None and sub not in seen:
                seen.add(sub)
                path = name if prefix == "(top level)" else f"{prefix}.{name}"
                sections.append((path + (".<path>" if is_dict(field.annotation) else "[]" if listed else ""), sub))
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


_PAGE_INTRO = {
    "job": "A job YAML (``hone train``, ``hone tune``, ``hone submit``; ``jobs/*.yaml``).",
    "serve": "A serve YAML (``hone serve``; ``serving/*.yaml``).",
    "pipeline": "A pipeline YAML (``hone pipeline``; ``jobs/pipelines/*.yaml``): the job it trains plus its ``serve`` "
                "section, which takes the serve YAML's keys.",
    "compare": "A comparison YAML (``hone compare``; ``jobs/pipelines/compare-*.yaml``): the task every method is scored on "
               "(a job's held-out rows) and the methods, prompting (``shots``) or training (``job``).",
}


def reference_page() -> str:
    """``docs/reference.md``: the reference of every YAML kind, generated (``make docs``; a test checks it is current)."""
    out = ["# YAML reference", "",
           "Generated from the schemas by `make docs` (`hone schema --kind KIND --markdown` prints one kind); a test fails "
           "when this page is stale. `hone schema --kind KIND` prints the JSON schema for editors.", ""]
    for kind in ("job", "serve", "pipeline", "compare"):
        out += [f"## {kind.capitalize()} YAML", "", " ".join(_PAGE_INTRO[kind].split()).replace("``", "`"), "",
                reference_markdown(kind).rstrip(), ""]
    return "\n".join(out)
