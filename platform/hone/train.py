"""``hone train``: a fine-tuning run on Ray Train with DeepSpeed ZeRO (or DDP).

Driver (:func:`train`): validates, prepares and tokenizes the data once, hands it to
Ray Data, and runs a ``TorchTrainer`` on the local embedded Ray or an existing cluster.

Workers (:func:`_train_loop`): build the model and engine, then step through a data
order that depends only on (seed, epoch): the global batch of step ``s`` is a fixed
slice of a seeded permutation, and worker ``r`` takes its rows of it. A checkpoint
holds the engine state (module, optimizer, scheduler), the step and every rank's RNG
state, so a resumed or restarted run continues with the same batches and the same
losses. The last step writes a Hugging Face export (full weights gathered under
ZeRO-3, or a PEFT adapter, optionally merged) and ``hone.json`` describing it.

Run directory (``<storage_path>/<run>``): Ray's ``checkpoint_*`` folders,
``job.yaml``, ``tokenizer/``, ``metrics.jsonl``, ``tensorboard/``, ``export/``,
``export-merged/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hone import assets
from hone.config import JobConfig, load_job, metric_mode

__all__ = ["TrainError", "TrainResult", "resolve_run_dir", "train"]

EXPORT_DIR = "export"
MERGED_DIR = "export-merged"
_PEAK_FLOPS = {  # dense bf16 TFLOP/s per GPU, for MFU
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "V100": 125e12,
}


class TrainError(RuntimeError):
    """A run cannot start or failed; the message says what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    export_dir: Path | None
    merged_dir: Path | None
    metrics: dict[str, Any]
    checkpoint: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None


# --------------------------------------------------------------------------- data order


