"""Reading the tokenised-data cache on a training worker: memory-mapped Arrow shards, rows fetched by index.

A worker never loads a split into Python objects: :class:`CachedSplit` maps the split's shards (a local cache entry
directly; an object-store entry after one copy per node into ``$HONE_HOME/cache/data/<key>``) and :meth:`take` builds
only the rows of the micro-batch at hand, so its memory is bounded by a batch whatever the data's size, and any row
order (the run's seeded schedule, a resumed or resized run) is served exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hone import assets, storage

__all__ = ["CachedSplit", "local_entry"]

_MANIFEST = "manifest.json"  # hone.data.cache.MANIFEST (this module stays importable without Ray Data)


def local_entry(location: str, key: str) -> Path:
    """A local folder holding the cache entry at ``location``: itself, or this node's copy of an object-store entry
    (fetched whole, then renamed into place, so concurrent workers on one node share one complete copy)."""
    if not storage.is_uri(location):
        return Path(location)
    final = assets.hone_home() / "cache" / "data" / key
    if (final / _MANIFEST).exists():
        return final
    partial = final.with_name(f".{key}.{os.getpid()}")
    storage.download(location, partial)
    try:
        os.rename(partial, final)
    except OSError:  # another worker on this node finished first
        shutil.rmtree(partial, ignore_errors=True)
    return final


class CachedSplit:
    """One split of a cache entry, memory-mapped: ``len(split)`` rows, :meth:`take` a list of them by index.

    Record batches are kept as zero-copy views of the mapped files and a row is sliced out of its batch, so only the
    pages of the rows asked for are read (``Table.take`` over many chunks would combine them: a copy of the split).
    """

    def __init__(self, folder: Path, split: str):
        import pyarrow as pa

        self._batches: list[Any] = []
        self._starts: list[int] = []
        total = 0
        for f in sorted(folder.glob(f"{split}-*.arrow")):
            reader = pa.ipc.open_file(pa.memory_map(str(f)))
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if batch.num_rows:
                    self._batches.append(batch)
                    self._starts.append(total)
                    total += batch.num_rows
        self._len = total
        expected = json.loads((folder / _MANIFEST).read_text())["rows"].get(split, 0)
        if total != expected:
            raise RuntimeError(f"tokenised-data cache {folder} is incomplete: {split} has {total} rows, its manifest says "
                               f"{expected}; delete the folder and run again")

    def __len__(self) -> int:
        return self._len

    def take(self, indices: list[int]) -> list[dict[str, Any]]:
        import bisect

        out = []
        for i in indices:
            if not 0 <= i < self._len:
                raise IndexError(f"row {i} of a split of {self._len}")
            k = bisect.bisect_right(self._starts, i) - 1
            out.append(self._batches[k].slice(i - self._starts[k], 1).to_pylist()[0])
        return out

    def all(self) -> list[dict[str, Any]]:
        return [row for batch in self._batches for row in batch.to_pylist()]
