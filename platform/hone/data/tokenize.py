"""Tokenising: formatted rows → ``input_ids``/``labels`` (truncated, masked, packed), the data report, batches,
and Ray Data datasets for the training workers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hone.config import DataConfig, JobConfig
from hone.data.formats import (
    BAD_LABEL,
    BAD_PAIR,
    EMPTY,
    IGNORE_INDEX,
    NO_TARGET,
    OK,
    causal_example,
    causal_texts,
    check_chat_template,
    check_columns,
    plain_template,
)
from hone.data.pairs import encode_preference, encode_prompts
from hone.data.sources import head_rows, load_splits, token_ids
from hone.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

__all__ = [
    "DataReport", "PreparedData", "SplitBuilder", "SplitReport", "check_sample", "check_split", "collate",
    "encode_rows", "prepare_data", "to_ray_datasets", "tokenize_split",
]


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
    pii_masked: dict[str, int] = field(default_factory=dict)
    """What ``data.mask_pii`` replaced, per entity (every row read, kept or dropped)."""

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
        if self.pii_masked:
            parts.append("PII masked: " + ", ".join(f"{n} {e}" for e, n in sorted(self.pii_masked.items())))
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


def _label_id(value: Any, names: list[str] | None, num_labels: int) -> int | None:
    if isinstance(value, str):
        return names.index(value) if names is not None and value in names else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or not isinstance(value, (int, bool)) or not 0 <= int(value) < num_labels:
        return None
    return int(value)


def encode_rows(rows: list[dict[str, Any]], job: JobConfig, tokenizer: Any, names: list[str] | None = None) -> pa.Table:
    """Formatted rows → a table of ``input_ids``, ``labels`` (token labels, or a class id), ``status`` (OK, EMPTY,
    NO_TARGET, BAD_LABEL, BAD_PAIR; those rows carry no ids), ``truncated`` and ``label_value`` (a bad label, shown in
    the error). Preference rows carry more columns (:func:`hone.data.pairs.encode_preference`).
    Each row is encoded on its own, so any split of the rows into batches (a Ray Data task each) gives the same result.
    With ``data.mask_pii`` the rows are masked first (nothing unmasked reaches the tokenizer) and a ``pii`` column
    counts what each row had masked (JSON)."""
    if job.data.mask_pii is None:
        return _encode_rows(rows, job, tokenizer, names)
    import pyarrow as pa

    from hone.privacy import mask_rows

    rows, counts = mask_rows(rows, job.data.mask_pii, skip=(job.data.columns.label,))
    table = _encode_rows(rows, job, tokenizer, names)
    return table.append_column("pii", pa.array([json.dumps(c) if c else None for c in counts], pa.string()))


def _encode_rows(rows: list[dict[str, Any]], job: JobConfig, tokenizer: Any, names: list[str] | None) -> pa.Table:
    if job.preference is not None:
        return encode_preference(rows, job, tokenizer)
    if job.grpo is not None:
        return encode_prompts(rows, job, tokenizer)
    cfg = job.data
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "status": [], "truncated": [], "label_value": []}

    def put(ids: list[int], labels: Any, status: int, truncated: bool = False, value: Any = None) -> None:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["truncated"].append(truncated)
        out["label_value"].append(None if value is None else repr(value))

    if job.task.type == "sequence_classification":
        c = cfg.columns
        names = job.task.labels or names
        keep = [r for r in rows if r.get(c.text) is not None and str(r[c.text]).strip()]
        full = tokenizer([str(r[c.text]) for r in keep], [str(r[c.text_pair]) for r in keep] if c.text_pair else None,
                         truncation=False)["input_ids"] if keep else []
        tokenizer.truncation_side = cfg.truncation_side
        enc = tokenizer([str(r[c.text]) for r in keep], [str(r[c.text_pair]) for r in keep] if c.text_pair else None,
                        truncation=True, max_length=cfg.max_length)["input_ids"] if keep else []
        it = iter(zip(full, enc))
        for r in rows:
            if r.get(c.text) is None or not str(r[c.text]).strip():
                put([], -1, EMPTY)
                continue
            whole, ids = next(it)
            label = _label_id(r.get(c.label), names, job.task.num_labels or 0)
            if label is None:
                put([], -1, BAD_LABEL, value=r.get(c.label))
                continue
            put(list(ids), label, OK, len(whole) > cfg.max_length)
        return _encoded_table(out, job)
    for r, example in zip(rows, _causal_examples(rows, cfg, tokenizer)):
        if example is None:
            put([], [], EMPTY)
            continue
        ids, target, truncated = _truncate(*example, cfg)
        labels = [i if (t or cfg.train_on_inputs) else IGNORE_INDEX for i, t in zip(ids, target)]
        if all(x == IGNORE_INDEX for x in labels):
            put([], [], NO_TARGET, truncated)
            continue
        put(ids, labels, OK, truncated)
    return _encoded_table(out, job)


def _causal_examples(rows: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any) -> list[tuple[list[int], list[bool]] | None]:
    """:func:`causal_example` of each row; text and Alpaca-template rows are tokenised in one batched call each for
    prompts and answers (the same ids, a fraction of the per-row cost)."""
    if not plain_template(cfg):
        return [causal_example(r, cfg, tokenizer) for r in rows]
    texts = [causal_texts(r, cfg) for r in rows]
    kept = [t for t in texts if t is not None]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = iter(token_ids([t[0] for t in kept if t[0] is not None], tokenizer, special=True))
    text_ids = iter(token_ids([t[1] for t in kept if t[0] is None], tokenizer, special=True))
    answer_ids = iter(token_ids([t[1] for t in kept if t[0] is not None], tokenizer, special=False))
    out: list[tuple[list[int], list[bool]] | None] = []
    for t in texts:
        if t is None:
            out.append(None)
        elif t[0] is None:
            ids = list(next(text_ids)) + eos
            out.append((ids, [True] * len(ids)))
        else:
            p, a = list(next(prompt_ids)), list(next(answer_ids)) + eos
            out.append((p + a, [False] * len(p) + [True] * len(a)))
    return out


def _encoded_table(columns: dict[str, list[Any]], job: JobConfig) -> pa.Table:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.table({
        "input_ids": pa.array(columns["input_ids"], ids),
        "labels": pa.array(columns["labels"], ids if job.task.type == "causal_lm" else pa.int64()),
        "status": pa.array(columns["status"], pa.int8()),
        "truncated": pa.array(columns["truncated"], pa.bool_()),
        "label_value": pa.array(columns["label_value"], pa.string()),
    })


class SplitBuilder:
    """Turns encoded batches, in order, into a split's training rows: drops what :func:`encode_rows` flagged, counts
    it in the :class:`SplitReport`, packs whole examples greedily in order when asked. Holds one packed row at most."""

    def __init__(self, job: JobConfig, split: str, pack: bool):
        self.job, self.split, self.pack = job, split, pack
        self.report = SplitReport()
        self.bad: list[tuple[int, str]] = []
        self._n_bad = {BAD_LABEL: 0, BAD_PAIR: 0}
        self._open: dict[str, list[int]] | None = None
        if pack:
            self.report.packed_rows = 0

    def add(self, table: pa.Table) -> pa.Table | None:
        """One encoded batch (in order) → the training rows it completes (None when packing has not closed a row)."""
        import pyarrow.compute as pc

        r = self.report
        status = table["status"]
        for code in (BAD_LABEL, BAD_PAIR):
            flagged = pc.filter(table, pc.equal(status, code))
            for i, value in zip(pc.indices_nonzero(pc.equal(status, code)).to_pylist(), flagged["label_value"].to_pylist()):
                if len(self.bad) < 5:
                    self.bad.append((r.rows_in + i, code, value))
            self._n_bad[code] += len(flagged)
        r.rows_in += len(table)
        r.dropped_empty += int(pc.sum(pc.equal(status, EMPTY)).as_py() or 0)
        r.dropped_no_target += int(pc.sum(pc.equal(status, NO_TARGET)).as_py() or 0)
        r.truncated += int(pc.sum(pc.and_(table["truncated"], pc.not_equal(status, EMPTY))).as_py() or 0)
        if "pii" in table.column_names:
            for found in table["pii"].drop_null().to_pylist():
                for entity, n in json.loads(found).items():
                    r.pii_masked[entity] = r.pii_masked.get(entity, 0) + n
        kept = pc.filter(table, pc.equal(status, OK))
        kept = kept.select([c for c in kept.column_names if c not in ("status", "truncated", "label_value", "pii")])
        r.rows_out += len(kept)
        for ids, labels in (("input_ids", "labels"), ("rejected_ids", "rejected_labels")):
            if ids not in kept.column_names:
                continue
            r.tokens += int(pc.sum(pc.list_value_length(kept[ids])).as_py() or 0)
            if self.job.task.type == "causal_lm":
                r.target_tokens += int(pc.sum(pc.not_equal(pc.list_flatten(kept[labels]), IGNORE_INDEX)).as_py() or 0)
            else:
                r.target_tokens += len(kept)
        if not self.pack:
            return kept
        closed = []
        for ids, labels in zip(kept["input_ids"].to_pylist(), kept["labels"].to_pylist()):
            if self._open is not None and len(self._open["input_ids"]) + len(ids) > self.job.data.max_length:
                closed.append(self._close())
            if self._open is None:
                self._open = {"input_ids": [], "labels": [], "position_ids": []}
            self._open["input_ids"] += ids
            self._open["labels"] += labels
            self._open["position_ids"] += list(range(len(ids)))
        return _packed_table(closed) if closed else None

    def check(self) -> None:
        """Raise :class:`DataError` for the bad labels or pairs seen so far (with up to five of them)."""
        task, c, n = self.job.task, self.job.data.columns, self._n_bad
        if n[BAD_PAIR]:
            shown = ", ".join(f"row {i}: {v}" for i, code, v in self.bad if code == BAD_PAIR)
            raise DataError(f"data: {n[BAD_PAIR]} {self.split} pair(s) whose {c.chosen!r} and {c.rejected!r} responses are identical "
                            f"({shown}); such a pair states no preference: remove or fix those rows")
        if n[BAD_LABEL] and self.job.preference is not None:
            shown = ", ".join(f"row {i}: {v}" for i, code, v in self.bad if code == BAD_LABEL)
            raise DataError(f"data: {n[BAD_LABEL]} {self.split} row(s) without a boolean label in column {c.label!r} ({shown}); "
                            "KTO needs true (desirable) or false (undesirable) for every completion: fix the rows or set "
                            "data.columns.label")
        if n[BAD_LABEL]:
            shown = ", ".join(f"row {i}: {v}" for i, code, v in self.bad if code == BAD_LABEL)
            allowed = f"ids 0..{(task.num_labels or 0) - 1}" + (f" or names {task.labels}" if task.labels else "")
            raise DataError(
                f"data: {n[BAD_LABEL]} {self.split} label(s) outside task.num_labels={task.num_labels} ({shown}); labels must be "
                f"{allowed}. Fix the data or set task.num_labels / task.labels."
            )

    def _close(self) -> dict[str, list[int]]:
        row, self._open = self._open, None
        self.report.packed_rows += 1
        return row

    def finish(self) -> pa.Table | None:
        """The last packed row (None without packing); raises :class:`DataError` for bad labels or an empty split."""
        cfg, r = self.job.data, self.report
        self.check()
        if r.rows_out == 0:
            raise DataError(
                f"data: the {self.split} split is empty after formatting ({r.rows_in} rows in, {r.dropped_empty} empty, "
                f"{r.dropped_no_target} with no response tokens left after truncation to data.max_length={cfg.max_length}); "
                "check data.columns and data.max_length"
            )
        return _packed_table([self._close()]) if self._open is not None else None


def _packed_table(rows: list[dict[str, list[int]]]) -> pa.Table:
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.table({k: pa.array([r[k] for r in rows], ids) for k in ("input_ids", "labels", "position_ids")})


def check_split(columns: list[str], job: JobConfig, tokenizer: Any, split: str) -> None:
    """What can be checked before tokenising: the columns the format needs, a chat template where one is needed."""
    check_columns(columns, job.data, split)
    if job.task.type != "sequence_classification":
        check_chat_template(tokenizer, job.data)


def check_sample(job: JobConfig, tokenizer: Any, rows: int = 512) -> None:
    """Encode the first ``rows`` rows of a local (or built-in) training source here: a missing column, a chat template
    the format needs, and bad rows (identical pairs, labels) are reported before any Ray work. Object-store, folder and
    hub sources are checked when Ray Data reads them."""
    head = head_rows(job.data, rows)
    if head is None:
        return
    columns, sample = head
    check_split(columns, job, tokenizer, "train")
    if job.grpo is not None:
        for i, reward in enumerate(job.grpo.rewards):
            column = reward.column or (job.data.columns.answer if reward.type == "exact_match" else None)
            if column and column not in columns:
                raise DataError(f"grpo.rewards.{i}.column: the train data has no column {column!r} for the {reward.type} reward; "
                                f"its columns are {list(columns)}. Set the reward's column (or data.columns.answer).")
    builder = SplitBuilder(job, "train", False)
    builder.add(encode_rows(sample, job, tokenizer))
    builder.check()


def tokenize_split(ds: Any, job: JobConfig, tokenizer: Any, split: str = "train", *, pack: bool | None = None,
                   masked: bool = False) -> tuple[Any, SplitReport]:
    """Format, tokenize, mask (and pack) one split held in this process (a ``datasets.Dataset``). ``masked``: the rows
    are :func:`hone.data.held_out_rows`'s, whose personal data ``data.mask_pii`` already masked (not masked twice)."""
    import datasets

    if masked and job.data.mask_pii is not None:
        job = job.model_copy(update={"data": job.data.model_copy(update={"mask_pii": None})})

    check_split(ds.column_names, job, tokenizer, split)
    feature = ds.features.get(job.data.columns.label) if job.task.type == "sequence_classification" else None
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    import pyarrow as pa

    builder = SplitBuilder(job, split, job.data.packing if pack is None else pack)
    parts = []
    for start in range(0, len(ds), 1000):
        chunk = ds.select(range(start, min(start + 1000, len(ds)))).to_list()
        parts.append(builder.add(encode_rows(chunk, job, tokenizer, names)))
    parts.append(builder.finish())
    return datasets.Dataset(pa.concat_tables([t for t in parts if t is not None])), builder.report


def prepare_data(job: JobConfig, tokenizer: Any) -> PreparedData:
    """All splits of a job, tokenized in this process, with the report. Evaluation splits are never packed.
    ``hone train`` tokenises on Ray Data instead (:func:`hone.data.prepare_cached`); this is the same result, for
    notebooks, small data and the benchmark's baseline."""
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
    """Copy splits prepared in this process (:func:`prepare_data`) into Ray Data, each row with its ``row_id`` (its
    position in the split): for your own Ray Train loops on small data. ``hone train`` does not use it: its data is
    tokenised on Ray Data and read from the cache (:func:`hone.data.prepare_cached`)."""
    import ray.data

    out = {}
    for name in ("train", "validation", "test"):
        ds = getattr(prepared, name)
        if ds is None:
            continue
        ds = ds.add_column("row_id", list(range(len(ds))))
        out[name] = ray.data.from_arrow(ds.with_format("arrow")[:])
    return out