@dataclass(frozen=True)
class _Schedule:
    """Which rows each rank trains on at each step: a function of (seed, epoch) only."""

    n_rows: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.global_batch

    def _perm(self, epoch: int) -> Any:
        import numpy as np

        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def micro_rows(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._perm(epoch)
        start = k * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        return perm[start : start + self.micro_batch].tolist()


def total_steps(job: JobConfig, n_rows: int) -> int:
    t = job.training
    sched = _Schedule(n_rows, t.batch_size, t.grad_accum, job.distributed.num_workers, t.seed)
    if sched.steps_per_epoch == 0:
        raise TrainError(
            f"{n_rows} training examples are fewer than one global batch ({t.batch_size} per worker × {t.grad_accum} accumulation × "
            f"{job.distributed.num_workers} workers = {sched.global_batch}); lower training.batch_size or add data"
        )
    return t.max_steps or max(1, int(round(t.epochs * sched.steps_per_epoch)))


# --------------------------------------------------------------------------- worker


def _rows(shard: Any) -> list[dict[str, Any]]:
    """Materialise a Ray Data iterator into a list indexed by ``row_id``."""
    rows = [dict(r) for r in shard.iter_rows()]
    rows.sort(key=lambda r: r["row_id"])
    for r in rows:
        r.pop("row_id")
        for k in ("input_ids", "labels", "position_ids"):
            if k in r and hasattr(r[k], "tolist"):
                r[k] = r[k].tolist()
    return rows


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _State:
    step: int = 0
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    world_size: int = 1


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


def _export(engine: Any, job: JobConfig, run_dir: Path, rank: int, metrics: dict[str, Any], workers: list[dict[str, Any]]) -> None:
    """Write the Hugging Face export (every rank calls: ZeRO-3 gathers collectively)."""
    state = engine.full_state_dict()
    if rank != 0:
        return
    from hone.modeling import load_base_model

    hf = engine.hf_module
    staging = Path(tempfile.mkdtemp(prefix="hone-export-"))
    try:
        out = staging / EXPORT_DIR
        hf.save_pretrained(out, state_dict=state, safe_serialization=True)
        for f in (run_dir / "tokenizer").iterdir():
            shutil.copy2(f, out / f.name)
        info = {
            "kind": "adapter" if job.method.is_peft else "model",
            "base_model": job.model.name,
            "method": job.method.type,
            "task": job.task.type,
            "zero_stage": job.distributed.deepspeed.stage if job.distributed.deepspeed else None,
            "num_workers": job.distributed.num_workers,
            "workers": workers,
            "metrics": metrics,
            "job": job.to_dict(),
        }
        (out / "hone.json").write_text(json.dumps(info, indent=2, default=str))
        dirs = [EXPORT_DIR]
        if job.method.is_peft and job.method.merge_adapter:
            import peft

            merged = peft.PeftModel.from_pretrained(load_base_model(job), str(out)).merge_and_unload()
            merged.save_pretrained(staging / MERGED_DIR, safe_serialization=True)
            for f in (run_dir / "tokenizer").iterdir():
                shutil.copy2(f, staging / MERGED_DIR / f.name)
            ((staging / MERGED_DIR) / "hone.json").write_text(json.dumps({**info, "kind": "merged-model"}, indent=2, default=str))
            dirs.append(MERGED_DIR)
        for name in dirs:  # replace atomically: never a half-written export under the final name
            partial = run_dir / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(staging / name, partial)
            old = run_dir / f".{name}.old"
            if (run_dir / name).exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(run_dir / name, old)
            os.replace(partial, run_dir / name)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` for hone sessions: optional-kernel load failures that torchao logs
    on import (and torch's deprecation notes about them) stay off the driver's console."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_worker() -> None:
    """Keep per-worker library chatter off the driver's console (errors still show)."""
    import logging
    import warnings

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:  # this Ray module logs every report at INFO through a logger named by its file path
        from ray.train.v2._internal.execution import context as _ray_train_context

        logging.getLogger(_ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _train_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by Ray Train."""
    _quiet_worker()
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from hone.data import collate
    from hone.engine import make_engine
    from hone.modeling import build_model, evaluate, forward_loss

    job = JobConfig.model_validate(config["job"], context={"check_paths": False})
    run_dir = Path(config["run_dir"])
    pad_id = config["pad_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.distributed.resources_per_worker.get("CPU", 1))))
    task = job.task.type
    t = job.training

    train_rows = _rows(ray.train.get_dataset_shard("train"))
    val_shard = ray.train.get_dataset_shard("validation") if config["has_validation"] else None
    val_rows = _rows(val_shard) if val_shard is not None else []
    sched = _Schedule(len(train_rows), t.batch_size, t.grad_accum, world, t.seed)
    total = config["total_steps"]

    _seed_all(t.seed)  # identical new weights (adapters, heads) on every rank
    model = build_model(job, total_steps=total)
    engine = make_engine(job, model, world, total)
    _seed_all(t.seed + 1000 * (rank + 1))  # per-rank dropout streams
    device = engine.device

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        y = x.to(device) if device.type == "cuda" else x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.cpu()

    workers = [None] * world
    dist.all_gather_object(workers, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": os.uname().nodename, "pid": os.getpid()})

    state = _State(world_size=world)
    checkpoint = ray.train.get_checkpoint()
    # A run's own checkpoints come first; ``init_checkpoint`` (another run's state that population-based
    # training continues with perturbed hyperparameters) only starts a run that has none yet.
    cloned = checkpoint is None and bool(config.get("init_checkpoint"))
    if cloned:
        checkpoint = ray.train.Checkpoint.from_directory(config["init_checkpoint"])
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / "trainer_state.json").read_text())
            if saved["world_size"] != world:
                raise RuntimeError(f"checkpoint was written by {saved['world_size']} workers, this run has {world}; "
                                   "resume with the same distributed.num_workers")
            engine.load(d)
            state = _State(**saved)
            _set_rng_state(torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=False))
        if cloned:
            engine.retarget(t.lr, t.weight_decay)
        if rank == 0:
            print(f"[hone] {'continued' if cloned else 'resumed'} at step {state.step}/{total} from {checkpoint.path}", flush=True)

    metric = t.eval_metric if val_rows else "loss"
    mode = metric_mode(metric)
    autocast = getattr(engine, "autocast", None)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.hf_module.parameters())
    peak_flops = _peak_flops()
    window = torch.zeros(4, dtype=torch.float64)  # loss sum, steps, tokens, samples
    window_time = 0.0
    engine.module.train()

    def eval_now() -> dict[str, float]:
        return evaluate(engine.module, val_rows, job, pad_id, batch_size=t.batch_size, rank=rank, world_size=world, all_reduce=all_reduce)

    if cloned and (state.step >= total or state.stopped_early):
        # Continued from a finished run's final state: nothing left to train, so this run ends as
        # its copy (evaluated and exported here, so every trial of a sweep has its own export).
        final = {"step": state.step, "total_steps": total, "epoch": state.step / sched.steps_per_epoch, "lr": engine.lr,
                 **(eval_now() if val_rows else {}), "done": True, "stopped_early": state.stopped_early}
        if state.best is not None:
            final["best_" + metric] = state.best
        _export(engine, job, run_dir, rank, {k: v for k, v in final.items() if isinstance(v, (int, float, bool))}, workers)
        ray.train.report(final)
        return

    while state.step < total and not state.stopped_early:
        start = time.perf_counter()
        for micro in range(t.grad_accum):
            rows = [train_rows[i] for i in sched.micro_rows(state.step, micro, rank)]
            batch = {k: v.to(device) for k, v in collate(rows, pad_id, task).items()}
            with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                loss, _, _ = forward_loss(engine.module, batch, task)
            engine.train_micro(loss)
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            window += torch.tensor([float(loss.detach()) / t.grad_accum, 0, tokens, len(rows)], dtype=torch.float64)
        window[1] += 1
        window_time += time.perf_counter() - start
        state.step += 1
        last = state.step == total
        do_ckpt = last or bool(t.checkpoint_every and state.step % t.checkpoint_every == 0)
        do_eval = bool(val_rows) and (last or do_ckpt or bool(t.eval_every and state.step % t.eval_every == 0))
        do_log = last or do_eval or do_ckpt or state.step % t.log_every == 0
        if not do_log:
            continue
        summed = all_reduce(window)
        steps = float(window[1])
        metrics: dict[str, Any] = {
            "step": state.step,
            "total_steps": total,
            "epoch": state.step / sched.steps_per_epoch,
            "loss": float(summed[0] / (steps * world)),
            "lr": engine.lr,
            "grad_norm": engine.grad_norm,
            "tokens_per_s": float(summed[2]) / window_time,
            "samples_per_s": float(summed[3]) / window_time,
            "step_time_s": window_time / steps,
            "peak_memory_mb": _peak_memory_mb(),
        }
        if peak_flops:
            metrics["mfu"] = 6 * n_params * float(summed[2]) / window_time / (peak_flops * world)
        window.zero_()
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
                    print(f"[hone] early stopping at step {state.step}: {metric} has not improved for "
                          f"{state.evals_since_best} evaluations (best {state.best:.5g} at step {state.best_step})", flush=True)
            metrics["best_" + metric] = state.best
        final = last or state.stopped_early
        metrics["done"] = final
        if final:
            metrics["stopped_early"] = state.stopped_early
            _export(engine, job, run_dir, rank, {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}, workers)
        report_checkpoint = None
        tmp = None
        if do_ckpt:
            tmp = tempfile.mkdtemp(prefix="hone-ckpt-")
            engine.save(tmp)
            torch.save(_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            if rank == 0:
                (Path(tmp) / "trainer_state.json").write_text(json.dumps(asdict(state)))
            report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=report_checkpoint)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- driver-side progress


def _progress_callback(run_dir: Path) -> Any:
    from ray.train import UserCallback

    class _Progress(UserCallback):
        """Runs in the Ray Train controller: metrics.jsonl + TensorBoard in the run directory."""

        def __init__(self, run_dir: str):
            self.run_dir = run_dir
            self._writer = None

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = dict(metrics[0])
            m["time"] = time.time()
            if checkpoint is not None:
                m["checkpoint"] = checkpoint.path
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(m, default=str) + "\n")
            try:
                if self._writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
                for k, v in m.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time", "total_steps"):
                        self._writer.add_scalar(k, v, m["step"])
                self._writer.flush()
            except ImportError:  # tensorboard is optional at run time
                pass

    return _Progress(str(run_dir))


class _ProgressPrinter:
    """Driver thread: follows metrics.jsonl and shows progress (a bar on a terminal, lines otherwise)."""

    def __init__(self, run_dir: Path, total: int, quiet: bool):
        self.path = run_dir / "metrics.jsonl"
        self.total = total
        self.quiet = quiet
        self._stop = threading.Event()
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_ProgressPrinter":
        if not self.quiet:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc="train", unit="step", file=sys.stderr)
        while True:
            stopping = self._stop.wait(0.5)
            for m in self._new():
                text = _format_metrics(m)
                if bar is not None:
                    bar.n = m["step"]
                    bar.set_postfix_str(text, refresh=True)
                else:
                    print(f"[hone] step {m['step']}/{m.get('total_steps', self.total)} {text}", flush=True)
            if stopping:
                break
        if bar is not None:
            bar.close()

    def _new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data[: data.rfind("\n") + 1]
        self._offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _format_metrics(m: dict[str, Any]) -> str:
    parts = [f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    if m.get("grad_norm") is not None:
        parts.append(f"grad {m['grad_norm']:.3f}")
    parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    for k in ("eval_loss", "eval_accuracy", "eval_f1"):
        if k in m:
            parts.append(f"{k} {m[k]:.4f}")
    if "mfu" in m:
        parts.append(f"mfu {m['mfu']:.1%}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- driver


def default_storage() -> Path:
    return assets.hone_home() / "runs"


def resolve_run_dir(run: str, storage_path: str | None = None) -> Path:
    """A run given as a path, or as a name under the storage path."""
    candidate = Path(run).expanduser()
    if not (candidate / "job.yaml").exists():
        candidate = Path(storage_path or default_storage()).expanduser() / run
    if not (candidate / "job.yaml").exists():
        raise TrainError(f"no hone run at {run!r} (looked for job.yaml there and under {storage_path or default_storage()})")
    return candidate.resolve()


def _base_worker_env() -> dict[str, str]:
    """Environment every hone Ray worker gets: the hone cache, offline switches, quiet libraries."""
    env = {
        "HONE_HOME": str(assets.hone_home()),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers follows it (weight loading, shard writing)
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    }
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_TOKEN", "TORCH_EXTENSIONS_DIR", "MLFLOW_TRACKING_URI"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _worker_env(job: JobConfig) -> dict[str, str]:
    env = {**_base_worker_env(), "OMP_NUM_THREADS": str(max(1, int(job.distributed.resources_per_worker.get("CPU", 1))))}
    if not job.distributed.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


@contextlib.contextmanager
def ray_session(job: JobConfig | None, address: str | None, extra_cpus: float = 0.0, *, env: dict[str, str] | None = None,
                metrics_export_port: int | None = None) -> Any:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local embedded Ray shut down afterwards.

    A local session gets at least the CPUs the job's workers reserve (plus ``extra_cpus``), so a
    2-worker job also starts on a 1-core laptop (logical CPUs, oversubscribed). Its GCS port is
    chosen here and passed to every worker as ``RAY_ADDRESS``: Ray's own helpers inside workers
    (Train's placement-group cleaner uses the state API) would otherwise auto-detect the cluster
    and fail when another Ray instance runs on the same machine.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # ray.train.report returns promptly
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # per-worker bars would flood the driver's console
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {**(_worker_env(job) if job is not None else _base_worker_env()), **(env or {})}
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "hone.train._worker_setup"}
    log_level = os.environ.get("HONE_RAY_LOG_LEVEL", "WARNING")
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level=log_level)
    if ray.is_initialized():
        yield
        return
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_config=logging_config)
        except Exception as e:  # noqa: BLE001 - re-raised with the address named
            raise TrainError(f"cannot connect to the Ray cluster at {address}: {e}") from e
    else:
        need = 0.0
        if job is not None:
            need = job.distributed.num_workers * job.distributed.resources_per_worker.get("CPU", 1.0)
        cpus = max(os.cpu_count() or 1, int(math.ceil(need + extra_cpus)))
        port = _free_port()
        env_vars["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        extra: dict[str, Any] = {}
        if metrics_export_port:
            extra["_metrics_export_port"] = metrics_export_port
        previous = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            ray.init(address="local", num_cpus=cpus, runtime_env=runtime_env, log_to_driver=True,
                     logging_config=logging_config, **extra)
        finally:
            if previous is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = previous
    try:
        yield
    finally:
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hone.data import load_tokenizer, prepare_data, to_ray_datasets

    if resume:
        run_dir = resolve_run_dir(resume, storage_path)
        job = load_job(run_dir / "job.yaml", check_paths=False)
        print(f"[hone] resuming run {run_dir.name} from {run_dir}", flush=True)
    elif job is None:
        raise TrainError("give a job or a run to resume")
    else:
        if run_dir is None:
            storage = Path(storage_path or job.training.storage_path or default_storage()).expanduser().resolve()
            run_dir = storage / f"{job.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while run_dir.exists():
                n += 1
                run_dir = storage / f"{job.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.yaml").write_text(job.to_yaml())

    tokenizer = load_tokenizer(job)
    if not (run_dir / "tokenizer").exists():
        tokenizer.save_pretrained(run_dir / "tokenizer")
    prepared = prepare_data(job, tokenizer)
    if not quiet:
        print(f"[hone] data:\n{prepared.report}", flush=True)
    steps = total_steps(job, len(prepared.train))
    has_val = prepared.validation is not None
    metric = job.training.eval_metric if has_val else "loss"
    if not quiet:
        d = job.distributed
        print(f"[hone] run {run_dir.name}: {steps} steps, {d.num_workers} worker(s), "
              f"{'ZeRO-' + str(d.deepspeed.stage) if d.deepspeed else 'DDP'}, {job.precision}; run dir {run_dir}", flush=True)

    with ray_session(job, address):
        datasets = to_ray_datasets(prepared)
        datasets.pop("test", None)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"job": job.to_dict(), "run_dir": str(run_dir), "pad_id": tokenizer.pad_token_id,
                               "total_steps": steps, "has_validation": has_val, "init_checkpoint": init_checkpoint},
            scaling_config=ScalingConfig(num_workers=job.distributed.num_workers, use_gpu=job.distributed.use_gpu,
                                         resources_per_worker=dict(job.distributed.resources_per_worker),
                                         placement_strategy=job.distributed.placement_strategy),
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=job.distributed.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=job.training.keep_checkpoints, checkpoint_score_attribute=metric,
                                                   checkpoint_score_order=metric_mode(metric)),
                callbacks=[_progress_callback(run_dir), *(callbacks or [])],
                logging_config=ray.train.LoggingConfig(log_level=os.environ.get("HONE_RAY_LOG_LEVEL", "WARNING")),
            ),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        )
        with _ProgressPrinter(run_dir, steps, quiet):
            started = time.time()
            try:
                result = trainer.fit()
            except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; keep the cause visible
                raise TrainError(f"training run {run_dir.name} failed: {e}\n"
                                 f"resume it with: hone train --resume {run_dir}") from e
            fit_seconds = time.time() - started
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").exists() else []
    export = run_dir / EXPORT_DIR
    merged = run_dir / MERGED_DIR
    metrics = dict(result.metrics or {})
    mlflow_run_id = None
    if (track if track is not None else os.environ.get("HONE_MLFLOW", "1") != "0") and export.exists():
        from hone.registry import log_run

        mlflow_run_id = log_run(job, run_dir, history, metrics, experiment=experiment, extra_tags=extra_tags)
    (run_dir / "hone-run.json").write_text(json.dumps({"mlflow_run_id": mlflow_run_id, "fit_seconds": fit_seconds,
                                                        "metrics": metrics, "export": str(export) if export.exists() else None},
                                                       indent=2, default=str))
    return TrainResult(run_dir, export if export.exists() else None, merged if merged.exists() else None,
                       metrics, result.checkpoint.path if result.checkpoint else None, history, mlflow_run_id)
