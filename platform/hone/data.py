"""The data pipeline: load → format → tokenize → mask → pack → Ray Data.

Every format becomes rows of ``input_ids`` and ``labels``:

* causal LM: ``labels`` are the token ids where the loss is computed and -100
  elsewhere (prompt tokens unless ``train_on_inputs``; everything but assistant
  turns for chat formats; padding always). Packed rows also carry ``position_ids``
  that restart at 0 for each packed example, which makes transformers build a
  block-diagonal causal mask (no attention across examples).
* sequence classification: ``labels`` is the class id.

Problems in the data (missing column, empty result, bad label, a chat format on a
tokenizer without a chat template) raise :class:`DataError` naming the config key
to change. Truncated and dropped rows are counted in a :class:`DataReport`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hone import assets
from hone.config import DataConfig, JobConfig, TaskConfig
from hone.config.sections import DATA_FILE_TYPES

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "DataError",
    "DataReport",
    "PreparedData",
    "collate",
    "load_splits",
    "load_tokenizer",
    "prepare_data",
    "preview",
    "prompt_and_answer",
    "to_ray_datasets",
]

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}


class DataError(ValueError):
    """The data does not fit the job; the message names the setting to change."""


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


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(job: JobConfig) -> Any:
    """The job's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = assets.resolve_model(job.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# --------------------------------------------------------------------------- loading


def _load_source(source: str, cfg: DataConfig) -> Any:
    """Load a source into a DatasetDict (or Dataset) without touching the network for local data."""
    import datasets

    if source.startswith(assets.PREFIX):
        return assets.load_builtin_dataset(source, cfg.format)
    expanded = os.path.expanduser(source)
    is_glob = glob.has_magic(expanded)
    if is_glob or os.path.isfile(expanded):
        files = sorted(glob.glob(expanded)) if is_glob else [expanded]
        if not files:
            raise DataError(f"data: no file matches {source!r}")
        kinds = {DATA_FILE_TYPES.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"data: cannot tell the file type of {source!r}; use .jsonl, .json, .csv, .parquet or .txt files (one kind)")
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    if os.path.isdir(expanded):
        if any((Path(expanded) / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return datasets.load_from_disk(expanded)
        return datasets.load_dataset(expanded)
    return datasets.load_dataset(source)  # a hub id (needs network unless cached)


def _pick_split(loaded: Any, split: str, source: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"data.split: {source!r} has no split {split!r}; it has {', '.join(loaded)}")
        return loaded[split]
    return loaded


def load_splits(cfg: DataConfig) -> dict[str, Any]:
    """train/validation/test ``datasets.Dataset`` objects before formatting, split and seeded."""
    import datasets

    loaded = _load_source(cfg.source, cfg)
    train = _pick_split(loaded, cfg.split, cfg.source)
    own = loaded if isinstance(loaded, datasets.DatasetDict) else {}
    train = train.shuffle(seed=cfg.seed)
    out: dict[str, Any] = {}
    for name in ("test", "validation"):
        spec = getattr(cfg, name)
        if spec is None:
            continue
        if isinstance(spec, float):
            if name in own and name != cfg.split:
                out[name] = own[name]
            else:
                n = max(1, int(round(len(train) * spec)))
                if n >= len(train):
                    raise DataError(f"data.{name}: {spec} of {len(train)} rows leaves no training data")
                out[name] = train.select(range(n))
                train = train.select(range(n, len(train)))
        else:
            parts = [_pick_split(_load_source(path, cfg), "train", path) for path in ([spec] if isinstance(spec, str) else spec)]
            out[name] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if cfg.max_eval_samples is not None:
        out = {k: v.select(range(min(cfg.max_eval_samples, len(v)))) for k, v in out.items()}
    return {"train": train, **{k: out[k] for k in ("validation", "test") if k in out}}


def held_out_rows(cfg: DataConfig, split: str, n: int) -> Any:
    """The first ``n`` rows of ``split`` before formatting: the one rule every stage that evaluates on held-out data
    follows (``hone eval``, the quality gate, the smoke test). A validation or test split the data does not declare
    is carved as 10% of the seeded training rows; ``max_eval_samples`` does not apply."""
    update: dict[str, Any] = {"max_eval_samples": None}
    if split in ("validation", "test") and getattr(cfg, split) is None:
        update[split] = 0.1
    splits = load_splits(cfg.model_copy(update=update))
    if split not in splits:
        raise DataError(f"the data has no {split!r} split (have {', '.join(splits)})")
    return splits[split].select(range(min(n, len(splits[split]))))


# --------------------------------------------------------------------------- formatting


def _required_columns(cfg: DataConfig) -> dict[str, str]:
    c = cfg.columns
    return {
        "text": {"text": c.text},
        "alpaca": {"instruction": c.instruction, "output": c.output},
        "sharegpt": {"conversations": c.conversations},
        "messages": {"messages": c.messages},
        "classification": {"text": c.text, "label": c.label, **({"text_pair": c.text_pair} if c.text_pair else {})},
    }[cfg.format]


def _check_columns(ds: Any, cfg: DataConfig, split: str) -> None:
    for key, column in _required_columns(cfg).items():
        if column not in ds.column_names:
            raise DataError(
                f"data.columns.{key}: the {split} data has no column {column!r} (format {cfg.format}); "
                f"its columns are {ds.column_names}. Set data.columns.{key} to the right column."
            )


def _check_chat_template(tokenizer: Any, cfg: DataConfig) -> None:
    chat = cfg.format in ("sharegpt", "messages") or (cfg.format == "alpaca" and cfg.prompt_template == "chat")
    if chat and not getattr(tokenizer, "chat_template", None):
        what = f"format {cfg.format}" + (" with prompt_template: chat" if cfg.format == "alpaca" else "")
        raise DataError(
            f"data.format: {what} renders conversations with the tokenizer's chat template, but this tokenizer has none; "
            "use a chat/instruct model, or format: alpaca with prompt_template: alpaca, or format: text"
        )


def _alpaca_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    c = cfg.columns
    user = str(row[c.instruction]).strip()
    extra = str(row.get(c.input) or "").strip()
    if extra:
        user += "\n\n" + extra
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(row[c.output])}]


