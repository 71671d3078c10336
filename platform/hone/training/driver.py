"""``hone train``: a fine-tuning run on Ray Train with DeepSpeed ZeRO (or DDP).

The driver validates the job, has the data tokenised on Ray Data into the run storage's cache (or reuses the cached
entry: :func:`hone.data.prepare_cached`), and runs a ``TorchTrainer`` (workers: :func:`hone.training.loop.train_loop`,
which read the cache memory-mapped) on the local embedded Ray or an existing cluster, with a fixed or an elastic
number of workers. The run directory's layout is :mod:`hone.artifacts`'; with object storage (``s3://…``) the run
lives there and the driver works in its local mirror.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hone import storage
from hone.artifacts import EXPORT_DIR, INPUTS_FILE, JOB_FILE, MERGED_DIR, TOKENIZER_DIR, read_metrics, sync_up
from hone.config import JobConfig, metric_mode
from hone.errors import TrainError
from hone.runtime import ray_log_level, ray_session
from hone.training.loop import train_loop
from hone.training.objective import objective_class
from hone.training.plan import total_steps
from hone.training.progress import ProgressPrinter, progress_callback
from hone.training.runs import check_inputs, open_run

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    export_dir: Path | None
    merged_dir: Path | None
    metrics: dict[str, Any]
    checkpoint: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None


def train(job: JobConfig | None = None, *, resume: str | None = None, address: str | None = None,
          storage_path: str | None = None, quiet: bool = False, run_dir: Path | None = None,
          callbacks: list[Any] | None = None, track: bool | None = None, experiment: str | None = None,
          extra_tags: dict[str, str] | None = None, init_checkpoint: str | None = None) -> TrainResult:
    """Run (or resume) a training job and return where its export is.

    ``run_dir`` pins the run directory (sweep trials); ``callbacks`` are extra Ray Train
    callbacks (Tune's report bridge); ``track`` logs the finished run to MLflow (default on,
    ``HONE_MLFLOW=0`` turns it off); ``init_checkpoint`` starts the run from another run's
    checkpoint directory with this job's learning rate and weight decay (population-based training).
    """
    from hone.data import cache_root, prepare_cached

    job, run_dir = open_run(job, resume, storage_path, run_dir=run_dir)
    if resume:
        print(f"[hone] resuming run {run_dir.name} from {run_dir}", flush=True)
    recipe = objective_class(job)
    tokenizer, digest = _record_inputs(job, run_dir, recipe, resume=bool(resume))
    remote = storage.uri_of(run_dir)
    root = storage.uri_of(run_dir.parent) or str(run_dir.parent)  # runs (and a sweep's trials) share the data cache

    with ray_session(job, address):
        started = time.time()
        data = prepare_cached(job, tokenizer, digest, cache_root(root))
        if not quiet:
            how = "cached" if data.hit else f"tokenised on Ray Data in {time.time() - started:.1f} s"
            print(f"[hone] data ({how}, {data.location}):\n{data.report}", flush=True)
        steps = total_steps(job, data.rows["train"])
        if not quiet:
            d = job.distributed
            print(f"[hone] run {run_dir.name}: {steps} steps, {d.workers_text()} worker(s), "
                  f"{'ZeRO-' + str(d.deepspeed.stage) if d.deepspeed else 'DDP'}, {job.precision}; run dir {remote or run_dir}", flush=True)
        loop_config = {"job": job.to_dict(), "run_dir": str(run_dir), "run_uri": remote, "pad_id": tokenizer.pad_token_id,
                       "total_steps": steps, "has_validation": data.rows.get("validation", 0) > 0,
                       "init_checkpoint": init_checkpoint, "data": {"location": data.location, "key": data.key, "rows": data.rows}}
        with recipe.resources(job, run_dir, quiet) as extras, ProgressPrinter(run_dir, steps, quiet):
            trainer = _trainer(job, run_dir, {**loop_config, "objective_extras": extras}, callbacks)
            started = time.time()
            try:
                result = trainer.fit()
            except Exception as e:  # Ray wraps worker errors; keep the cause visible
                raise TrainError(f"training run {run_dir.name} failed: {e}\n"
                                 f"resume it with: hone train --resume {remote or run_dir}") from e
            fit_seconds = time.time() - started
    return _finish(job, run_dir, result, fit_seconds, track=track, experiment=experiment, extra_tags=extra_tags)


def _record_inputs(job: JobConfig, run_dir: Path, recipe: Any, *, resume: bool) -> tuple[Any, str]:
    """(the job's tokenizer, its digest), with the data and tokenizer fingerprints recorded in a new run (a resumed one
    must find them unchanged) and the tokenizer saved beside them; the objective checks the data first."""
    from hone.data import dataset_fingerprint, load_tokenizer, tokenizer_digest

    tokenizer = load_tokenizer(job)
    recipe.check(job, tokenizer)  # bad pairs, labels, reward columns refused before any Ray work
    digest = tokenizer_digest(tokenizer)
    inputs = {"data": dataset_fingerprint(job), "tokenizer": digest}
    if resume:
        check_inputs(run_dir, inputs)
    else:
        (run_dir / INPUTS_FILE).write_text(json.dumps(inputs))
    if not (run_dir / TOKENIZER_DIR).exists():
        tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)
    sync_up(run_dir, JOB_FILE, INPUTS_FILE, TOKENIZER_DIR)
    return tokenizer, digest


def _trainer(job: JobConfig, run_dir: Path, loop_config: dict[str, Any], callbacks: list[Any] | None) -> Any:
    """The run's ``TorchTrainer``: its workers, where Ray Train keeps its state (the run's storage), its failure and
    checkpoint policies."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d = job.distributed
    remote = loop_config["run_uri"]
    parent = storage.uri_of(run_dir.parent)
    metric = job.training.eval_metric if loop_config["has_validation"] else "loss"
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=d.num_workers if d.elastic else d.max_workers, use_gpu=d.use_gpu,
                                     resources_per_worker=dict(d.resources_per_worker), placement_strategy=d.placement_strategy,
                                     **({"elastic_resize_monitor_interval_s": _resize_interval()} if d.elastic else {})),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=storage.filesystem(parent)[1] if remote else str(run_dir.parent),
            storage_filesystem=storage.filesystem(parent)[0] if remote else None,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.training.keep_checkpoints, checkpoint_score_attribute=metric,
                                               checkpoint_score_order=metric_mode(metric)),
            callbacks=[progress_callback(run_dir), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level=ray_log_level()),
        ),
    )


