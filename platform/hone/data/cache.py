"""Tokenising on Ray Data, cached in the run storage.

:func:`prepare_cached` reads the source with Ray Data's readers (files, globs and object-store URIs; built-ins, local
folders and hub datasets through ``datasets``), orders and splits it by :func:`hone.data.order_keys` (a distributed
sort: the same rows and order as :func:`hone.data.load_splits`), and formats, tokenises and masks it in Ray Data
tasks spread over the cluster's CPUs. The driver only streams the finished rows, in order, into the cache (packing
them when asked) and counts the report: it never holds the dataset.

The cache entry ``<storage>/.hone-data/<key>/`` holds Arrow IPC shards per split and ``manifest.json`` (row counts, the
report; written last, so an entry without it is incomplete and rebuilt). The key hashes the data's content, the
tokenizer and every setting that shapes the rows, so the next run, every sweep trial and a resume reuse it. Training
workers open it memory-mapped (:mod:`hone.data.shards`). ``HONE_DATA_CACHE`` (a folder or URI every node reads) moves the
cache out of the run storage into one place shared by every run, sweep and pipeline (:func:`cache_root`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hone import storage
from hone.config import JobConfig
from hone.data.sources import dataset_fingerprint, load_source, order_keys, pick_split, source_files, split_plan
from hone.data.tokenize import DataReport, SplitBuilder, SplitReport, check_split, encode_rows
from hone.errors import DataError

__all__ = ["CACHE_DIR", "MANIFEST", "TokenizedData", "cache_key", "cache_root", "prepare_cached"]

CACHE_DIR = ".hone-data"
MANIFEST = "manifest.json"
_VERSION = 1  # bump when the cache layout or the row encoding changes
_SHARD_ROWS = 65536
_BLOCK_ROWS = 4096
_BATCH_ROWS = 8192  # divides _SHARD_ROWS
_PART_BYTES = 32 << 20  # the sort's partitions: one per 32 MiB of input
_KEY = "__hone_order"


@dataclass
class TokenizedData:
    """A cache entry: where it is, its rows per split, the data report, and whether this run built it."""

    location: str
    key: str
    rows: dict[str, int]
    report: DataReport
    hit: bool


def cache_root(storage_root: str) -> str:
    """Where a run's tokenised data is cached: ``$HONE_DATA_CACHE`` when set (one cache for every run, sweep and pipeline
    that reads the same data with the same settings), else ``storage_root``, the run storage the run lives in."""
    return os.environ.get("HONE_DATA_CACHE") or storage_root


def cache_key(job: JobConfig, tokenizer_digest: str) -> str:
    """What decides the tokenised rows: the data's content and settings, the task, the tokenizer, the encoding."""
    d, t = job.data, job.task
    blob = json.dumps([_VERSION, dataset_fingerprint(job), tokenizer_digest, d.truncation_side, d.system_prompt, t.type,
                       t.num_labels, t.labels] + ([job.preference.max_prompt_length] if job.preference else [])
                      + ([job.grpo.max_prompt_length, job.grpo.max_new_tokens] if job.grpo else []),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- reading


def _read(source: str, job: JobConfig, split: str) -> tuple[Any, dict[str, Any], int]:
    """(the split to train on, the source's own other splits) as Ray datasets, and the split's size in bytes (in memory
    for built-in and hub data, on disk for files: an estimate that sizes the sort)."""
    import ray.data

    found = source_files(source)
    if found is None:  # built-ins, local folders, hub ids: `datasets` (memory-mapped Arrow), handed to Ray Data
        import datasets

        loaded = load_source(source, job.data)
        own = {k: v for k, v in loaded.items()} if isinstance(loaded, datasets.DatasetDict) else {}
        train = pick_split(loaded, split, source)
        return _from_hf(train), {k: _from_hf(v) for k, v in own.items() if k != split}, train.data.nbytes
    files, kind = found
    fs = storage.filesystem(files[0])[0]
    paths = [storage.filesystem(f)[1] for f in files]
    size = sum(info.size or 0 for info in fs.get_file_info(paths))
    if kind == "json":
        return ray.data.read_json(paths, filesystem=fs, file_extensions=None), {}, size
    if kind == "csv":
        return ray.data.read_csv(paths, filesystem=fs, file_extensions=None), {}, size
    if kind == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs, file_extensions=None), {}, size
    return ray.data.read_text(paths, filesystem=fs, drop_empty_lines=False, file_extensions=None), {}, size


def _from_hf(ds: Any) -> Any:
    import ray.data

    return ray.data.from_arrow(ds.with_format("arrow")[:])


def _add_order(batch: Any, seed: int) -> Any:
    import pyarrow as pa

    return batch.append_column(_KEY, pa.array(order_keys(batch.to_pylist(), seed), pa.int64()))


def _encode(batch: Any, job: dict[str, Any], tokenizer: Any) -> Any:
    return encode_rows(batch.drop_columns([c for c in (_KEY,) if c in batch.column_names]).to_pylist(),
                       JobConfig.model_validate(job, context={"check_paths": False}), tokenizer)


