"""A training checkpoint on disk: written whole or not at all, verified before it is trusted.

Every rank writes its part (engine state, its RNG state; rank 0 the trainer state) into a temporary directory, with
``manifest_rank<r>.json`` listing the SHA-256 of each file it wrote; Ray Train merges the ranks' directories into
``<run>/checkpoint_<time>/``. A save that fails removes its temporary directory. On resume each rank checks its
manifest; if any rank finds the latest checkpoint incomplete or corrupt, all of them fall back to the previous one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hone import assets

__all__ = ["candidates", "intact", "write_checkpoint"]


def _digest(path: Path) -> str:
    return assets.hash_file(path).hexdigest()


def _manifest_name(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def write_checkpoint(rank: int, write: Callable[[Path], None]) -> str:
    """A temporary directory holding what ``write(dir)`` saved plus this rank's manifest; nothing is left behind when
    ``write`` fails."""
    tmp = Path(tempfile.mkdtemp(prefix="hone-ckpt-"))
    try:
        write(tmp)
        files = {str(p.relative_to(tmp)): _digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / _manifest_name(rank)).write_text(json.dumps(files, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(tmp)


def intact(directory: str | Path, rank: int) -> tuple[bool, str]:
    """Whether this rank's part of a checkpoint is complete and unchanged: (ok, what is wrong)."""
    directory = Path(directory)
    manifests = list(directory.glob("manifest_rank*.json"))
    if not manifests:  # written before checkpoints carried manifests: nothing to check against
        return (directory / "trainer_state.json").exists(), "no trainer_state.json"
    mine = directory / _manifest_name(rank)
    if not mine.exists():
        try:
            written_by = json.loads((directory / "trainer_state.json").read_text())["world_size"]
        except (OSError, ValueError, KeyError):
            written_by = None
        if written_by is not None and rank >= written_by:
            return True, ""  # an elastic run grew: this rank has no part in a checkpoint fewer workers wrote
        return False, f"{mine.name} is missing"
    try:
        files = json.loads(mine.read_text())
    except ValueError:
        return False, f"{mine.name} is unreadable"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return False, f"{name} is missing"
        if _digest(path) != digest:
            return False, f"{name} does not match its checksum"
    return True, ""


def candidates(latest: str, run_dir: Path | None) -> list[str]:
    """``latest`` first, then the run's older checkpoints, newest first (their names sort by time)."""
    out = [latest]
    if run_dir is not None and run_dir.is_dir():
        older = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir() and str(p) != str(latest)), reverse=True)
        out += [str(p) for p in older if p.name < Path(latest).name]
    return out