def _row_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    c = cfg.columns
    if cfg.format == "alpaca":
        messages = _alpaca_messages(row, cfg)
    elif cfg.format == "messages":
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[c.messages]]
    else:
        messages = []
        for turn in row[c.conversations]:
            role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise DataError(f"data: sharegpt turn with unknown 'from' {turn.get('from')!r}; expected one of {sorted(_SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": str(turn.get("value", ""))})
    system = row.get(c.system) if c.system else None
    system = system or cfg.system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": str(system)}] + messages
    return messages


def prompt_and_answer(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """The generation prompt for a row (formatted exactly as in training) and the expected answer.

    For chat formats the answer is the last assistant turn and the prompt everything before it.
    """
    c = cfg.columns
    if cfg.format == "alpaca" and cfg.prompt_template == "alpaca":
        extra = str(row.get(c.input) or "").strip()
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=str(row[c.instruction]).strip(),
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, str(row[c.output])
    messages, answer = prompt_messages(row, cfg)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), answer


def prompt_messages(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, str]], str]:
    """The chat messages a client sends for a row (every turn before the last assistant turn) and that turn's text."""
    if cfg.format not in ("alpaca", "messages", "sharegpt"):
        raise DataError(f"data.format {cfg.format!r} has no prompt/answer to generate")
    messages = _row_messages(row, cfg)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def _chat_example(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it belongs to an assistant turn.

    Assistant spans are found by rendering prefixes of the conversation: the text between
    the generation prompt before turn k and the render through turn k is turn k's answer
    (its end-of-turn marker included, so the model learns to stop).
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True) if k else ""
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(
                "data: this tokenizer's chat template renders conversations differently by length, so "
                "assistant turns cannot be located; set data.train_on_inputs: true"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    target = [any(s < end and start < e for s, e in spans) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), target


def _causal_example(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[list[int], list[bool]] | None:
    """(ids, is_target) for one row, before truncation; None for an empty row."""
    c = cfg.columns
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if cfg.format == "text":
        text = row[c.text]
        if text is None or not str(text).strip():
            return None
        ids = tokenizer(str(text), add_special_tokens=True)["input_ids"] + eos
        return ids, [True] * len(ids)
    if cfg.format == "alpaca" and cfg.prompt_template == "alpaca":
        instruction, output = row[c.instruction], row[c.output]
        if not instruction or output is None or not str(output).strip():
            return None
        extra = str(row.get(c.input) or "").strip()
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=str(instruction).strip(),
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(str(output), add_special_tokens=False)["input_ids"] + eos
        return p + r, [False] * len(p) + [True] * len(r)
    messages = _row_messages(row, cfg)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None
    return _chat_example(messages, tokenizer)


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
        example = _causal_example(row, cfg, tokenizer)
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
    _check_columns(ds, cfg, split)
    report = SplitReport(rows_in=len(ds))
    if job.task.type == "sequence_classification":
        out = _tokenize_classification(ds, cfg, job.task, tokenizer, report, split)
    else:
        _check_chat_template(tokenizer, cfg)
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
        else:
            lines.append(_marked(tokenizer, row["input_ids"], row["labels"], color))
        lines.append("")
    lines.append(report.line(f"{split} (these {len(ds)} rows)"))
    return "\n".join(lines)
