"""Reading data: sources (files, globs, ``save_to_disk`` directories, hub ids, built-ins), seeded splits, the tokenizer."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from hone import assets, storage
from hone.config import DataConfig, JobConfig
from hone.config.sections import DATA_FILE_TYPES
from hone.errors import DataError

__all__ = [
    "SPLIT_RULE", "DataError", "dataset_fingerprint", "expand_source", "head_rows", "held_out_rows", "load_source",
    "load_splits", "load_tokenizer", "order_keys", "pick_split", "source_digest", "source_files", "split_plan",
    "token_ids", "tokenizer_digest",
]


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(job: JobConfig) -> Any:
    """The job's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    path = assets.resolve_model(job.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenizer_digest(tokenizer: Any) -> str:
    """A short hash of what decides a tokenizer's ids: its vocabulary and rules, special tokens and chat template."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    blob = json.dumps([rules, tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None), tokenizer.pad_token],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def token_ids(texts: list[str], tokenizer: Any, *, special: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=special)["input_ids"]``, straight from the Rust tokenizer of a fast
    tokenizer (transformers' per-encoding conversion costs as much as the tokenising)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=special)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]


# --------------------------------------------------------------------------- the split and order rule


def _canon(value: Any) -> Any:
    """A row value in a form every reader agrees on (numbers as floats: one reader's 1 is another's 1.0)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return str(value)


def order_keys(rows: list[dict[str, Any]], seed: int) -> list[int]:
    """The seeded sort key of each row: a hash of (seed, the row's content). Sorting a split by it is hone's one shuffle,
    whether the rows sit in this process (``datasets``) or spread over a cluster (Ray Data): the same rows land in the
    same order, wherever they were read and however they were split into blocks."""
    import hashlib
    import json

    prefix = f"{seed}\0".encode()
    return [int.from_bytes(hashlib.sha256(prefix + json.dumps(_canon(r), sort_keys=True, ensure_ascii=False).encode()).digest()[:8],
                           "big", signed=True) for r in rows]


def _seeded_order(ds: Any, seed: int) -> Any:
    import numpy as np

    keys = order_keys(ds.to_list(), seed)
    return ds.select(np.argsort(np.asarray(keys, dtype=np.int64), kind="stable").tolist())


SPLIT_RULE = "order-by-content-hash-v1"
"""How hone orders and splits rows (:func:`order_keys`); changing it changes every dataset fingerprint."""


def source_digest(source: str) -> str:
    """What a data source holds, as a hash over :func:`expand_source`'s files: local files by their content (an edit in
    place changes it, whatever the timestamps say), object-store files by name, size and modification time (no
    download); a built-in or hub id by the reference itself."""
    import hashlib

    if storage.is_uri(source):
        return storage.digest(source)
    files = expand_source(source)
    if files is None:
        return source
    base = os.path.dirname(os.path.expanduser(source)) or "."
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{os.path.relpath(f, base)}\0{assets.file_digest(f)}\0".encode())
    return digest.hexdigest()


