"""hone tune: a real Ray Tune sweep of real training runs, the MLflow registry, resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hone.config import load_job

HONE = str(Path(sys.executable).parent / "hone")


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a hone command in its own process group; on timeout kill the group and fail with its output."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[1:3])} timed out after {timeout}s\n--- stdout\n{out[-6000:]}\n--- stderr\n{err[-6000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.slow
def test_sweep_stops_bad_trials_and_registers_the_winner(repo, home, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = _run([HONE, "tune", str(repo / "jobs" / "sweep-tiny.yaml"), "--storage-path", str(tmp_path / "runs")], env, 480)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    sweep_dir = next((tmp_path / "runs").iterdir())
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert len(trials) == 4
    statuses = [t["status"] for t in trials]
    assert "stopped early" in statuses, statuses
    assert "completed" in statuses
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert all(t["steps"] < 12 and t["export"] is None for t in stopped)
    completed = [t for t in trials if t["status"] == "completed"]
    best = min(completed, key=lambda t: t["eval_loss"])
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["winner"]["trial"] == best["trial"]
    assert "winner: trial " + best["trial"] in out.stdout and "stopped early" in out.stdout
    for name in ("trials.csv", "metric_vs_step.png", "params_vs_metric.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    assert (sweep_dir / "metric_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from hone import registry

    ref = registry.resolve_model_ref("models:/sweep-tiny@winner")
    assert ref["source"] == best["export"] and "winner" in ref["aliases"]
    versions = registry.show_model("sweep-tiny")
    lineage = versions[-1]["lineage"]
    assert lineage["hone.base_model"] == "builtin:tiny-llama" and lineage["hone.method"] == "lora"
    assert lineage["hone.zero_stage"] == "2" and len(lineage["hone.dataset_fingerprint"]) == 12
    assert lineage["hone.version"] and lineage["hone.git_commit"] and lineage["hone.sweep"] == sweep_dir.name
    assert "final_eval_loss" in versions[-1]["metrics"]
    shown = subprocess.run([HONE, "models", "show", "sweep-tiny"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "@winner" in shown.stdout and "hone.dataset_fingerprint" in shown.stdout
    listed = subprocess.run([HONE, "models", "list"], env=env, capture_output=True, text=True)
    assert "sweep-tiny" in listed.stdout and "@winner→v1" in listed.stdout


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(repo, home, tmp_path):
    job = yaml.safe_load((repo / "jobs" / "sweep-tiny.yaml").read_text())
    job["tune"]["scheduler"] = "fifo"
    job["tune"]["search_space"] = {"training.lr": {"grid": [1e-3, 2e-3, 3e-3]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = tmp_path / "runs"
    proc = subprocess.Popen([HONE, "tune", str(path), "--storage-path", str(storage)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        finished: list[Path] = []
        while time.time() < deadline and not finished:
            finished = list(storage.glob("*/runs/*/export/hone.json"))
            time.sleep(0.5)
        assert finished, "no trial finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    sweep_dir = next(storage.iterdir())
    first = {p.parent.parent.name: p.stat().st_mtime_ns for p in storage.glob("*/runs/*/export/hone.json")}
    assert 1 <= len(first) < 3
    out = _run([HONE, "tune", "--resume", str(sweep_dir)], env, 480)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "resuming sweep" in out.stdout
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert len(trials) == 3 and all(t["status"] == "completed" for t in trials)
    after = {p.parent.parent.name: p.stat().st_mtime_ns for p in storage.glob("*/runs/*/export/hone.json")}
    for trial, mtime in first.items():
        assert after[trial] == mtime, f"finished trial {trial} was run again"


def test_invalid_search_space_rejected_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name: builtin:tiny-llama}\n"
        "data: {source: builtin:rotten-tomatoes, format: alpaca}\n"
        "tune:\n  search_space:\n    training.lrr: {choice: [1]}\n    method.lora.r: {choice: []}\n    training.batch_size: {choice: [big]}\n"
    )
    started = time.time()
    out = subprocess.run([HONE, "tune", str(bad), "--storage-path", str(tmp_path / "runs")], capture_output=True, text=True)
    assert out.returncode == 2
    for text in ("tune.search_space.training.lrr", "did you mean 'training.lr'", "tune.search_space.method.lora.r", "empty",
                 "tune.search_space.training.batch_size", "'big' is invalid"):
        assert text in out.stderr, text
    assert not (tmp_path / "runs").exists() and time.time() - started < 30


def test_pbt_and_optuna_grid_are_refused_clearly(tmp_path):
    from hone.train import TrainError
    from hone.tune import _scheduler, _searcher

    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "sweep-tiny.yaml", ["tune.scheduler=pbt"])
    with pytest.raises(TrainError, match="pbt"):
        _scheduler(job, "eval_loss", "min")
    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "sweep-tiny.yaml", ["tune.searcher=optuna"])
    with pytest.raises(TrainError, match="grid"):
        _searcher(job, "eval_loss", "min")


def _register_many(home: str, worker: int, n: int, export: str) -> None:
    os.environ["HONE_HOME"] = home
    from hone import registry

    for i in range(n):
        registry.register_winner("shared-model", _fake_run(registry, worker, i), Path(export), "eval_loss", float(worker * 100 + i),
                                 sweep=f"sweep-{worker}")


def _fake_run(registry, worker: int, i: int) -> str:
    with registry._client() as client:
        exp = registry._experiment(client, "hone/concurrency")
        run = client.create_run(exp, tags={"worker": str(worker), "i": str(i)})
        client.set_terminated(run.info.run_id)
        return run.info.run_id


def test_concurrent_registry_writes_lose_nothing(home, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(str(home), w, 6, str(export))) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    from hone import registry

    versions = registry.show_model("shared-model")
    assert sorted(v["version"] for v in versions) == list(range(1, 13))
    assert sorted(v["tags"]["hone.sweep"] for v in versions) == ["sweep-0"] * 6 + ["sweep-1"] * 6
    winner = registry.resolve_model_ref("models:/shared-model@winner")
    assert winner["version"] in range(1, 13)
    registry.promote("shared-model", 3, "prod")
    assert registry.resolve_model_ref("models:/shared-model@prod")["version"] == 3
    with pytest.raises(registry.RegistryError, match="no version 99"):
        registry.promote("shared-model", 99, "prod")
    with pytest.raises(registry.RegistryError, match="does not resolve"):
        registry.resolve_model_ref("models:/nope@winner")