def _splits(job: JobConfig) -> dict[str, Any]:
    """The job's splits as Ray datasets, in hone's order (:func:`hone.data.load_splits`'s rule, run on the cluster)."""
    import ray

    cfg = job.data
    train, own, size = _read(cfg.source, job, cfg.split)
    # Small blocks spread the work over the CPUs (a file is one block as read) and keep what the driver maps at once
    # small; the keys are uniform hashes, so even ranges of int64 split the sort without sampling. Sized by the input:
    # a partition per _PART_BYTES, up to 4 per CPU. A small data set is ordered as read and sorted by two tasks, not
    # spread over every CPU of the cluster first: each task that lands on a new worker process pays its start (seconds)
    # for milliseconds of work (the tiny recipes' data: 6.7 s → 1.7 s on the 3-node test cluster).
    parts = max(2, min(4 * int(ray.cluster_resources().get("CPU", 1)), -(-size // _PART_BYTES)))
    bounds = [-(2**63) + (2**64 * k) // parts for k in range(1, parts)]
    spread = train.repartition(target_num_rows_per_block=_BLOCK_ROWS) if size > _PART_BYTES else train
    ordered = (spread
               .map_batches(_add_order, batch_format="pyarrow", fn_kwargs={"seed": cfg.seed})
               .sort(_KEY, boundaries=bounds)
               .repartition(target_num_rows_per_block=_BLOCK_ROWS)
               .materialize())
    plan, (start, stop) = split_plan(cfg, ordered.count(), set(own))

    def rows(a: int, b: int) -> Any:
        return ordered.limit(b).split_at_indices([a])[1] if a else ordered.limit(b)

    out: dict[str, Any] = {}
    for name, where in plan.items():
        if where == "own":
            out[name] = own[name]
        elif where == "files":
            spec = getattr(cfg, name)
            named = [_read(path, job, "train")[0] for path in ([spec] if isinstance(spec, str) else spec)]
            out[name] = named[0] if len(named) == 1 else named[0].union(*named[1:])
        else:
            out[name] = rows(*where)
    if cfg.max_eval_samples is not None:
        out = {k: v.limit(cfg.max_eval_samples) for k, v in out.items()}
    return {"train": rows(start, stop), **{k: out[k] for k in ("validation", "test") if k in out}}


# --------------------------------------------------------------------------- writing the cache


@contextlib.contextmanager
def _ordered() -> Iterator[None]:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = before


def _write_split(ds: Any, job: JobConfig, tokenizer: Any, name: str, folder: Path, batch_size: int) -> tuple[int, SplitReport]:
    import pyarrow as pa

    check_split(ds.columns(), job, tokenizer, name)
    encoded = ds.map_batches(_encode, batch_format="pyarrow", batch_size=batch_size,
                             fn_kwargs={"job": job.to_dict(), "tokenizer": tokenizer})
    builder = SplitBuilder(job, name, job.data.packing and name == "train")
    shard, writer, in_shard, total = 0, None, 0, 0
    pending: list[pa.Table] = []  # rows waiting to be written as one record batch (few, large batches map cheaply)

    def flush(final: bool = False) -> None:
        nonlocal shard, writer, in_shard, total
        rows = sum(len(t) for t in pending)
        while rows >= _BATCH_ROWS or (final and rows):
            table = pa.concat_tables(pending).combine_chunks()
            take = table.slice(0, min(_BATCH_ROWS, _SHARD_ROWS - in_shard))
            if writer is None:
                writer = pa.ipc.new_file(str(folder / f"{name}-{shard:05d}.arrow"), table.schema)
            writer.write_batch(take.to_batches(max_chunksize=len(take))[0])
            in_shard += len(take)
            total += len(take)
            pending[:] = [table.slice(len(take))] if len(take) < len(table) else []
            rows -= len(take)
            if in_shard == _SHARD_ROWS:
                writer.close()
                writer, in_shard, shard = None, 0, shard + 1

    def write(table: pa.Table | None) -> None:
        if table is not None and len(table):
            pending.append(table)
            flush()

    try:
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            write(builder.add(batch))
        write(builder.finish())
        flush(final=True)
    except Exception as e:  # a DataError raised in a Ray Data task arrives wrapped: give the user its own message
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is not None:
            raise DataError(str(cause)) from None
        raise
    finally:
        if writer is not None:
            writer.close()
    return total, builder.report


def prepare_cached(job: JobConfig, tokenizer: Any, tokenizer_digest: str, root: str, *, batch_size: int = 256,
                   quiet: bool = True) -> TokenizedData:
    """The job's tokenised splits in the cache under ``root`` (a folder or URI: :func:`cache_root`): reused when present,
    else built on Ray Data (Ray must be initialised: ``hone.runtime.ray_session``)."""
    key = cache_key(job, tokenizer_digest)
    location = storage.join(root, CACHE_DIR, key)
    manifest = storage.join(location, MANIFEST)
    if storage.exists(manifest):
        m = json.loads(storage.read_text(manifest))
        report = DataReport({k: SplitReport(**v) for k, v in m["report"].items()})
        return TokenizedData(location, key, m["rows"], report, hit=True)
    staging = Path(tempfile.mkdtemp(prefix=f"hone-data-{key}-"))
    try:
        rows: dict[str, int] = {}
        report = DataReport()
        with _ordered():
            for name, ds in _splits(job).items():
                rows[name], report.splits[name] = _write_split(ds, job, tokenizer, name, staging, batch_size)
        (staging / MANIFEST).write_text(json.dumps({"key": key, "rows": rows, "report": {k: vars(v) for k, v in report.splits.items()},
                                                    "version": _VERSION}, indent=1))
        _publish(staging, location)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TokenizedData(location, key, rows, report, hit=False)


def _publish(staging: Path, location: str) -> None:
    """Put a complete entry in place: shards first, the manifest last (readers trust only entries with one)."""
    import os

    manifest = staging / MANIFEST
    if storage.is_uri(location):
        for f in sorted(staging.iterdir()):
            if f.name != MANIFEST:
                storage.upload(f, storage.join(location, f.name))
        storage.upload(manifest, storage.join(location, MANIFEST))
        return
    final = Path(location)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.copytree(staging, partial)
    try:
        os.replace(partial, final)  # another run that built the same entry first wins; both are identical
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