def _finish(job: JobConfig, run_dir: Path, result: Any, fit_seconds: float, *, track: bool | None, experiment: str | None,
            extra_tags: dict[str, str] | None) -> TrainResult:
    """After the fit: refuse a diverged run, bring an object-store run's export here, log the run to MLflow and
    record how it went (``hone-run.json``)."""
    history = read_metrics(run_dir)
    if history and history[-1].get("diverged"):  # (Ray Train's result carries the last checkpoint's metrics)
        raise TrainError(_diverged_message(run_dir, history[-1], history))
    metrics = dict(result.metrics or {})
    export = run_dir / EXPORT_DIR
    merged = run_dir / MERGED_DIR
    remote = storage.uri_of(run_dir)
    if remote:  # the workers wrote the export to the store: keep a local copy for the stages that follow
        for name, local in ((EXPORT_DIR, export), (MERGED_DIR, merged)):
            if storage.exists(storage.join(remote, name, "hone.json")):
                storage.download(storage.join(remote, name), local)
    mlflow_run_id = None
    if (track if track is not None else os.environ.get("HONE_MLFLOW", "1") != "0") and export.exists():
        from hone.registry import log_run

        mlflow_run_id = log_run(job, run_dir, export, history, metrics, experiment=experiment, extra_tags=extra_tags)
    (run_dir / "hone-run.json").write_text(json.dumps({"mlflow_run_id": mlflow_run_id, "fit_seconds": fit_seconds,
                                                        "metrics": metrics, "export": str(export) if export.exists() else None},
                                                       indent=2, default=str))
    sync_up(run_dir, "hone-run.json")
    return TrainResult(run_dir, export if export.exists() else None, merged if merged.exists() else None,
                       metrics, result.checkpoint.path if result.checkpoint else None, history, mlflow_run_id)


def _resize_interval() -> float:
    """How often an elastic run looks for room to grow (``HONE_ELASTIC_RESIZE_S``, default Ray's 60 s)."""
    return float(os.environ.get("HONE_ELASTIC_RESIZE_S", "60"))


def _diverged_message(run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """What a run stopped for a non-finite loss or gradient norm says: where, why, and what is left."""
    good = [m["checkpoint"] for m in history if m.get("checkpoint") and not m.get("diverged")]
    why = metrics.get("reason", "non-finite values")
    if metrics.get("on_nonfinite") == "skip_step":
        why += (" and the optimizer applied the update" if metrics.get("applied")
                else f" after {metrics.get('skipped_steps', 0)} skipped step(s), more in a row than training.max_skipped_steps allows")
    last = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before it"
    return (f"training run {run_dir.name} diverged at step {metrics['step']}/{metrics.get('total_steps', '?')}: {why} "
            f"(loss {metrics.get('loss')}, grad norm {metrics.get('grad_norm')}); nothing was exported or registered; {last}. "
            "Lower training.lr, set training.max_grad_norm, or check the data; training.on_nonfinite: skip_step "
            "discards such steps instead")