def dataset_fingerprint(job: JobConfig) -> str:
    """A short hash of what decides the training data: the content of its files (source, validation, test) and the
    settings that format, split, sample and cut it. Lineage tags, pipeline re-runs and resume checks use it."""
    import hashlib
    import json

    from hone.privacy import settings_identity

    d = job.data
    sources = [d.source]
    for spec in (d.validation, d.test):  # a fraction carves the split from the source; a path or list names more files
        sources += [spec] if isinstance(spec, str) else spec if isinstance(spec, list) else []
    # the split/order rule is part of what decides the rows: a run started under another rule resumes on other batches
    blob = json.dumps([SPLIT_RULE, [source_digest(s) for s in sources], d.format, d.columns.model_dump(), d.split,
                       d.validation, d.test, d.seed, d.max_samples, d.max_eval_samples, d.max_length, d.train_on_inputs,
                       d.packing, d.prompt_template] + ([settings_identity(d.mask_pii)] if d.mask_pii else []), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- loading


def expand_source(source: str) -> list[str] | None:
    """The files a source names, the one expansion every reader and the fingerprint use: a file, a glob or a folder,
    local or in an object store (``s3://…``), sorted. None for built-ins and hub ids (no files of hone's to list)."""
    if source.startswith(assets.PREFIX):
        return None
    if storage.is_uri(source):
        if glob.has_magic(source):
            return storage.glob_files(source)
        listed = storage.list_files(source)
        return [source] if len(listed) == 1 and listed[0][0] == "" else [storage.join(source, rel) for rel, _, _ in listed]
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        return sorted(glob.glob(expanded))
    if os.path.isfile(expanded):
        return [expanded]
    if os.path.isdir(expanded):
        return sorted(str(p) for p in Path(expanded).rglob("*") if p.is_file())
    return None


def source_files(source: str) -> tuple[list[str], str] | None:
    """The files a file-like source names (a file or glob, local or ``s3://…``, or an object-store folder) and their
    ``datasets``/Ray Data reader kind; None for built-ins, local folders (``datasets`` reads them, split files and
    ``save_to_disk`` layouts included) and hub ids."""
    if not storage.is_uri(source) and os.path.isdir(os.path.expanduser(source)):
        return None
    files = expand_source(source)
    if files is None:
        return None
    if not files:
        raise DataError(f"data: no file matches {source!r}")
    kinds = {DATA_FILE_TYPES.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"data: cannot tell the file type of {source!r}; use .jsonl, .json, .csv, .parquet or .txt files (one kind)")
    return files, kinds.pop()


def load_source(source: str, cfg: DataConfig) -> Any:
    """Load a source into a DatasetDict (or Dataset) without touching the network for local data."""
    import datasets

    if source.startswith(assets.PREFIX):
        return assets.load_builtin_dataset(source, cfg.format)
    found = source_files(source)
    if found is not None:
        files, kind = found
        if storage.is_uri(source):  # read here from a local copy (held-out rows, previews); training reads on Ray Data
            files = [str(storage.download(f, storage.mirror(f))) for f in files]
        return datasets.load_dataset(kind, data_files=files, split="train")
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        if any((Path(expanded) / marker).exists() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return datasets.load_from_disk(expanded)
        return datasets.load_dataset(expanded)
    return datasets.load_dataset(source)  # a hub id (needs network unless cached)


def head_rows(cfg: DataConfig, n: int) -> tuple[list[str], list[dict[str, Any]]] | None:
    """(columns, the first ``n`` rows) of the training source when that is cheap here: a built-in, or local files read
    from their start (jsonl line by line; json, csv and parquet through pyarrow's dataset reader). None for object-store,
    folder and hub sources, which are read (and checked) on Ray Data."""
    import json

    if cfg.source.startswith(assets.PREFIX):
        train = pick_split(assets.load_builtin_dataset(cfg.source, cfg.format), cfg.split, cfg.source)
        return train.column_names, train.select(range(min(n, len(train)))).to_list()
    found = None if storage.is_uri(cfg.source) else source_files(cfg.source)
    if found is None:
        return None
    files, kind = found
    rows: list[dict[str, Any]] = []
    if kind == "json" and all(f.endswith(".jsonl") for f in files):
        for f in files:
            with open(f) as lines:
                rows += [json.loads(line) for line, _ in zip((x for x in lines if x.strip()), range(n - len(rows)))]
            if len(rows) >= n:
                break
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, rows
    import pyarrow as pa
    import pyarrow.dataset as pds

    try:
        head = pds.dataset(files, format=kind).head(n)
    except (pa.ArrowInvalid, ValueError):  # e.g. a .json file holding one array: datasets (and Ray Data) read it
        return None
    return head.column_names, head.to_pylist()


def pick_split(loaded: Any, split: str, source: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"data.split: {source!r} has no split {split!r}; it has {', '.join(loaded)}")
        return loaded[split]
    return loaded


def load_splits(cfg: DataConfig) -> dict[str, Any]:
    """train/validation/test ``datasets.Dataset`` objects before formatting, split and seeded."""
    import datasets

    loaded = load_source(cfg.source, cfg)
    train = pick_split(loaded, cfg.split, cfg.source)
    own = loaded if isinstance(loaded, datasets.DatasetDict) else {}
    train = _seeded_order(train, cfg.seed)
    plan, (start, stop) = split_plan(cfg, len(train), set(own))
    out: dict[str, Any] = {}
    for name, where in plan.items():
        if where == "own":
            out[name] = own[name]
        elif where == "files":
            spec = getattr(cfg, name)
            parts = [pick_split(load_source(path, cfg), "train", path) for path in ([spec] if isinstance(spec, str) else spec)]
            out[name] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        else:
            out[name] = train.select(range(*where))
    if cfg.max_eval_samples is not None:
        out = {k: v.select(range(min(cfg.max_eval_samples, len(v)))) for k, v in out.items()}
    return {"train": train.select(range(start, stop)), **{k: out[k] for k in ("validation", "test") if k in out}}


def split_plan(cfg: DataConfig, n: int, own: set[str]) -> tuple[dict[str, Any], tuple[int, int]]:
    """Where each held-out split comes from once the ``n`` source rows are in hone's order: a row range ``(start,
    stop)`` of them (a fraction: test first, then validation from the rest), ``"own"`` (the source's own split) or
    ``"files"`` (separate files); and the training rows' range (``max_samples`` applied). Both engines follow it."""
    plan: dict[str, Any] = {}
    taken = 0
    for name in ("test", "validation"):
        spec = getattr(cfg, name)
        if spec is None:
            continue
        if not isinstance(spec, float):
            plan[name] = "files"
        elif name in own and name != cfg.split:
            plan[name] = "own"
        else:
            k = max(1, int(round((n - taken) * spec)))
            if k >= n - taken:
                raise DataError(f"data.{name}: {spec} of {n - taken} rows leaves no training data")
            plan[name] = (taken, taken + k)
            taken += k
    return plan, (taken, n if cfg.max_samples is None else min(n, taken + cfg.max_samples))


def held_out_rows(cfg: DataConfig, split: str, n: int) -> Any:
    """The first ``n`` rows of ``split`` before formatting: the one rule every stage that evaluates on held-out data
    follows (``hone eval``, the quality gate, the smoke test). A validation or test split the data does not declare
    is carved as 10% of the seeded training rows; ``max_eval_samples`` does not apply. ``data.mask_pii`` masks them."""
    update: dict[str, Any] = {"max_eval_samples": None}
    if split in ("validation", "test") and getattr(cfg, split) is None:
        update[split] = 0.1
    splits = load_splits(cfg.model_copy(update=update))
    if split not in splits:
        raise DataError(f"the data has no {split!r} split (have {', '.join(splits)})")
    rows = splits[split].select(range(min(n, len(splits[split]))))
    if cfg.mask_pii is None:
        return rows
    import datasets

    from hone.privacy import mask_rows

    masked, _ = mask_rows(rows.to_list(), cfg.mask_pii, skip=(cfg.columns.label,))
    return datasets.Dataset.from_list(masked, features=rows.features)
