"""Helpers for tests that run ``hone train`` on the test cluster: start, interrupt, read the per-step losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HONE = str(Path(sys.executable).parent / "hone")


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses; a step logged twice (before and after a resume) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def run_cli(args, env, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [HONE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw
    )


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def logged_step(run_dir: Path, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line.strip())


def killed_after_step(step: int, cluster, job: Path, storage: Path, env: dict, *overrides: str) -> Path:
    """Start ``hone train`` on the job and SIGKILL its whole process group once ``step`` is logged; returns the run."""
    storage.mkdir(parents=True, exist_ok=True)
    proc = run_cli(["train", str(job), *overrides, "--address", cluster["address"], "--storage-path", str(storage)], env)
    try:
        runs = lambda: [p for p in storage.iterdir() if not p.name.startswith(".")]  # noqa: E731 - not the data cache
        wait_until(lambda: bool(runs()), "the run directory", timeout=120)
        run_dir = runs()[0]
        wait_until(lambda: logged_step(run_dir, step), f"step {step}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return run_dir
