"""The per-worker training loop Ray Train runs: it orchestrates, the objective (:mod:`hone.training.objective`)
decides what a step optimises.

Each worker builds the model, the backend (DeepSpeed or DDP) and the job's objective, restores the run's state (or
another run's, for population-based training), then steps through the run's :class:`~hone.training.plan.Schedule`,
logging, evaluating, checkpointing and stopping early as the job says. A checkpoint holds the backend's state (module,
optimizer, scheduler), the step and every rank's RNG state. The last step writes the export
(:mod:`hone.training.export`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hone.config import JobConfig, metric_mode
from hone.runtime import worker_setup_hook
from hone.training.backends import universal_checkpoint
from hone.training.checkpoints import candidates, intact, write_checkpoint
from hone.training.export import write_export
from hone.training.plan import load_rng_state, save_rng_state, schedule, seed_all

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


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by Ray Train."""
    worker_setup_hook()  # also when the Ray session was not started by hone
    run = _Run(config)
    run.restore()
    run.objective.start(run.state.step, run.train_rows)  # online objectives: the rollout engines get these weights
    if run.cloned and (run.state.step >= run.total or run.state.stopped_early):
        run.end_as_copy()
    else:
        run.train()


class _Run:
    """One worker's share of a run: what it built, where it stands, and the window of steps since the last log."""

    def __init__(self, config: dict[str, Any]):
        import ray
        import ray.train
        import torch
        import torch.distributed as dist

        from hone.data import CachedSplit, local_entry
        from hone.modeling import build_model
        from hone.training.backends import make_backend
        from hone.training.objective import WorkerContext, objective_class

        self.config = config
        self.job = job = JobConfig.model_validate(config["job"], context={"check_paths": False})
        self.run_dir = Path(config["run_dir"])
        self.ctx = ray.train.get_context()
        self.rank, self.world = rank, world = self.ctx.get_world_rank(), self.ctx.get_world_size()
        torch.set_num_threads(max(1, int(job.distributed.resources_per_worker.get("CPU", 1))))
        self.t = t = job.training

        entry = local_entry(config["data"]["location"], config["data"]["key"])  # memory-mapped: rows built per micro-batch
        self.train_rows = CachedSplit(entry, "train")
        self.val_rows = CachedSplit(entry, "validation").all() if config["has_validation"] else []
        self.sched = schedule(job, len(self.train_rows), world)
        self.total = config["total_steps"]

        seed_all(t.seed)  # identical new weights (adapters, heads) on every rank
        recipe = objective_class(job)
        self.passes = recipe.passes(job)
        self.backend = make_backend(job, build_model(job, total_steps=self.total), world, self.total * self.passes)
        seed_all(t.seed + 1000 * (rank + 1))  # per-rank dropout streams
        self.device = self.backend.device
        self.objective_name = recipe.label(job)
        self.objective = recipe(WorkerContext(job, self.backend, config["pad_id"], rank, world, self.all_reduce,
                                              config.get("objective_extras") or {}))
        self.workers: list[Any] = [None] * world
        dist.all_gather_object(self.workers, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                              "hostname": os.uname().nodename, "pid": os.getpid()})
        self.state = _State(world_size=world)
        self.cloned = False
        self.metric = t.eval_metric if self.val_rows else "loss"

    def all_reduce(self, x: Any) -> Any:
        import torch.distributed as dist

        y = x.to(self.device) if self.device.type == "cuda" else x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.cpu()

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[hone] {text}", flush=True)

    # ------------------------------------------------------------------ state
    def restore(self) -> None:
        """Load the run's newest intact checkpoint; a run with none that population-based training continues from
        another run's state (``init_checkpoint``) takes that one with this trial's hyperparameters."""
        import ray.train
        import torch.distributed as dist

        checkpoint = ray.train.get_checkpoint()
        self.cloned = checkpoint is None and bool(self.config.get("init_checkpoint"))
        if self.cloned:
            checkpoint = ray.train.Checkpoint.from_directory(self.config["init_checkpoint"])
        if checkpoint is None:
            return
        with checkpoint.as_directory() as latest:
            d = _intact_checkpoint(candidates(latest, None if self.cloned else self.run_dir), self.rank, self.all_reduce)
            saved = json.loads((Path(d) / "trainer_state.json").read_text())
            resized = saved["world_size"] != self.world
            if resized and not self.job.distributed.elastic:
                raise RuntimeError(
                    f"checkpoint was written by {saved['world_size']} workers, this run has {self.world}; "
                    "resume with the same distributed.num_workers (or make it elastic: [min, max])"
                )
            ds = self.job.distributed.deepspeed
            if resized and ds is not None and ds.stage > 0:
                if self.ctx.get_local_rank() == 0:  # one conversion per node (per filesystem), the node's ranks wait
                    universal_checkpoint(d)
                dist.barrier()
            self.backend.load(d, resized=resized)
            self.state = _State(**{**saved, "world_size": self.world})
            if (Path(d) / f"rng_rank{self.rank}.pt").exists():
                load_rng_state(Path(d) / f"rng_rank{self.rank}.pt")
        if self.cloned:
            self.backend.retarget(self.job)
        self.say(f"{'continued' if self.cloned else 'resumed'} at step {self.state.step}/{self.total} from {d}"
                 + (f" on {self.world} worker(s) (was {saved['world_size']}), {self.sched.grad_accum} micro-batch(es) each"
                    if resized else ""))

    def evaluate(self) -> dict[str, float]:
        return self.objective.evaluate(self.val_rows, self.t.batch_size, self.rank)

    def end_as_copy(self) -> None:
        """Continued from a finished run's final state: nothing left to train, so this run ends as its copy (evaluated
        and exported here, so every trial of a sweep has its own export)."""
        import ray.train

        final = {"step": self.state.step, "total_steps": self.total, "epoch": self.state.step / self.sched.steps_per_epoch,
                 "lr": self.backend.lr, **(self.evaluate() if self.val_rows else {}), "done": True,
                 "stopped_early": self.state.stopped_early}
        if self.state.best is not None:
            final["best_" + self.metric] = self.state.best
        self.export(final)
        ray.train.report(final)

    def export(self, metrics: dict[str, Any]) -> None:
        write_export(self.backend, self.job, self.objective_name, self.run_dir, self.config.get("run_uri"), self.rank,
                     {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}, self.workers)

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        import ray.train
        import torch

        t, state = self.t, self.state
        self.window = torch.zeros(4, dtype=torch.float64)  # loss sum, steps, tokens, samples
        self.stats_window = torch.zeros(self.objective.n_stats, dtype=torch.float64)  # the objective's own sums
        self.window_time = 0.0
        self.last_loss = float("nan")
        skipped = 0  # consecutive steps discarded for a non-finite loss or gradient norm
        self.backend.module.train()
        initial: dict[str, Any] = {}
        if t.eval_on_start and self.val_rows and state.step == 0:
            initial = {"initial_" + k: v for k, v in self.evaluate().items()}
            self.say("before training: " + ", ".join(f"{k[8:]} {v:.4g}" for k, v in initial.items()))
        while state.step < self.total and not state.stopped_early:
            start = time.perf_counter()
            step_sums, step_stats = self.step()
            self.window_time += time.perf_counter() - start
            state.step += 1
            bad = nonfinite_step(float(step_sums[0]), self.backend.grad_norm, self.backend.step_applied, self.all_reduce)
            if bad is not None:
                skipped += 1
                if t.on_nonfinite == "stop" or skipped > t.max_skipped_steps or bad["applied"]:
                    ray.train.report({"step": state.step, "total_steps": self.total, "diverged": True, "done": True, **bad,
                                      "skipped_steps": state.skipped_steps, "on_nonfinite": t.on_nonfinite})
                    return  # every rank reports, then every rank stops: nothing exported, no checkpoint
                state.skipped_steps += 1
                self.say(f"step {state.step}: {bad['reason']}; update skipped ({skipped} in a row, at most {t.max_skipped_steps})")
            else:
                skipped = 0
                self.window += step_sums
                self.stats_window += step_stats
            last = state.step == self.total
            do_ckpt = last or bool(t.checkpoint_every and state.step % t.checkpoint_every == 0)
            do_eval = bool(self.val_rows) and (last or do_ckpt or bool(t.eval_every and state.step % t.eval_every == 0))
            if not (last or do_eval or do_ckpt or state.step % t.log_every == 0):
                continue
            metrics = {**self.window_metrics(), **initial}
            initial = {}
            if do_eval:
                metrics.update(self.evaluate())
            if do_eval or (do_ckpt and not self.val_rows):
                do_ckpt = self.track_best(metrics, last) or do_ckpt
            self.report(metrics, final=last or state.stopped_early, checkpoint=do_ckpt)

    def step(self) -> tuple[Any, Any]:
        """One step over this worker's micro-batches: (loss, steps, tokens, samples sums; objective stats). The objective's
        :meth:`~hone.training.objective.Objective.passes` over them each make one optimiser update (more than one when an
        online recipe reuses its samples); the loss is their mean, the statistics the last pass's.

        Every micro-batch is built first; when the objective says none of them, on any rank, carries a learning signal
        (an online objective whose sampled answers all scored alike), the step leaves the weights and the optimizer's
        state as they are (no update on momentum alone) and only the schedule advances."""
        import torch

        sched, autocast = self.sched, getattr(self.backend, "autocast", None)
        step_sums = torch.zeros(4, dtype=torch.float64)
        step_stats = torch.zeros(self.objective.n_stats, dtype=torch.float64)
        batches = []
        for micro in range(sched.grad_accum):
            rows = self.train_rows.take(sched.micro_rows(self.state.step, micro, self.rank))
            torch.manual_seed(sched.micro_seed(self.state.step, micro, self.rank))  # the micro-batch's stream (rollout seeds)
            batches.append((len(rows), self.objective.batch(rows)))
        learns = not self.objective.may_idle or bool(self.all_reduce(torch.tensor(
            [float(any(self.objective.signal(batch) for _, batch in batches))], dtype=torch.float64))[0] > 0)
        for n_rows, batch in batches:
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            step_sums += torch.tensor([0.0, 0, tokens, n_rows], dtype=torch.float64)
        for update in range(self.passes if learns else 0):  # each pass over the micro-batches is one optimiser update
            for micro, (_, batch) in enumerate(batches):
                torch.manual_seed(sched.micro_seed(self.state.step, micro, self.rank))  # dropout: the micro-batch's stream
                with torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                    loss, stats = self.objective.loss(batch)
                self.backend.train_micro(loss)
                step_sums[0] += float(loss.detach()) / (sched.grad_accum * self.passes)
                if stats is not None and update == self.passes - 1:  # the objective's statistics of the step: its last pass's
                    step_stats += stats
        if not learns:
            for _, batch in batches:
                stats = self.objective.idle_stats(batch)
                if stats is not None:
                    step_stats += stats
            for _ in range(self.passes):  # the schedule advances by the updates the step would have made
                self.backend.skip_update()
        step_sums[1] = 1
        # an online objective syncs its engines here, timed with the step
        step_stats += self.objective.after_step(self.state.step + 1, updated=learns)
        return step_sums, step_stats

    def window_metrics(self) -> dict[str, Any]:
        """The logged metrics of the steps since the last log (summed over workers), then a new window."""
        summed = self.all_reduce(self.window)
        steps = float(self.window[1])
        if steps:  # a window of skipped steps only reports the last healthy loss
            self.last_loss = float(summed[0] / (steps * self.world))
        wt = self.window_time
        metrics: dict[str, Any] = {
            "step": self.state.step, "total_steps": self.total, "epoch": self.state.step / self.sched.steps_per_epoch,
            "loss": self.last_loss, "lr": self.backend.lr, "grad_norm": self.backend.grad_norm,
            "tokens_trained": float(summed[2]), "tokens_per_s": float(summed[2]) / wt, "samples_per_s": float(summed[3]) / wt,
            "step_time_s": wt / max(steps, 1.0),
            "peak_memory_mb": _peak_memory_mb(), "workers": self.world,
        }
        if self.objective.n_stats:
            metrics.update(self.objective.metrics(self.all_reduce(self.stats_window)))
        if self.state.skipped_steps:
            metrics["skipped_steps"] = self.state.skipped_steps
        peak_flops = _peak_flops()
        if peak_flops:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.backend.hf_module.parameters())
            metrics["mfu"] = 6 * n_params * float(summed[2]) / wt / (peak_flops * self.world)
        self.window.zero_()
        self.stats_window.zero_()
        self.window_time = 0.0
        return metrics

    def track_best(self, metrics: dict[str, Any], last: bool) -> bool:
        """Record the best value of the run's metric and stop early when it has not improved for the job's patience;
        True when it stopped (that step is checkpointed)."""
        state, t, metric = self.state, self.t, self.metric
        value = metrics[metric]
        if state.best is None or (value < state.best if metric_mode(metric) == "min" else value > state.best):
            state.best, state.best_step, state.evals_since_best = value, state.step, 0
        else:
            state.evals_since_best += 1
        metrics["best_" + metric] = state.best
        if t.early_stopping_patience and state.evals_since_best >= t.early_stopping_patience and not last:
            state.stopped_early = True
            self.say(f"early stopping at step {state.step}: {metric} has not improved for {state.evals_since_best} "
                     f"evaluations (best {state.best:.5g} at step {state.best_step})")
            return True
        return False

    def report(self, metrics: dict[str, Any], *, final: bool, checkpoint: bool) -> None:
        """Report the metrics to Ray Train, with a checkpoint when asked (written whole or not at all); the final report
        follows the export."""
        import ray.train

        metrics["done"] = final
        if final:
            metrics["stopped_early"] = self.state.stopped_early
            self.export(metrics)
        tmp = None
        if checkpoint:
            def write(folder: Path) -> None:
                self.backend.save(str(folder))
                save_rng_state(folder / f"rng_rank{self.rank}.pt")
                if self.rank == 0:
                    (folder / "trainer_state.json").write_text(json.dumps(asdict(self.state)))

            tmp = write_checkpoint(self.rank, write)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if tmp else None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
