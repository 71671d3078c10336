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

_MANIFEST = "manifest.json"  # hone.data.cluster.MANIFEST (this module stays importable without Ray Data)


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
    """One split of a cache entry, memory-mapped: ``len(split)`` rows, :meth:`take` a list of them by index."""

    def __init__(self, folder: Path, split: str):
        import pyarrow as pa

        files = sorted(folder.glob(f"{split}-*.arrow"))
        tables = [pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in files]
        self.table = pa.concat_tables(tables) if tables else None
        expected = json.loads((folder / _MANIFEST).read_text())["rows"].get(split, 0)
        if len(self) != expected:
            raise RuntimeError(f"tokenised-data cache {folder} is incomplete: {split} has {len(self)} rows, its manifest says "
                               f"{expected}; delete the folder and run again")

    def __len__(self) -> int:
        return 0 if self.table is None else self.table.num_rows

    def take(self, indices: list[int]) -> list[dict[str, Any]]:
        return self.table.take(indices).to_pylist()

    def all(self) -> list[dict[str, Any]]:
        return [] if self.table is None else self.table.to_pylist()
