"""Training backends: DeepSpeed ZeRO (generated config) or plain DDP, behind one small interface.

``make_backend`` returns an object with ``module``, ``train_micro(batch_loss)``, ``skip_update()`` (a step with nothing
to learn: weights and optimizer state untouched, the schedule advanced), ``lr``, ``grad_norm``,
``step_applied`` (False when the last optimizer step was discarded for non-finite gradients),
``save(dir)``, ``load(dir)``, ``retarget(job)`` (population-based training's new hyperparameters) and
``full_state_dict()`` (the consolidated weights on rank 0, also under ZeRO-3).

The optimizer is declared once (:func:`optimizer_spec`): DeepSpeed gets it in its JSON config, DDP builds the same torch
optimizer from it, and ``retarget`` applies the fields ``hone.config.PBT_MUTABLE`` names, whatever they are.

Neither backend applies an update whose gradient norm is not finite: ZeRO stages 1-3 discard it
themselves (their overflow check, asked for explicitly under bf16), DDP checks before stepping.
ZeRO stage 0 applies it, which is why ``training.on_nonfinite: skip_step`` refuses stage 0.
"""

from __future__ import annotations

import copy
import math
import os
from typing import TYPE_CHECKING, Any

from hone.config import PBT_MUTABLE, JobConfig

if TYPE_CHECKING:
    import torch

__all__ = ["UNIVERSAL_TAG", "deepspeed_config", "make_backend", "optimizer_spec", "per_worker_accum", "universal_checkpoint"]


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


UNIVERSAL_TAG = "state_universal"


def universal_checkpoint(directory: str) -> None:
    """Convert a ZeRO checkpoint's ``state`` to DeepSpeed's universal format (``state_universal``, beside it), which any
    number of workers can load. Converted once per filesystem: built under a unique name, then renamed into place."""
    import argparse
    import contextlib
    import io
    import shutil
    import socket

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = os.path.join(directory, UNIVERSAL_TAG)
    if os.path.exists(os.path.join(final, ".complete")):
        return
    tmp = os.path.join(directory, f".{UNIVERSAL_TAG}.{socket.gethostname()}.{os.getpid()}")
    args = argparse.Namespace(input_folder=os.path.join(directory, "state"), output_folder=tmp, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"could not convert {directory} for a different number of workers: {e}\n{log.getvalue()[-2000:]}") from e
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, final)
    except OSError:  # another node converted the same checkpoint first
        shutil.rmtree(tmp, ignore_errors=True)


def per_worker_accum(job: JobConfig, world_size: int) -> int:
    """Micro-batches each of ``world_size`` workers accumulates per step: the global batch stays
    ``batch_size × grad_accum × max_workers`` whatever the number of workers (elastic runs)."""
    return job.training.grad_accum * job.distributed.max_workers // world_size


def optimizer_spec(job: JobConfig) -> dict[str, Any]:
    """The job's optimizer as ``{"type": torch.optim class name, "params": its keyword arguments}``: the one
    declaration DeepSpeed's config and DDP's optimizer are both made from. Every field :data:`PBT_MUTABLE` names is
    one of the params, under the same name (``training.lr`` → ``lr``)."""
    t = job.training
    if t.optimizer == "adamw":
        return {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.adam_betas), "eps": 1e-8, "weight_decay": t.weight_decay}}
    return {"type": "SGD", "params": {"lr": t.lr, "weight_decay": t.weight_decay}}


