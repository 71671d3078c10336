"""``hone validate``, ``schema``, ``data preview`` and ``builtins``: the YAML, the data and what ships built in, before
any Ray work."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hone import assets
from hone.cli.common import job_args
from hone.config import KINDS, json_schema, load_file, load_job

__all__ = ["add_commands"]


def _cmd_validate(args: argparse.Namespace) -> int:
    kind, cfg = load_file(args.file, args.overrides)
    if args.print:
        print(cfg.to_yaml(), end="")
    print(f"ok: {args.file} — {cfg.summary()}", file=sys.stderr if args.print else sys.stdout)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from hone.config import reference_markdown

    text = reference_markdown(args.kind).rstrip() if args.markdown else json.dumps(json_schema(args.kind), indent=2)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from hone.data import preview

    job = load_job(args.job, args.overrides)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(preview(job, n=args.n, split=args.split, color=color))
    return 0


def _cmd_builtins(args: argparse.Namespace) -> int:
    print("models:")
    for name, doc in assets.BUILTIN_MODELS.items():
        print(f"  {name:32s} {doc}")
    print("datasets:")
    for name, doc in assets.BUILTIN_DATASETS.items():
        print(f"  {name:32s} {doc}")
    return 0


def add_commands(sub: Any) -> None:
    """The subcommands for the YAML and the data, before any Ray work."""
    p = sub.add_parser("validate", help="validate a job, serve or pipeline YAML (no Ray work)")
    p.add_argument("file", help="a hone YAML: a job, a serve config or a pipeline (its kind: key, or told by its keys)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override a field, e.g. training.lr=1e-4")
    p.add_argument("--print", action="store_true", help="print the resolved YAML with all defaults")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON schema of a job, serve or pipeline YAML (for editors)")
    p.add_argument("--kind", default="job", choices=KINDS, help="which YAML (default: job)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--markdown", action="store_true", help="the YAML reference as Markdown tables instead")
    p.set_defaults(fn=_cmd_schema)

    p = sub.add_parser("data", help="inspect a job's data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("preview", help="print formatted examples with the trained-on tokens marked")
    job_args(q)
    q.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    q.add_argument("--split", default="train", choices=["train", "validation", "test"])
    q.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    q.set_defaults(fn=_cmd_data_preview)

    p = sub.add_parser("builtins", help="list the built-in offline models and datasets")
    p.set_defaults(fn=_cmd_builtins)
