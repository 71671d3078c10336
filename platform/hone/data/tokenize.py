"""Tokenising: formatted rows → ``input_ids``/``labels`` (truncated, masked, packed), the data report, batches,
and Ray Data datasets for the training workers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hone.config import DataConfig, JobConfig, TaskConfig
from hone.data.formats import IGNORE_INDEX, causal_example, check_chat_template, check_columns
from hone.data.sources import DataError, load_splits

if TYPE_CHECKING:
    import ray.data

__all__ = ["DataReport", "PreparedData", "SplitReport", "collate", "prepare_data", "to_ray_datasets", "tokenize_split"]


@dataclass
class SplitReport:
    rows_in: int = 0
    dropped_empty: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    rows_out: int = 0
    packed_rows: int | None = None
    tokens: int = 0
    target_tokens: int = 0

    def line(self, name: str) -> str:
        parts = [f"{name}: {self.rows_in} rows in → {self.rows_out} examples"]
        if self.packed_rows is not None:
            parts.append(f"packed into {self.packed_rows} rows")
        parts.append(f"{self.tokens} tokens ({self.target_tokens} trained on)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped_empty:
            parts.append(f"{self.dropped_empty} empty dropped")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with nothing left to learn after truncation")
        return ", ".join(parts)


@dataclass
class DataReport:
    """How many rows each split had, and how many were truncated or dropped."""

    splits: dict[str, SplitReport] = field(default_factory=dict)

    def __str__(self) -> str:
        return "\n".join(r.line(name) for name, r in self.splits.items())


@dataclass
class PreparedData:
    """Tokenized splits (``datasets.Dataset`` with input_ids/labels[/position_ids]) and the report."""

    train: Any
    validation: Any | None
    test: Any | None
    report: DataReport
    raw: dict[str, Any]
    """The formatted-but-untokenized splits (for generation-based evaluation)."""


def _truncate(ids: list[int], target: list[bool], cfg: DataConfig) -> tuple[list[int], list[bool], bool]:
    if len(ids) <= cfg.max_length:
        return ids, target, False
    if cfg.truncation_side == "right":
        return ids[: cfg.max_length], target[: cfg.max_length], True
    return ids[-cfg.max_length :], target[-cfg.max_length :], True


def _tokenize_causal(ds: Any, cfg: DataConfig, tokenizer: Any, report: SplitReport) -> Any:
    import datasets

    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for row in ds:
        example = causal_example(row, cfg, tokenizer)
        if example is None:
            report.dropped_empty += 1
            continue
        ids, target, truncated = _truncate(*example, cfg)
        report.truncated += truncated
        labels = [i if (t or cfg.train_on_inputs) else IGNORE_INDEX for i, t in zip(ids, target)]
        if all(x == IGNORE_INDEX for x in labels):
            report.dropped_no_target += 1
            continue
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
    return datasets.Dataset.from_dict(rows, features=_causal_features())


def _causal_features() -> Any:
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32"))})


def _label_ids(ds: Any, cfg: DataConfig, task: TaskConfig, split: str) -> list[int]:
    import datasets

    column = cfg.columns.label
    feature = ds.features.get(column)
    names = task.labels or (feature.names if isinstance(feature, datasets.ClassLabel) else None)
    ids, bad = [], []
    for i, value in enumerate(ds[column]):
        if isinstance(value, str):
            if names is None or value not in names:
                bad.append((i, value))
                ids.append(-1)
                continue
            value = names.index(value)
        if value is None or not isinstance(value, (int, bool)) or not 0 <= int(value) < (task.num_labels or 0):
            bad.append((i, value))
        ids.append(int(value) if isinstance(value, (int, bool)) else -1)
    if bad:
        shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:5])
        allowed = f"ids 0..{task.num_labels - 1}" + (f" or names {names}" if names else "")
        raise DataError(
            f"data: {len(bad)} {split} label(s) outside task.num_labels={task.num_labels} ({shown}); labels must be {allowed}. "
            "Fix the data or set task.num_labels / task.labels."
        )
    return ids


def _tokenize_classification(ds: Any, cfg: DataConfig, task: TaskConfig, tokenizer: Any, report: SplitReport, split: str) -> Any:
    c = cfg.columns
    texts = ds[c.text]
    keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
    report.dropped_empty = len(texts) - len(keep)
    ds = ds.select(keep)
    labels = _label_ids(ds, cfg, task, split)
    tokenizer.truncation_side = cfg.truncation_side
    pairs = ds[c.text_pair] if c.text_pair else None
    full = tokenizer([str(t) for t in ds[c.text]], pairs, truncation=False)["input_ids"]
    report.truncated = sum(len(ids) > cfg.max_length for ids in full)
    enc = tokenizer([str(t) for t in ds[c.text]], pairs, truncation=True, max_length=cfg.max_length)
    import datasets

    return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": labels})


def _pack(ds: Any, max_length: int) -> Any:
    """Greedy in-order packing of whole examples into rows of at most ``max_length`` tokens."""
    import datasets

    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex_ids, ex_labels in zip(ds["input_ids"], ds["labels"]):
        if ids and len(ids) + len(ex_ids) > max_length:
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
            rows["position_ids"].append(positions)
            ids, labels, positions = [], [], []
        ids = ids + list(ex_ids)
        labels = labels + list(ex_labels)
        positions = positions + list(range(len(ex_ids)))
    if ids:
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
    return datasets.Dataset.from_dict(rows)


def tokenize_split(ds: Any, job: JobConfig, tokenizer: Any, split: str = "train", *, pack: bool | None = None) -> tuple[Any, SplitReport]:
    """Format, tokenize, mask (and pack) one split."""
    cfg = job.data
    check_columns(ds, cfg, split)
    report = SplitReport(rows_in=len(ds))
    if job.task.type == "sequence_classification":
        out = _tokenize_classification(ds, cfg, job.task, tokenizer, report, split)
    else:
        check_chat_template(tokenizer, cfg)
        out = _tokenize_causal(ds, cfg, tokenizer, report)
    report.rows_out = len(out)
    if report.rows_out == 0:
        raise DataError(
            f"data: the {split} split is empty after formatting ({report.rows_in} rows in, {report.dropped_empty} empty, "
            f"{report.dropped_no_target} with no response tokens left after truncation to data.max_length={cfg.max_length}); "
            "check data.columns and data.max_length"
        )
    report.tokens = sum(len(x) for x in out["input_ids"])
    if job.task.type == "causal_lm":
        report.target_tokens = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in out["labels"])
    else:
        report.target_tokens = report.rows_out
    if cfg.packing if pack is None else pack:
        out = _pack(out, cfg.max_length)
        report.packed_rows = len(out)
    return out, report


def prepare_data(job: JobConfig, tokenizer: Any) -> PreparedData:
    """All splits of a job, tokenized, with the report. Evaluation splits are never packed."""
    raw = load_splits(job.data)
    report = DataReport()
    tokenized: dict[str, Any] = {}
    for name, ds in raw.items():
        tokenized[name], report.splits[name] = tokenize_split(ds, job, tokenizer, name, pack=job.data.packing and name == "train")
    return PreparedData(tokenized["train"], tokenized.get("validation"), tokenized.get("test"), report, raw)


# --------------------------------------------------------------------------- batches and Ray Data


def collate(rows: Sequence[dict[str, Any]] | dict[str, Sequence[Any]], pad_id: int, task: str = "causal_lm") -> dict[str, Any]:
    """Pad a batch (a list of rows, or a column dict as Ray Data yields) into tensors.

    Causal-LM labels are padded with -100. Packed rows (with ``position_ids``) are padded
    by a final pseudo-example whose positions restart at 0, and get no attention mask, so
    the block-diagonal packing mask still applies.
    """
    import torch

    if isinstance(rows, dict):
        keys = list(rows)
        rows = [{k: rows[k][i] for k in keys} for i in range(len(rows[keys[0]]))]
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    packed = "position_ids" in rows[0] and rows[0]["position_ids"] is not None
    out: dict[str, Any] = {}
    if task == "causal_lm":
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    else:
        labels = torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long)
    if packed:
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    else:
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        if task == "causal_lm":
            labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        if packed:
            position_ids[i, :n] = torch.as_tensor(list(r["position_ids"]), dtype=torch.long)
            position_ids[i, n:] = torch.arange(width - n)
        else:
            attention_mask[i, :n] = 1
    out["input_ids"] = input_ids
    out["labels"] = labels
    if packed:
        out["position_ids"] = position_ids
    else:
        out["attention_mask"] = attention_mask
    return out


def to_ray_datasets(prepared: PreparedData) -> dict[str, ray.data.Dataset]:
    """Hand the tokenized splits to Ray Data (Ray Train shards ``train`` across workers).

    Each row carries ``row_id`` (its position in the prepared split) so a worker can put
    its shard back into a canonical order before the seeded per-epoch shuffle.
    """
    import ray.data

    out = {}
    for name in ("train", "validation", "test"):
        ds = getattr(prepared, name)
        if ds is None:
            continue
        ds = ds.add_column("row_id", list(range(len(ds))))
        out[name] = ray.data.from_arrow(ds.with_format("arrow")[:])
    return out