def deepspeed_config(job: JobConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a job (``distributed.deepspeed.extra`` merged last)."""
    ds = job.distributed.deepspeed
    assert ds is not None
    t = job.training
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": job.distributed.use_gpu}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": job.distributed.use_gpu}
    if ds.overlap_comm is not None:
        zero["overlap_comm"] = ds.overlap_comm
    if ds.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = ds.reduce_bucket_size
    optimizer = optimizer_spec(job)
    if optimizer["type"] == "AdamW" and not job.distributed.use_gpu:
        # On CPU, torch's AdamW needs no compiled op (DeepSpeed's FusedAdam/CPUAdam compile on first use).
        optimizer = {"type": "AdamW", "params": {**optimizer["params"], "torch_adam": True}}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": per_worker_accum(job, world_size),
        "train_batch_size": t.batch_size * per_worker_accum(job, world_size) * world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "optimizer": optimizer,
        "bf16": {"enabled": job.precision == "bf16", **({"check_grad_overflow": True} if t.on_nonfinite == "skip_step" else {})},
        "fp16": {"enabled": job.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.offload_optimizer != "none" and not job.distributed.use_gpu:
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on CPU instead of compiling DeepSpeedCPUAdam
    return _deep_merge(config, ds.extra)


def _warm(step: int, warmup: int, after: Any) -> float:
    """The learning-rate factor of a schedule with ``warmup`` steps: (step + 1) / (warmup + 1) while warming up (the first
    step already learns; Hugging Face's warm-up starts at 0, a step that changes nothing), then the schedule's own."""
    return (step + 1) / (warmup + 1) if step < warmup else after(step)


def _scheduler_fn(job: JobConfig, total_steps: int) -> Any:
    import functools

    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    t = job.training
    warmup = t.warmup_steps or int(round(t.warmup_ratio * total_steps))
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]

    def make(optimizer: Any) -> Any:
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        if not warmup:
            return scheduler
        return LambdaLR(optimizer, functools.partial(_warm, warmup=warmup, after=scheduler.lr_lambdas[0]))

    return make


def _retarget(scheduler: Any, job: JobConfig) -> None:
    """Point a restored optimizer and its LR schedule at the job's population-based-training fields.

    A checkpoint restores the optimizer's groups and the schedule's ``base_lrs`` as they were
    saved; population-based training continues another trial's state with perturbed values, so
    the schedule is rebased (same step, same warm-up/decay shape, new peak) and the groups follow.
    """
    params = optimizer_spec(job)["params"]
    values = {path.split(".", 1)[1]: params[path.split(".", 1)[1]] for path in PBT_MUTABLE}
    groups = scheduler.optimizer.param_groups
    lr = values.pop("lr")
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group.update(values)
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # noqa: SLF001 - what get_last_lr() reports


class _DeepSpeed:
    def __init__(self, job: JobConfig, model: Any, world_size: int, total_steps: int):
        import deepspeed

        if not job.distributed.use_gpu and os.environ.get("HONE_DS_SHM_COMM") != "1":
            # DeepSpeed's CPU shared-memory allreduce op JIT-compiles in every fresh environment, with
            # the workers racing on one build lock (a killed build leaves it held and hangs every later
            # run). Skipping it makes DeepSpeed use torch.distributed (gloo); HONE_DS_SHM_COMM=1 opts in.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.config = deepspeed_config(job, world_size)
        self.stage = self.config["zero_optimization"]["stage"]
        self.peft = job.method.is_peft
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.config, lr_scheduler=_scheduler_fn(job, total_steps)
        )
        self.module = self.engine
        self.idle = False  # the last step applied no update (skip_update)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def train_micro(self, loss: torch.Tensor) -> None:
        self.idle = False
        self.engine.backward(loss)
        self.engine.step()  # applies the update only at the accumulation boundary

    def skip_update(self) -> None:
        """A step with nothing to learn: no backward pass, no optimizer step (weights and moments stay bit-identical);
        the learning-rate schedule advances as it would have."""
        self.idle = True
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def grad_norm(self) -> float | None:
        if self.idle:
            return 0.0
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def step_applied(self) -> bool:
        return bool(self.engine.was_step_applied())

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag="state", save_latest=False, exclude_frozen_parameters=self.peft)

    def load(self, directory: str, *, resized: bool = False) -> None:
        """Load a checkpoint; ``resized``: written by another number of workers. ZeRO 1-3 partition the optimizer
        state by worker, so such a checkpoint is read in DeepSpeed's universal format (:func:`universal_checkpoint`
        converted it, next to the original)."""
        universal = resized and self.stage > 0
        self.engine._config.load_universal_checkpoint = universal  # noqa: SLF001 - the engine's own switch, read at load time
        try:
            path, _ = self.engine.load_checkpoint(directory, tag=UNIVERSAL_TAG if universal else "state", load_module_strict=not self.peft,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            self.engine._config.load_universal_checkpoint = False  # noqa: SLF001
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint state under {directory}")

    def retarget(self, job: JobConfig) -> None:
        _retarget(self.scheduler, job)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated weights on rank 0 (None elsewhere); every rank must call this."""
        import torch.distributed as dist

        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # noqa: SLF001 - save_16bit_model's gather, without a file
            return state if dist.get_rank() == 0 else None
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()} if dist.get_rank() == 0 else None

    @property
    def hf_module(self) -> Any:
        return self.engine.module


