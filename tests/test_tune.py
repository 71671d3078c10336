"""hone tune: a real Ray Tune sweep of real training runs, the MLflow registry, resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import yaml

from hone.config import load_job

from tests.helpers import hone, logged_step, start_hone, stop_group, wait_until

# A sweep with ASHA stopping a bad trial, the winner registered with its lineage, the tables and the plots:
# tests/pipeline/test_pipeline.py::test_tiny_quickstart_end_to_end_then_reruns (the tiny quickstart's first stage).


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(repo, home, tmp_path):
    """Two trials, one at a time, each on one worker (this is about the sweep, not the run): the sweep is killed once the
    first trial has ended (exported, then its last step recorded), whether or not Tune has recorded its end yet;
    ``hone tune --resume`` runs the second and leaves the first alone."""
    job = yaml.safe_load((repo / "jobs" / "sweep-tiny.yaml").read_text())
    job["tune"].update(scheduler="fifo", search_space={"training.lr": {"grid": [1e-3, 3e-3]}}, max_concurrent_trials=1)
    job["training"].update(max_steps=6, eval_every=3, log_every=3)
    job["distributed"]["num_workers"] = 1
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = tmp_path / "runs"
    proc = start_hone("tune", str(path), "--storage-path", str(storage), env=env, log=tmp_path / "tune.log")
    try:
        wait_until(lambda: [run for run in storage.glob("*/runs/*") if (run / "export" / "hone.json").exists() and logged_step(run, 6)],
                   "the first trial's end", 600, proc, tmp_path / "tune.log")
    finally:
        stop_group(proc)
    sweep_dir = next(storage.iterdir())
    first = {p.parent.parent.name: p.stat().st_mtime_ns for p in storage.glob("*/runs/*/export/hone.json")}
    assert len(first) == 1, first
    out = hone("tune", "--resume", str(sweep_dir), env=env, timeout=480)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "resuming sweep" in out.stdout
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)
    after = {p.parent.parent.name: p.stat().st_mtime_ns for p in storage.glob("*/runs/*/export/hone.json")}
    for trial, mtime in first.items():
        assert after[trial] == mtime, f"finished trial {trial} was run again"


def test_invalid_search_space_rejected_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name: builtin:tiny-llama}\n"
        "data: {source: builtin:rotten-tomatoes, format: alpaca}\n"
        "tune:\n  search_space:\n    training.lrr: {choice: [1]}\n    method.lora.r: {choice: []}\n"
        "    training.batch_size: {choice: [big]}\n"
    )
    started = time.time()
    out = hone("tune", str(bad), "--storage-path", str(tmp_path / "runs"), timeout=120)
    assert out.returncode == 2
    for text in (
        "tune.search_space.training.lrr",
        "did you mean 'training.lr'",
        "tune.search_space.method.lora.r",
        "empty",
        "tune.search_space.training.batch_size",
        "'big' is invalid",
    ):
        assert text in out.stderr, text
    assert not (tmp_path / "runs").exists() and time.time() - started < 30


def test_optuna_grid_is_refused_clearly(tmp_path):
    from hone.training import TrainError
    from hone.tune import _searcher

    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "sweep-tiny.yaml", ["tune.searcher=optuna"])
    with pytest.raises(TrainError, match="grid"):
        _searcher(job, "eval_loss", "min", 1)


def test_pbt_sweeps_that_cannot_work_are_rejected_with_the_field(repo):
    from hone.config import JobConfigError

    recipe = repo / "jobs" / "sweep-pbt-tiny.yaml"
    cases = {
        # a searched field that a running trial cannot change
        "tune.search_space.method.lora.r={choice: [4, 8]}": ("tune.search_space.method.lora.r", "cannot change in flight"),
        "training.checkpoint_every=null": ("training.checkpoint_every", "checkpoints only at the end"),
        "tune.perturbation_interval=4": ("tune.perturbation_interval", "not a multiple of training.checkpoint_every (6)"),
        "tune.searcher=optuna": ("tune.searcher", "takes no searcher"),
        "tune.search_space.training.lr={choice: [0.001]}": ("tune.num_samples", "at least 2 trials"),
    }
    for override, (path, text) in cases.items():
        with pytest.raises(JobConfigError) as e:
            load_job(recipe, [override])
        assert path in str(e.value) and text in str(e.value), (override, str(e.value))
    assert load_job(recipe, ["tune.perturbation_interval=12"]).tune.perturbation_interval == 12


@pytest.mark.slow
def test_pbt_sweep_clones_the_better_trial_with_a_perturbed_lr(repo, home, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = hone("tune", str(repo / "jobs" / "sweep-pbt-tiny.yaml"), "--storage-path", str(tmp_path), env=env, timeout=480)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    sweep_dir = next(tmp_path.glob("sweep-pbt-tiny-sweep-*"))
    trials = {t["trial"]: t for t in json.loads((sweep_dir / "trials.json").read_text())}
    assert len(trials) == 2 and all(t["status"] == "completed" and t["export"] for t in trials.values())
    cloned = [t for t in trials.values() if t["cloned"]]
    # lr 1e-5 barely moves in 6 steps, lr 2e-2 does: at step 6 the slow trial continues from the fast one's state
    assert len(cloned) == 1, trials
    clone = cloned[0]
    donor = trials[clone["cloned"][0]["from"]]
    assert clone["cloned"][0]["step"] == 6 and not donor["cloned"]
    history = {h["step"]: h["eval_loss"] for h in clone["history"]}
    donor_history = {h["step"]: h["eval_loss"] for h in donor["history"]}
    assert history[6] > donor_history[6] + 0.1  # its own step 6, before the clone
    assert history[9] < history[6] - 0.1  # continued from the donor's weights
    # the perturbed learning rate is the one it trained with from then on, and the one the table reports
    run_job = load_job(sweep_dir / "runs" / clone["trial"] / "job.yaml", check_paths=False)
    assert run_job.training.lr == clone["cloned"][0]["params"]["training.lr"] == clone["params"]["training.lr"]
    assert (sweep_dir / "runs" / f"{clone['trial']}.seg1" / "metrics.jsonl").exists()
    assert not list(sweep_dir.glob("runs/*/pbt_init")) and not list(sweep_dir.glob("runs/*.seg1/checkpoint_*"))
    assert f"cloned {donor['trial']} at step 6" in out.stdout
    # both continued at step 6: the donor after its pause (synch), the clone from the donor's checkpoint
    assert out.stdout.count("continued at step 6/12") + out.stderr.count("continued at step 6/12") >= 2
    best = min(trials.values(), key=lambda t: t["eval_loss"])
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert sweep["winner"]["eval_loss"] == best["eval_loss"] and sweep["registered"]["name"] == "sweep-pbt-tiny"
    for png in ("metric_vs_step.png", "params_vs_metric.png"):
        assert (sweep_dir / png).stat().st_size > 1000


def _register_many(home: str, worker: int, n: int, export: str) -> None:
    os.environ["HONE_HOME"] = home
    from hone import registry

    for i in range(n):
        registry.register_winner(
            "shared-model", _fake_run(registry, worker, i), Path(export), "eval_loss", float(worker * 100 + i), sweep=f"sweep-{worker}"
        )


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
    # the alias moved only to better versions, atomically: it ends on the best value any process registered
    assert float(winner["tags"]["hone.metric_value"]) == 0.0, winner
    registry.promote("shared-model", 3, "prod")
    assert registry.resolve_model_ref("models:/shared-model@prod")["version"] == 3
    with pytest.raises(registry.RegistryError, match="no version 99"):
        registry.promote("shared-model", 99, "prod")
    with pytest.raises(registry.RegistryError, match="does not resolve"):
        registry.resolve_model_ref("models:/nope@winner")


def test_the_winner_is_the_best_finite_completed_trial():
    from hone.tune import choose_winner

    def row(trial, value, status="completed"):
        return {"trial": trial, "eval_loss": value, "status": status}

    nan = float("nan")
    rows = [row("a", nan), row("b", 0.7), row("c", 0.5), row("d", 0.1, "stopped early"), row("e", None), row("f", float("-inf"))]
    assert choose_winner(rows, "eval_loss", "min")["trial"] == "c"
    assert choose_winner([row("a", nan), row("b", 0.7)], "eval_loss", "max")["trial"] == "b"
    assert choose_winner([row("a", nan), row("e", None), row("d", 0.1, "error")], "eval_loss", "min") is None
