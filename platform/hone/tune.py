"""``hone tune``: a Ray Tune sweep over a job's ``tune:`` section; the winner goes to the registry.

Each trial is a Tune function trainable that validates its sampled config with the schema
and runs a full hone training run (Ray Train + DeepSpeed) — the pattern Ray 2.60 supports in
place of passing a Trainer to a Tuner. The run's reports reach Tune through a callback in its
Train controller; under population-based training each checkpoint goes along, so Tune can pause
a trial and start another from its state with perturbed hyperparameters (``training.lr``,
``training.weight_decay``). The trial function itself reserves no CPU, so trials never deadlock
their own training workers; ``max_concurrent_trials`` defaults to what the cluster's CPUs fit.

Sweep directory (``<storage>/<name>-sweep-<timestamp>``): ``job.yaml``, ``tune/`` (Tune's
experiment state, for ``--resume``), ``runs/<trial_id>/`` (each trial's run and export; under PBT
``pbt.json`` lists its restarts and ``<trial_id>.segN/`` keeps earlier segments),
``trials.csv``/``trials.json``, ``metric_vs_step.png``, ``params_vs_metric.png``, ``sweep.json``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hone import storage
from hone.artifacts import (
    EXPORT_DIR,
    EXPORT_INFO,
    JOB_FILE,
    MERGED_DIR,
    METRICS_FILE,
    append_metrics,
    read_metrics,
    sync_down,
    sync_up,
)
from hone.config import JobConfig, SearchDomain, load_job, validate_job
from hone.config.base import set_path
from hone.errors import TrainError
from hone.runtime import ray_session
from hone.training import open_run, train

__all__ = ["DATA_TASK_CPU", "SWEEP_EXTRA_CPUS", "TRIAL_DRIVER_CPU", "SweepResult", "choose_winner", "format_table", "sweep"]


@dataclass
class SweepResult:
    sweep_dir: Path
    trials: list[dict[str, Any]]
    winner: dict[str, Any] | None
    registered: dict[str, Any] | None


def _domain(d: SearchDomain) -> Any:
    from ray import tune

    kind, value = d.kind, getattr(d, d.kind)
    return {
        "choice": lambda: tune.choice(list(value)),
        "grid": lambda: tune.grid_search(list(value)),
        "uniform": lambda: tune.uniform(*value),
        "loguniform": lambda: tune.loguniform(*value),
        "randint": lambda: tune.randint(*value),
    }[kind]()


def _report_bridge(queue: Any, with_checkpoints: bool) -> Any:
    from ray.train import UserCallback

    class _ReportBridge(UserCallback):
        """Runs in the trial's Ray Train controller: hands each report (and, for PBT, its checkpoint) to the trial."""

        def __init__(self, queue: Any, with_checkpoints: bool):
            self._queue = queue
            self._with_checkpoints = with_checkpoints

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            # The queue holds one item: the run waits while Tune's scheduler decides on this report.
            self._queue.put((dict(metrics[0]), checkpoint.path if checkpoint is not None and self._with_checkpoints else None))

    return _ReportBridge(queue, with_checkpoints)


def _trial(config: dict[str, Any], base: dict[str, Any], sweep_dir: str, sweep_name: str, pbt: bool = False) -> None:
    """One trial: the base job with the sampled values, validated, trained on Ray Train.

    The Train run reports through a queue that this function drains into ``tune.report``; with
    population-based training each checkpoint goes along, and a trial that Tune starts from a
    checkpoint (its own after a pause, or a better trial's with perturbed values) continues from it.
    """
    import threading

    from ray import tune
    from ray.util.queue import Queue

    raw = copy.deepcopy(base)
    for path, value in config.items():
        set_path(raw, path, value, JobConfig)
    job = validate_job(raw, check_paths=False)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(sweep_dir) / "runs" / trial_id
    start = tune.get_checkpoint() if pbt else None
    init = _continue_from(run_dir, start, config) if start is not None else None
    resume = str(run_dir) if init is None and (run_dir / JOB_FILE).exists() else None
    if resume and (history := _finished(run_dir, job)):  # it ended before the sweep stopped, before Tune recorded that
        tune.report({k: v for r in history for k, v in r.items()})
        return
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def run() -> None:
        try:
            # Tracking happens in the sweep driver: a scheduler may stop this trial right after its last report.
            train(None if resume else job, resume=resume, run_dir=None if resume else run_dir, quiet=True,
                  callbacks=[_report_bridge(queue, pbt)], track=False, init_checkpoint=init)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial below
            failure.append(e)
        finally:
            with contextlib.suppress(Exception):  # Tune ends a trial at its final report, and the queue with it
                queue.put(None)

    runner = threading.Thread(target=run, name=f"hone-trial-{trial_id}", daemon=True)
    runner.start()
    while (item := queue.get()) is not None:
        metrics, checkpoint = item
        if checkpoint and init:  # the run has a checkpoint of its own: a restarted worker no longer needs the copy
            shutil.rmtree(init, ignore_errors=True)
            init = None
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)
    runner.join()
    if failure:
        raise failure[0]