class _DDP:
    """Plain PyTorch DDP (``distributed.deepspeed: null``)."""

    def __init__(self, job: JobConfig, model: Any, world_size: int, total_steps: int):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        t = job.training
        self.device = torch.device("cuda", torch.cuda.current_device()) if job.distributed.use_gpu else torch.device("cpu")
        model.to(self.device)
        self.hf_module = model
        self.module = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        spec = optimizer_spec(job)
        self.optimizer = getattr(torch.optim, spec["type"])(trainable, **spec["params"])
        self.scheduler = _scheduler_fn(job, total_steps)(self.optimizer)
        self.grad_accum = per_worker_accum(job, world_size)
        self.max_grad_norm = t.max_grad_norm
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.precision)
        self._micro = 0
        self._norm: float | None = None
        self._applied = True
        self._adalora = job.method.type == "adalora"

    def skip_update(self) -> None:
        """A step with nothing to learn (see :meth:`_DeepSpeed.skip_update`)."""
        self._micro += self.grad_accum
        self._norm, self._applied = 0.0, True
        self.scheduler.step()

    def train_micro(self, loss: torch.Tensor) -> None:
        import torch

        (loss / self.grad_accum).backward()
        self._micro += 1
        if self._micro % self.grad_accum:
            return
        trainable = [p for p in self.hf_module.parameters() if p.requires_grad]
        if self.max_grad_norm:
            self._norm = float(torch.nn.utils.clip_grad_norm_(trainable, self.max_grad_norm))
        else:
            self._norm = float(torch.norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
        # DDP averaged the gradients, so every rank sees the same norm and makes the same choice.
        self._applied = math.isfinite(self._norm)
        if not self._applied:
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.optimizer.step()
        self.scheduler.step()
        if self._adalora:  # AdaLoRA reallocates ranks from the gradients, before they are cleared
            self.hf_module.base_model.update_and_allocate(self._micro // self.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def grad_norm(self) -> float | None:
        return self._norm

    @property
    def step_applied(self) -> bool:
        return self._applied

    def save(self, directory: str) -> None:
        import torch
        import torch.distributed as dist

        if dist.get_rank() == 0:
            torch.save({"model": self.hf_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, os.path.join(directory, "ddp_state.pt"))

    def load(self, directory: str, *, resized: bool = False) -> None:
        import torch

        # tensors and plain containers only: a checkpoint on a shared volume or bucket is data, never code
        state = torch.load(os.path.join(directory, "ddp_state.pt"), map_location=self.device, weights_only=True)
        self.hf_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def retarget(self, job: JobConfig) -> None:
        _retarget(self.scheduler, job)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import torch.distributed as dist

        return {k: v.detach().cpu() for k, v in self.hf_module.state_dict().items()} if dist.get_rank() == 0 else None


def make_backend(job: JobConfig, model: Any, world_size: int, total_steps: int) -> _DeepSpeed | _DDP:
    if job.distributed.deepspeed is None:
        return _DDP(job, model, world_size, total_steps)
    return _DeepSpeed(job, model, world_size, total_steps)
