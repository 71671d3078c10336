"""A pipeline's memory between runs, and how it talks: ``state.json`` (per stage, the fingerprint of its
inputs with what it produced, written atomically), the stage error, and the console lines."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hone.errors import PipelineError

__all__ = ["PipelineError", "State", "banner", "fingerprint", "say"]


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class State:
    """``state.json``: per stage, the fingerprint of its inputs and its output (written atomically)."""

    def __init__(self, folder: Path):
        self.path = folder / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def reusable(self, stage: str, fingerprint: str, exists: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        entry = self.data.get(stage)
        if entry and entry.get("fingerprint") == fingerprint and entry.get("ok"):
            try:
                if exists(entry["output"]):
                    return entry["output"]
            except Exception:  # noqa: BLE001 - a vanished output means: run the stage again
                return None
        return None

    def record(self, stage: str, fingerprint: str, output: dict[str, Any], *, ok: bool = True) -> None:
        self.data[stage] = {"fingerprint": fingerprint, "ok": ok, "output": output, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def say(msg: str) -> None:
    print(f"[hone] {msg}", flush=True)


def banner(i: int, n: int, stage: str, what: str) -> None:
    print(f"\n━━ [{i}/{n}] {stage}: {what}", flush=True)