def _finished(run_dir: Path, job: JobConfig) -> list[dict[str, Any]]:
    """A trial's records if its run ended: its export (and merged copy) published, then its last step recorded."""
    history, exports = read_metrics(run_dir), (EXPORT_DIR, *([MERGED_DIR] if job.method.is_peft and job.method.merge_adapter else []))
    ended = bool(history) and history[-1]["step"] >= history[-1].get("total_steps", math.inf)
    return history if ended and all((run_dir / d / EXPORT_INFO).exists() for d in exports) else []


def _continue_from(run_dir: Path, checkpoint: Any, config: dict[str, Any]) -> str:
    """Start a PBT trial's next segment from a Tune checkpoint; returns the copy its workers load.

    The previous segment's run directory is kept as ``<trial>.segN``; the new run directory carries
    the trial's history up to the checkpoint's step and ``pbt.json``, the trial's list of restarts
    (step, the trial whose state it continued, the hyperparameters from then on).
    """
    with checkpoint.as_directory() as d:
        step = json.loads((Path(d) / "trainer_state.json").read_text())["step"]
        history, events = [], []
        if run_dir.exists():
            n = 1
            while (previous := run_dir.with_name(f"{run_dir.name}.seg{n}")).exists():
                n += 1
            run_dir.rename(previous)
            for stale in [*previous.glob("checkpoint_*"), previous / "pbt_init"]:  # Tune holds the checkpoints PBT uses
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            history = [m for m in read_metrics(previous) if m["step"] <= step]
            if (previous / "pbt.json").exists():
                events = json.loads((previous / "pbt.json").read_text())
        run_dir.mkdir(parents=True)
        init = run_dir / "pbt_init"
        shutil.copytree(d, init)  # Tune may delete its copy while this run starts (checkpoint_config.num_to_keep)
    donor = re.search(r"_([0-9a-f]{5}_\d{5})", str(Path(checkpoint.path).parent.name))
    events.append({"step": step, "from": donor.group(1) if donor else None, "params": dict(config)})
    (run_dir / "pbt.json").write_text(json.dumps(events, indent=2, default=str))
    for record in history:
        append_metrics(run_dir, record)
    return str(init)


def _scheduler(job: JobConfig, metric: str, mode: str) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = job.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    if t.scheduler == "pbt":
        return _pbt(job, metric, mode)
    max_t = job.training.max_steps or 10**9
    return ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max_t,
                         grace_period=t.grace_period, reduction_factor=t.reduction_factor)


def _pbt(job: JobConfig, metric: str, mode: str) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining

    class _PBT(PopulationBasedTraining):
        """Tune's PBT on training steps, except that a trial's final report is never exploited:
        cloning a finished trial into another would only copy its export."""

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            if result.get("done"):
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    t = job.tune
    assert t is not None and job.training.checkpoint_every is not None  # validated with the job
    mutations = {path: list(getattr(d, d.kind)) if d.kind in ("choice", "grid") else _domain(d)
                 for path, d in t.search_space.items()}
    return _PBT(time_attr="step", metric=metric, mode=mode, hyperparam_mutations=mutations,
                perturbation_interval=t.perturbation_interval or job.training.checkpoint_every,
                quantile_fraction=t.quantile_fraction, synch=t.synch, require_attrs=False)


