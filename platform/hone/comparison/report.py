"""A comparison's result and what it writes: the table printed at the end, ``compare.json``, ``compare.csv`` and
``compare.png`` (held-out accuracy against train wall time, one point per method)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "CompareResult", "format_table", "write_outputs"]

COLUMNS = ("method", "status", "accuracy", "eval_loss", "train_s", "train_s_total",
           "tokens_seen", "trainable_params", "peak_memory_mb_per_worker",
           "decode_ms_per_token", "answer_ms", "size_mb", "prompt_tokens_mean", "model", "from", "error")
"""The CSV's columns (the JSON has every field, the answers shown included)."""


@dataclass
class CompareResult:
    name: str
    folder: Path
    rows_sha256: str
    """The held-out rows every method was scored on (each row carries the digest it was scored on)."""
    split: str
    n_rows: int
    scorer: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    winner: dict[str, Any] | None = None
    wall_s: float = 0.0

    def row(self, method: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["method"] == method), None)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: CompareResult) -> str:
    """The comparison as a Markdown table (what ``hone compare`` prints and the README shows)."""
    lines = [f"━━ hone compare {result.name}: {len(result.rows)} methods on {result.n_rows} held-out {result.split} rows "
             f"({result.scorer}), {result.wall_s / 60:.1f} min ━━",
             "| method | accuracy | eval loss | train wall (with its start's) | tokens seen | trainable params | peak MB/worker | "
             "decode ms/token | ms/answer | size MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | **{r['status']}**: {r.get('error', '')} | | | | | | | | |")
            continue
        shots = f" ({r['prompt_tokens_mean']:.0f}-token prompts)" if r.get("prompt_tokens_mean") else ""
        total = f" ({r['train_s_total']:.0f} s)" if r["train_s_total"] > r["train_s"] else ""
        lines.append(f"| {r['method']}{shots} | {r['accuracy']:.3f} | {_cell(r.get('eval_loss'), '.4f')} | {r['train_s']:.0f} s{total} | "
                     f"{r['tokens_seen']:,} | {r['trainable_params']:,} | {_cell(r.get('peak_memory_mb_per_worker'), '.0f')} | "
                     f"{_cell(r.get('decode_ms_per_token'), '.1f')} | {_cell(r.get('answer_ms'), '.1f')} | {r['size_mb']:.0f} |")
    if result.winner:
        w = result.winner
        lines.append(f"winner: {w['method']} (accuracy {w['accuracy']:.3f})"
                     + (f", registered {w['registered']} (@winner)" if w.get("registered") else ", prompting: nothing trained"))
    lines.append(f"wrote {result.folder}/compare.json, compare.csv, compare.png")
    return "\n".join(lines)


def write_outputs(result: CompareResult) -> None:
    folder = result.folder
    (folder / "compare.json").write_text(json.dumps({**asdict(result), "folder": str(folder)}, indent=2, default=str))
    with open(folder / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(result.rows)
    _plot(result, folder / "compare.png")


def _plot(result: CompareResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in result.rows:
        if r["status"] != "ok":
            continue
        x = r["train_s_total"] / 60
        ax.scatter([x], [r["accuracy"]], marker="*" if result.winner and r["method"] == result.winner["method"] else "o")
        ax.annotate(r["method"], (x, r["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("train wall time, a method's start included (min; prompting 0)")
    ax.set_ylabel(f"held-out accuracy ({result.n_rows} {result.split} rows)")
    ax.set_title(f"hone compare {result.name}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
