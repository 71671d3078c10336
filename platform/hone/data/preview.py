"""``hone data preview``: formatted examples with the trained-on tokens marked, and the data report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hone.config import JobConfig
from hone.data.formats import IGNORE_INDEX
from hone.data.sources import load_splits, load_tokenizer
from hone.data.tokenize import tokenize_split
from hone.errors import DataError

__all__ = ["preview"]


# --------------------------------------------------------------------------- preview


def _marked(tokenizer: Any, ids: Iterable[int], labels: Iterable[int], color: bool) -> str:
    """Decode ids with the trained-on (label != -100) spans marked."""
    on, off = ("\033[1;32m", "\033[0m") if color else ("⟦", "⟧")
    out, span, state = [], [], None
    for i, label in list(zip(ids, labels)) + [(None, None)]:
        trained = label is not None and label != IGNORE_INDEX
        if (trained != state or i is None) and span:
            text = tokenizer.decode(span, skip_special_tokens=False)
            out.append(f"{on}{text}{off}" if state else text)
            span = []
        state = trained
        if i is not None:
            span.append(i)
    return "".join(out)


def preview(job: JobConfig, n: int = 3, split: str = "train", color: bool = False) -> str:
    """Formatted examples of a split with the trained-on tokens marked, plus the data report."""
    tokenizer = load_tokenizer(job)
    raw = load_splits(job.data)
    if split not in raw:
        raise DataError(f"data: no {split!r} split in this job (splits: {', '.join(raw)})")
    ds = raw[split].select(range(min(n, len(raw[split]))))
    tokenized, report = tokenize_split(ds, job, tokenizer, split, pack=False)
    lines = [
        f"{job.name}: {job.data.source} ({job.data.format}), model {job.model.name}, max_length {job.data.max_length}",
        "trained-on tokens are " + ("shown in green" if color else "marked ⟦like this⟧"),
        "",
    ]
    for k, row in enumerate(tokenized):
        lines.append(f"── example {k + 1} ({len(row['input_ids'])} tokens) " + "─" * 30)
        if job.task.type == "sequence_classification":
            label = int(row["labels"])
            name = job.task.labels[label] if job.task.labels else str(label)
            lines.append(tokenizer.decode(row["input_ids"], skip_special_tokens=False))
            lines.append(f"→ label {label} ({name})")
        elif "rejected_ids" in row:
            lines.append("chosen:   " + _marked(tokenizer, row["input_ids"], row["labels"], color))
            lines.append("rejected: " + _marked(tokenizer, row["rejected_ids"], row["rejected_labels"], color))
        elif "desirable" in row:
            lines.append(("desirable:   " if row["desirable"] else "undesirable: ")
                         + _marked(tokenizer, row["input_ids"], row["labels"], color))
        else:
            lines.append(_marked(tokenizer, row["input_ids"], row["labels"], color))
        lines.append("")
    lines.append(report.line(f"{split} (these {len(ds)} rows)"))
    return "\n".join(lines)