def _searcher(job: JobConfig, metric: str, mode: str, concurrency: int) -> Any:
    if job.tune.searcher != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Seeded: the same job samples the same trials (a re-run or a pipeline re-run is comparable).
        return BasicVariantGenerator(max_concurrent=concurrency, random_state=job.training.seed)
    if any(d.kind == "grid" for d in job.tune.search_space.values()):
        raise TrainError("tune.searcher: optuna samples points itself; replace grid domains with choice")
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as e:  # pragma: no cover - optuna is a dependency
        raise TrainError("tune.searcher: optuna needs the optuna package (pip install optuna)") from e
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=job.training.seed), max_concurrent=concurrency)


# The trial function only waits on its Train run: a token CPU share, so it never starves its workers. A trial's driver
# builds its Ray datasets with 1-CPU metadata tasks that run outside the trial's placement group: if running trials
# reserved every CPU, a new trial would wait on them forever. A local sweep session needs both beyond one trial's workers.
TRIAL_DRIVER_CPU = 0.01
DATA_TASK_CPU = 1.0
SWEEP_EXTRA_CPUS = TRIAL_DRIVER_CPU + DATA_TASK_CPU


def _concurrency(job: JobConfig) -> int:
    import ray

    per_trial = _trial_cpus(job)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < per_trial + DATA_TASK_CPU:
        raise TrainError(f"the cluster has {cpus:g} CPUs but one trial needs {per_trial:g} "
                         f"({job.distributed.max_workers} workers × {job.distributed.resources_per_worker.get('CPU', 1.0):g} CPU "
                         f"+ {TRIAL_DRIVER_CPU} for the trial driver) and {DATA_TASK_CPU:g} more must stay free for "
                         "the trial's Ray Data tasks; add CPUs or lower distributed.resources_per_worker")
    fits = max(1, int((cpus - DATA_TASK_CPU) // per_trial))
    if job.tune.max_concurrent_trials:
        return min(job.tune.max_concurrent_trials, fits)
    return fits


def _trial_cpus(job: JobConfig) -> float:
    return job.distributed.max_workers * job.distributed.resources_per_worker.get("CPU", 1.0) + TRIAL_DRIVER_CPU


def _trials_table(result_grid: Any, job: JobConfig, sweep_dir: Path) -> list[dict[str, Any]]:
    metric = job.tune.metric
    total = job.training.max_steps
    rows = []
    for r in result_grid:
        match = re.search(r"_([0-9a-f]{5}_\d{5})", Path(r.path).name) if r.path else None
        trial_id = (r.metrics or {}).get("trial_id") or (match.group(1) if match else Path(r.path or "?").name)
        run_dir = sweep_dir / "runs" / str(trial_id)
        # The run's own metrics.jsonl is the record (Tune's may miss results of an interrupted sweep).
        history = read_metrics(run_dir)
        values = [h[metric] for h in history if h.get(metric) is not None]
        last_step = max((h.get("step", 0) for h in history), default=0)
        export = run_dir / "export"
        # PBT: the segments that continued another trial's state (restarts from the trial's own pause are not).
        events = json.loads((run_dir / "pbt.json").read_text()) if (run_dir / "pbt.json").exists() else []
        # (a resumed sweep restarts a clone from the same checkpoint: one clone, its latest parameters)
        clones = list({(e["step"], e["from"]): e for e in events if e.get("from") and e["from"] != str(trial_id)}.values())
        status = "error" if r.error else ("completed" if export.exists() and (not total or last_step >= total) else "stopped early")
        if values and not math.isfinite(values[-1]):
            status = "error"  # diverged: a non-finite metric never wins
        rows.append({
            "trial": trial_id,
            "run_seconds": float((r.metrics or {}).get("time_total_s", 0.0)),
            "params": {k: v for k, v in r.config.items()},
            metric: values[-1] if values else None,
            f"best_{metric}": (min(values) if job.tune.mode == "min" else max(values)) if values else None,
            "steps": last_step,
            "status": status,
            "export": str(export) if export.exists() else None,
            "cloned": [{"step": e["step"], "from": e["from"], "params": e["params"]} for e in clones],
            "history": [{"step": h["step"], metric: h[metric]} for h in history if h.get(metric) is not None],
        })
    rows.sort(key=lambda row: str(row["trial"]))
    return rows


def _write_outputs(rows: list[dict[str, Any]], job: JobConfig, sweep_dir: Path) -> None:
    metric = job.tune.metric
    paths = list(job.tune.search_space)
    (sweep_dir / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    with open(sweep_dir / "trials.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", *paths, metric, f"best_{metric}", "steps", "status", "export"])
        for row in rows:
            w.writerow([row["trial"], *[row["params"].get(p) for p in paths], row[metric], row[f"best_{metric}"], row["steps"],
                        row["status"], row["export"]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        xs = [h["step"] for h in row["history"]]
        ys = [h[metric] for h in row["history"]]
        style = "--" if row["status"] != "completed" else "-"
        label = f"{row['trial']} ({row['status']})"
        ax.plot(xs, ys, style, marker="o", label=label)
        if xs and row["status"] != "completed":
            ax.plot(xs[-1], ys[-1], "x", color="black", markersize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{job.name}: {metric} per trial (× = stopped early)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sweep_dir / "metric_vs_step.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, max(1, len(paths)), figsize=(4.5 * max(1, len(paths)), 4), squeeze=False)
    for ax, path in zip(axes[0], paths):
        points = [(row["params"].get(path), row[metric]) for row in rows if row[metric] is not None]
        log = job.tune.search_space[path].kind == "loguniform"
        for (x, y), row in zip(points, [r for r in rows if r[metric] is not None]):
            ax.scatter([x], [y], marker="o" if row["status"] == "completed" else "x")
        ax.set(xscale="log" if log else "linear", xlabel=path, ylabel=f"final {metric}")
    fig.suptitle(f"{job.name}: searched parameters vs {metric} (x = stopped early)")
    fig.tight_layout()
    fig.savefig(sweep_dir / "params_vs_metric.png", dpi=110)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]], job: JobConfig, winner: dict[str, Any] | None) -> str:
    metric = job.tune.metric
    paths = list(job.tune.search_space)
    header = ["trial", *paths, metric, "steps", "status"]
    body = []
    for row in rows:
        cells = [str(row["trial"]) + (" *" if winner and row["trial"] == winner["trial"] else "")]
        for p in paths:
            v = row["params"].get(p)
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        status = row["status"] + "".join(f", cloned {c['from']} at step {c['step']}" for c in row.get("cloned", []))
        cells += [f"{row[metric]:.5g}" if row[metric] is not None else "-", str(row["steps"]), status]
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def choose_winner(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best completed trial by ``metric`` among those whose value is finite (a NaN would otherwise win or lose
    by accident: ``min`` over a list that starts with NaN returns NaN); None when there is none."""
    finite = [r for r in rows if r["status"] == "completed" and r[metric] is not None and math.isfinite(r[metric])]
    if not finite:
        return None
    return min(finite, key=lambda r: r[metric]) if mode == "min" else max(finite, key=lambda r: r[metric])


def sweep(
    job: JobConfig | None = None,
    *,
    resume: str | None = None,
    address: str | None = None,
    storage_path: str | None = None,
    register: bool = True,
) -> SweepResult:
    """Run (or resume) a sweep; returns the trials, the winner and its registry entry."""
    from ray import tune

    from hone import registry

    if not resume and job is not None and (job.tune is None or not job.tune.search_space):
        raise TrainError(f"job {job.name!r} has no tune.search_space to search")
    job, sweep_dir = open_run(job, resume, storage_path, what="sweep")
    assert job.tune is not None
    metric, mode = job.tune.metric, job.tune.mode
    base = job.to_dict()
    base["tune"] = None
    base["training"]["storage_path"] = str(sweep_dir / "runs")
    name = sweep_dir.name
    pbt = job.tune.scheduler == "pbt"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, sweep_dir=str(sweep_dir), sweep_name=name, pbt=pbt), {"CPU": TRIAL_DRIVER_CPU}
    )
    if pbt:
        random.seed(job.training.seed)  # PBT's exploit/explore draws use the random module

    # Trials report every training.log_every steps and evaluate every eval_every: reports without the metric
    # are normal (ASHA decides on those that carry it), so Tune must not reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    remote = storage.uri_of(sweep_dir)
    sync_up(sweep_dir, JOB_FILE)
    tune_dir = storage.join(remote or str(sweep_dir), "tune")  # Tune's experiment state: in the object store with the sweep
    with ray_session(job, address, extra_cpus=SWEEP_EXTRA_CPUS):
        started = time.time()
        _prepare_data(job, sweep_dir)
        if resume and tune.Tuner.can_restore(storage.join(tune_dir, "sweep")):
            print(f"[hone] resuming sweep {name}: finished trials are kept, unfinished ones continue", flush=True)
            tuner = tune.Tuner.restore(storage.join(tune_dir, "sweep"), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={path: _domain(d) for path, d in job.tune.search_space.items()},
                tune_config=tune.TuneConfig(
                    num_samples=job.tune.num_samples,
                    scheduler=_scheduler(job, metric, mode),
                    search_alg=_searcher(job, metric, mode, _concurrency(job)),
                    reuse_actors=False,
                ),
                run_config=tune.RunConfig(
                    name="sweep",
                    storage_path=tune_dir,
                    verbose=1,
                    failure_config=tune.FailureConfig(max_failures=0),
                    # PBT clones from the latest checkpoint; Tune keeps three per trial.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=3) if pbt else None,
                ),
            )
        result_grid = tuner.fit()
        wall = time.time() - started
    if remote:  # trials ran on any node and wrote to the store: bring their records here
        trials = sorted({rel.split("/", 1)[0] for rel, _, _ in storage.list_files(storage.join(remote, "runs")) if "/" in rel})
        for trial in trials:
            sync_down(sweep_dir / "runs" / trial, JOB_FILE, METRICS_FILE, "hone-run.json", EXPORT_DIR)
    rows = _trials_table(result_grid, job, sweep_dir)
    done = [r for r in rows if r["status"] == "completed" and r[metric] is not None]
    winner = choose_winner(rows, metric, mode)
    if winner is None:
        print(f"[hone] no trial of {name} completed with a finite {metric}: nothing is registered "
              f"(see {sweep_dir}/trials.csv)", flush=True)
    _write_outputs(rows, job, sweep_dir)
    registered = None
    if register:
        for row in done:
            row["mlflow_run_id"] = _track_trial(sweep_dir / "runs" / str(row["trial"]), name, str(row["trial"]))
    if winner and register:
        model_name = job.tune.registered_model or job.name
        reg = registry.register_winner(model_name, winner["mlflow_run_id"], Path(winner["export"]), metric, winner[metric], sweep=name)
        print(f"[hone] {registry.describe(reg, metric, winner[metric])}", flush=True)
        registered = {"name": model_name, "version": reg.version, "ref": f"models:/{model_name}/{reg.version}",
                      "alias": reg.alias, "alias_version": reg.alias_version, "alias_moved": reg.alias_moved}
    trial_time = sum(r["run_seconds"] for r in rows)
    summary = {
        "sweep": name,
        "metric": metric,
        "mode": mode,
        "wall_s": wall,
        "trials_run_s": trial_time,
        "winner": winner and {k: winner[k] for k in ("trial", "params", metric, "export")},
        "registered": registered,
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    sync_up(sweep_dir, "sweep.json", *(p.name for p in sweep_dir.iterdir() if p.is_file()))
    return SweepResult(sweep_dir, rows, winner, registered)


def _prepare_data(job: JobConfig, sweep_dir: Path) -> None:
    """Tokenise the sweep's data once, before the trials start, into the cache they share (a trial whose searched
    values change the data builds its own entry)."""
    from hone.data import cache_root, load_tokenizer, prepare_cached, tokenizer_digest

    tokenizer = load_tokenizer(job)
    root = cache_root(storage.uri_of(sweep_dir / "runs") or str(sweep_dir / "runs"))
    data = prepare_cached(job, tokenizer, tokenizer_digest(tokenizer), root)
    print(f"[hone] data ({'cached' if data.hit else 'tokenised on Ray Data'}): {data.rows.get('train', 0)} training rows", flush=True)


def _track_trial(run_dir: Path, sweep_name: str, trial: str) -> str:
    """Log a finished trial's run to MLflow (once: the id is kept in the run directory)."""
    from hone import registry

    marker = run_dir / "mlflow_run_id"
    if marker.exists():
        return marker.read_text().strip()
    job = load_job(run_dir / JOB_FILE, check_paths=False)
    history = read_metrics(run_dir)
    run_id = registry.log_run(job, run_dir, run_dir / EXPORT_DIR, history, history[-1] if history else {},
                              experiment=f"hone/{sweep_name}", extra_tags={"hone.sweep": sweep_name, "hone.trial": trial})
    marker.write_text(run_id)
    return run_id
