"""The per-worker training loop Ray Train runs, and the export its last step writes.

Each worker builds the model and engine, then steps through the run's :class:`~hone.training.plan.Schedule`.
A checkpoint holds the engine state (module, optimizer, scheduler), the step and every rank's RNG
state. The last step writes a Hugging Face export (full weights gathered under ZeRO-3, or a PEFT
adapter, optionally merged) with ``hone.json`` describing it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hone import storage
from hone.artifacts import EXPORT_DIR, EXPORT_INFO, MERGED_DIR, TOKENIZER_DIR, publish_dir
from hone.config import JobConfig, metric_mode
from hone.runtime import worker_setup_hook
from hone.training.checkpoints import candidates, intact, write_checkpoint
from hone.training.plan import rng_state, schedule, seed_all, set_rng_state

__all__ = ["nonfinite_step", "train_loop"]

_PEAK_FLOPS = {  # dense bf16 TFLOP/s per GPU, for MFU
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "V100": 125e12,
}


@dataclass
class _State:
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    world_size: int = 1
    skipped_steps: int = 0


def nonfinite_step(loss: float, grad_norm: float | None, applied: bool, all_reduce: Any) -> dict[str, Any] | None:
    """Whether any rank saw a non-finite loss or gradient norm at this step (every rank gets the same answer).

    Returns None for a healthy step, else what was seen: ``reason``, ``loss``, ``grad_norm`` (this rank's)
    and ``applied`` (whether an optimizer applied the update anyway).
    """
    import torch

    flags = torch.tensor([not math.isfinite(loss), grad_norm is not None and not math.isfinite(grad_norm), applied], dtype=torch.float64)
    seen = all_reduce(flags)
    if not (seen[0] or seen[1]):
        return None
    what = " and ".join(name for name, hit in (("loss", seen[0]), ("gradient norm", seen[1])) if hit)
    return {"reason": f"non-finite {what}", "loss": loss, "grad_norm": grad_norm, "applied": bool(seen[2] > 0)}


def _intact_checkpoint(dirs: list[str], rank: int, all_reduce: Any) -> str:
    """The newest of ``dirs`` that every rank finds complete and unchanged (all ranks agree, then all load it)."""
    import torch

    for i, d in enumerate(dirs):
        ok, why = intact(d, rank)
        if not float(all_reduce(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64))[0]):
            return d
        if not ok:
            print(f"[hone] WARNING: checkpoint {d} is incomplete or corrupt on rank {rank} ({why})", flush=True)
        if rank == 0:
            nxt = dirs[i + 1] if i + 1 < len(dirs) else None
            print(f"[hone] WARNING: not resuming from {d}: " + (f"falling back to the previous checkpoint {nxt}" if nxt
                  else "no earlier checkpoint is left"), flush=True)
    raise RuntimeError(f"no intact checkpoint to resume from (tried {', '.join(dirs)}): start the run again")


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def _export(engine: Any, job: JobConfig, run_dir: Path, run_uri: str | None, rank: int, metrics: dict[str, Any],
            workers: list[dict[str, Any]]) -> None:
    """Write the Hugging Face export (every rank calls: ZeRO-3 gathers collectively) into the run, or, for a run in
    object storage, upload it there (``hone.json`` last: a folder without it is not an export)."""
    state = engine.full_state_dict()
    if rank != 0:
        return
    from hone.artifacts import resolve_ref
    from hone.modeling import load_model

    hf = engine.hf_module
    staging = Path(tempfile.mkdtemp(prefix="hone-export-"))
    try:
        tokenizer_dir = run_dir / TOKENIZER_DIR
        if run_uri and not tokenizer_dir.is_dir():  # rank 0 on a node that shares nothing with the driver
            tokenizer_dir = storage.download(storage.join(run_uri, TOKENIZER_DIR), staging / TOKENIZER_DIR)
        out = staging / EXPORT_DIR
        hf.save_pretrained(out, state_dict=state, safe_serialization=True)
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, out / f.name)
        info = {
            "kind": "adapter" if job.method.is_peft else "model",
            "base_model": job.model.name,
            "method": job.method.type,
            "task": job.task.type,
            "objective": job.preference.loss if job.preference else "grpo" if job.grpo else "sft",
            "zero_stage": job.distributed.deepspeed.stage if job.distributed.deepspeed else None,
            "num_workers": len(workers),
            "workers": workers,
            "metrics": metrics,
            "job": job.to_dict(),
        }
        (out / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
        dirs = [EXPORT_DIR]
        if job.method.is_peft and job.method.merge_adapter:
            merged, _ = load_model(resolve_ref(str(out)), merge_adapter=True)
            merged.save_pretrained(staging / MERGED_DIR, safe_serialization=True)
            for f in tokenizer_dir.iterdir():
                shutil.copy2(f, staging / MERGED_DIR / f.name)
            ((staging / MERGED_DIR) / EXPORT_INFO).write_text(json.dumps({**info, "kind": "merged-model"}, indent=2, default=str))
            dirs.append(MERGED_DIR)
        for name in dirs:
            if run_uri:
                for f in sorted((staging / name).iterdir(), key=lambda f: f.name == EXPORT_INFO):
                    storage.upload(f, storage.join(run_uri, name, f.name))
                continue
            # copied next to the run (same filesystem), then swapped in: never a half-written export
            partial = run_dir / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(staging / name, partial)
            publish_dir(partial, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by Ray Train."""
    worker_setup_hook()  # also when the Ray session was not started by hone
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from hone.data import CachedSplit, local_entry
    from hone.modeling import build_model
    from hone.training.engines import make_engine, universal_checkpoint
    from hone.training.objectives import Objective

    job = JobConfig.model_validate(config["job"], context={"check_paths": False})
    run_dir = Path(config["run_dir"])
    pad_id = config["pad_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.distributed.resources_per_worker.get("CPU", 1))))
    t = job.training

    entry = local_entry(config["data"]["location"], config["data"]["key"])  # memory-mapped: rows are built per micro-batch
    train_rows = CachedSplit(entry, "train")
    val_rows = CachedSplit(entry, "validation").all() if config["has_validation"] else []
    sched = schedule(job, len(train_rows), world)
    total = config["total_steps"]

    seed_all(t.seed)  # identical new weights (adapters, heads) on every rank
    model = build_model(job, total_steps=total)
    engine = make_engine(job, model, world, total)
    seed_all(t.seed + 1000 * (rank + 1))  # per-rank dropout streams
    device = engine.device

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        y = x.to(device) if device.type == "cuda" else x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.cpu()

    if job.grpo is not None:
        from hone.training.grpo import GRPOObjective

        objective: Any = GRPOObjective(job, engine, pad_id, world, all_reduce, rank, config["rollout_pool"])
    else:
        objective = Objective(job, engine, pad_id, world, all_reduce)
    workers = [None] * world
    dist.all_gather_object(
        workers, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": os.uname().nodename, "pid": os.getpid()}
    )

    state = _State(world_size=world)
    checkpoint = ray.train.get_checkpoint()
    # A run's own checkpoints come first; ``init_checkpoint`` (another run's state that population-based
    # training continues with perturbed hyperparameters) only starts a run that has none yet.
    cloned = checkpoint is None and bool(config.get("init_checkpoint"))
    if cloned:
        checkpoint = ray.train.Checkpoint.from_directory(config["init_checkpoint"])
    if checkpoint is not None:
        with checkpoint.as_directory() as latest:
            d = _intact_checkpoint(candidates(latest, None if cloned else run_dir), rank, all_reduce)
            saved = json.loads((Path(d) / "trainer_state.json").read_text())
            resized = saved["world_size"] != world
            if resized and not job.distributed.elastic:
                raise RuntimeError(
                    f"checkpoint was written by {saved['world_size']} workers, this run has {world}; "
                    "resume with the same distributed.num_workers (or make it elastic: [min, max])"
                )
            if resized and job.distributed.deepspeed is not None and job.distributed.deepspeed.stage > 0:
                if ctx.get_local_rank() == 0:  # one conversion per node (per filesystem), the node's ranks wait
                    universal_checkpoint(d)
                dist.barrier()
            engine.load(d, resized=resized)
            state = _State(**{**saved, "world_size": world})
            if (Path(d) / f"rng_rank{rank}.pt").exists():
                set_rng_state(torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=False))
        if cloned:
            engine.retarget(t.lr, t.weight_decay)
        if rank == 0:
            print(f"[hone] {'continued' if cloned else 'resumed'} at step {state.step}/{total} from {d}"
                  + (f" on {world} worker(s) (was {saved['world_size']}), {sched.grad_accum} micro-batch(es) each" if resized else ""),
                  flush=True)

    objective.start(state.step, train_rows)  # online objectives: the rollout engines get these weights
    metric = t.eval_metric if val_rows else "loss"
    mode = metric_mode(metric)
    autocast = getattr(engine, "autocast", None)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.hf_module.parameters())
    peak_flops = _peak_flops()
    window = torch.zeros(4, dtype=torch.float64)  # loss sum, steps, tokens, samples
    stats_window = torch.zeros(objective.n_stats, dtype=torch.float64)  # the objective's own sums (preference rewards …)
    window_time = 0.0
    last_loss = float("nan")
    skipped = 0  # consecutive steps discarded for a non-finite loss or gradient norm
    engine.module.train()

    def eval_now() -> dict[str, float]:
        return objective.evaluate(val_rows, t.batch_size, rank)

    if cloned and (state.step >= total or state.stopped_early):
        # Continued from a finished run's final state: nothing left to train, so this run ends as
        # its copy (evaluated and exported here, so every trial of a sweep has its own export).
        final = {
            "step": state.step,
            "total_steps": total,
            "epoch": state.step / sched.steps_per_epoch,
            "lr": engine.lr,
            **(eval_now() if val_rows else {}),
            "done": True,
            "stopped_early": state.stopped_early,
        }
        if state.best is not None:
            final["best_" + metric] = state.best
        _export(engine, job, run_dir, config.get("run_uri"), rank,
                {k: v for k, v in final.items() if isinstance(v, (int, float, bool))}, workers)
        ray.train.report(final)
        return

    initial: dict[str, Any] = {}
    if t.eval_on_start and val_rows and state.step == 0:
        initial = {"initial_" + k: v for k, v in eval_now().items()}
        if rank == 0:
            print("[hone] before training: " + ", ".join(f"{k[8:]} {v:.4g}" for k, v in initial.items()), flush=True)
    while state.step < total and not state.stopped_early:
        start = time.perf_counter()
        step_sums = torch.zeros(4, dtype=torch.float64)  # loss, steps, tokens, samples
        step_stats = torch.zeros(objective.n_stats, dtype=torch.float64)
        for micro in range(sched.grad_accum):
            rows = train_rows.take(sched.micro_rows(state.step, micro, rank))
            torch.manual_seed(sched.micro_seed(state.step, micro, rank))  # dropout: the micro-batch's stream, on any worker
            batch = objective.batch(rows)
            with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                loss, stats = objective.loss(batch)
            engine.train_micro(loss)
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            step_sums += torch.tensor([float(loss.detach()) / sched.grad_accum, 0, tokens, len(rows)], dtype=torch.float64)
            if stats is not None:
                step_stats += stats
        step_sums[1] = 1
        step_stats += objective.after_step(state.step + 1)  # GRPO: the weight sync, timed with the step
        window_time += time.perf_counter() - start
        state.step += 1
        bad = nonfinite_step(float(step_sums[0]), engine.grad_norm, engine.step_applied, all_reduce)
        if bad is not None:
            skipped += 1
            if t.on_nonfinite == "stop" or skipped > t.max_skipped_steps or bad["applied"]:
                diverged = {"step": state.step, "total_steps": total, "diverged": True, "done": True, **bad,
                            "skipped_steps": state.skipped_steps, "on_nonfinite": t.on_nonfinite}
                ray.train.report(diverged)  # every rank, then every rank stops: nothing exported, no checkpoint
                return
            state.skipped_steps += 1
            if rank == 0:
                print(f"[hone] step {state.step}: {bad['reason']}; update skipped ({skipped} in a row, "
                      f"at most {t.max_skipped_steps})", flush=True)
        else:
            skipped = 0
            window += step_sums
            stats_window += step_stats
        last = state.step == total
        do_ckpt = last or bool(t.checkpoint_every and state.step % t.checkpoint_every == 0)
        do_eval = bool(val_rows) and (last or do_ckpt or bool(t.eval_every and state.step % t.eval_every == 0))
        do_log = last or do_eval or do_ckpt or state.step % t.log_every == 0
        if not do_log:
            continue
        summed = all_reduce(window)
        steps = float(window[1])
        if steps:  # a window of skipped steps only reports the last healthy loss
            last_loss = float(summed[0] / (steps * world))
        metrics: dict[str, Any] = {
            "step": state.step,
            "total_steps": total,
            "epoch": state.step / sched.steps_per_epoch,
            "loss": last_loss,
            "lr": engine.lr,
            "grad_norm": engine.grad_norm,
            "tokens_per_s": float(summed[2]) / window_time,
            "samples_per_s": float(summed[3]) / window_time,
            "step_time_s": window_time / max(steps, 1.0),
            "peak_memory_mb": _peak_memory_mb(),
            "workers": world,
        }
        if objective.n_stats:
            metrics.update(objective.metrics(all_reduce(stats_window)))
        if state.skipped_steps:
            metrics["skipped_steps"] = state.skipped_steps
        metrics.update(initial)
        initial = {}
        if peak_flops:
            metrics["mfu"] = 6 * n_params * float(summed[2]) / window_time / (peak_flops * world)
        window.zero_()
        stats_window.zero_()
        window_time = 0.0
        if do_eval:
            metrics.update(eval_now())
        if do_eval or (do_ckpt and not val_rows):
            value = metrics[metric]
            better = state.best is None or (value < state.best if mode == "min" else value > state.best)
            if better:
                state.best, state.best_step, state.evals_since_best = value, state.step, 0
            else:
                state.evals_since_best += 1
            if t.early_stopping_patience and state.evals_since_best >= t.early_stopping_patience and not last:
                state.stopped_early = True
                do_ckpt = True
                if rank == 0:
                    print(
                        f"[hone] early stopping at step {state.step}: {metric} has not improved for "
                        f"{state.evals_since_best} evaluations (best {state.best:.5g} at step {state.best_step})",
                        flush=True,
                    )
            metrics["best_" + metric] = state.best
        final = last or state.stopped_early
        metrics["done"] = final
        if final:
            metrics["stopped_early"] = state.stopped_early
            _export(engine, job, run_dir, config.get("run_uri"), rank,
                    {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}, workers)
        report_checkpoint = None
        tmp = None
        if do_ckpt:
            def write(folder: Path) -> None:
                engine.save(str(folder))
                torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
                if rank == 0:
                    (folder / "trainer_state.json").write_text(json.dumps(asdict(state)))

            tmp = write_checkpoint(rank, write)
            report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=report_checkpoint)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
