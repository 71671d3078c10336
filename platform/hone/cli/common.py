"""What several of the command groups share: job arguments and threshold values."""

from __future__ import annotations

import argparse
from typing import Any

from hone.config import load_job

__all__ = ["job_args", "job_or_resume", "threshold"]


def threshold(text: str) -> float | None:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override a field, e.g. training.lr=1e-4")


def job_or_resume(args: argparse.Namespace, command: str, what: str) -> Any:
    """The validated job, or None when resuming (a resumed run/sweep keeps its own job.yaml)."""
    if args.resume and args.job:
        raise SystemExit(f"hone {command}: give a job file or --resume {what}, not both (a resumed {what.lower()} keeps its own job.yaml)")
    if not args.resume and not args.job:
        raise SystemExit(f"hone {command}: give a job file (or --resume {what})")
    return None if args.resume else load_job(args.job, args.overrides)
