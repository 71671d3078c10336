"""What a training step optimises, as a recipe: each objective is one class behind :class:`Objective`, chosen by
the job's sections (:func:`objective_class`). The per-worker loop (:mod:`hone.training.loop`) only orchestrates:
it asks the objective for a batch, its loss and statistics, its metrics and its evaluation, and lets it act once
the run's state is loaded and after each optimiser step. The driver (:mod:`hone.training.driver`) asks it to check
the data before any Ray work and to start the extra models it needs on the cluster (GRPO's rollout engines).

Recipes: supervised fine-tuning (:mod:`hone.training.sft`, the default), the preference losses
(:mod:`hone.training.preference`, ``preference:``) and GRPO (:mod:`hone.training.grpo`, ``grpo:``). A new objective is
one module with a subclass plus its config section (``hone.config``) and its line in :data:`RECIPES`.

The shared pieces live here: label-token log-probs (:func:`token_logps`, :func:`sequence_logps`) and the reference
model (:func:`reference_model`).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hone.config import JobConfig

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_RECIPE", "RECIPES", "Objective", "WorkerContext", "objective_class", "reference_model", "sequence_logps",
           "token_logps"]

# The job section that selects each objective (at most one is set: the config refuses two), as module:class; a job
# with none of them is supervised fine-tuning.
RECIPES = {"preference": "hone.training.preference:PreferenceObjective", "grpo": "hone.training.grpo:GRPOObjective"}
DEFAULT_RECIPE = "hone.training.sft:SFTObjective"


@dataclass
class WorkerContext:
    """What an objective gets on its worker: the job, the training backend (:mod:`hone.training.backends`: DeepSpeed
    or DDP, ``module`` the model to call), the pad id, this worker's rank among ``world_size``, a summing all-reduce,
    and what the objective's :meth:`Objective.resources` handed the workers (e.g. the rollout pool's name)."""

    job: JobConfig
    backend: Any
    pad_id: int
    rank: int
    world_size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)


class Objective(abc.ABC):
    """The recipe interface. ``n_stats`` sums per window (all-reduced over workers, then turned into metrics by
    :meth:`metrics`) beside the loop's own loss, throughput and memory."""

    name = "objective"

    @classmethod
    def label(cls, job: JobConfig) -> str:
        """What the export's ``hone.json`` records as the objective."""
        return cls.name

    @classmethod
    def check(cls, job: JobConfig, tokenizer: Any) -> None:
        """Refuse data this objective cannot train on, on the driver, before any Ray work."""

    @classmethod
    @contextlib.contextmanager
    def resources(cls, job: JobConfig, run_dir: Path, quiet: bool) -> Iterator[dict[str, Any]]:
        """Start what the objective needs beside the training workers for the run's length; yields the extras every
        worker's :class:`WorkerContext` carries."""
        yield {}

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.job, self.backend, self.pad_id = ctx.job, ctx.backend, ctx.pad_id
        self.rank, self.world_size, self.all_reduce = ctx.rank, ctx.world_size, ctx.all_reduce

    @property
    def n_stats(self) -> int:
        return 0

    @abc.abstractmethod
    def batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A micro-batch of cached rows as the tensors :meth:`loss` takes, on the worker's device."""

    @abc.abstractmethod
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the micro-batch's loss, its statistics as ``n_stats`` sums or None)."""

    def metrics(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """Window metrics from all-reduced statistics."""
        return {}

    def start(self, step: int, rows: Any) -> None:
        """Called once the run's state is loaded (online objectives sync their rollout engines here)."""

    def after_step(self, step: int) -> torch.Tensor:
        """Called after each optimiser step; returns statistics to add to the step's."""
        import torch

        return torch.zeros(self.n_stats, dtype=torch.float64)

    @abc.abstractmethod
    def evaluate(self, rows: Sequence[dict[str, Any]], batch_size: int, rank: int) -> dict[str, float]:
        """Held-out metrics (``eval_…``); every rank runs the same number of forward passes (ZeRO-3 gathers
        collectively)."""


def objective_class(job: JobConfig) -> type[Objective]:
    """The recipe a job trains with: the one whose section the job sets, else supervised fine-tuning."""
    chosen = [RECIPES[section] for section in RECIPES if getattr(job, section, None) is not None] or [DEFAULT_RECIPE]
    module, _, name = chosen[0].partition(":")
    return getattr(importlib.import_module(module), name)


def token_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(each label token's log-prob, 0 elsewhere; the label mask), both ``[batch, length − 1]``, at ``temperature``; with
    ``batch["bitmask"]`` (xgrammar's packed allowed-token mask, one row per position) of the constrained distribution."""
    import torch

    labels = batch["labels"][:, 1:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    if batch.get("bitmask") is not None:
        import xgrammar

        flat = logits.reshape(-1, logits.shape[-1]).contiguous()
        xgrammar.apply_token_bitmask_inplace(flat, batch["bitmask"].to(flat.device))
        logits = flat.view_as(logits)
    mask = labels != -100
    return torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the label tokens' log-probs, number of label tokens, summed token NLL) per sequence."""
    token, mask = token_logps(model, batch)
    return token.sum(-1), mask.sum(-1), -token.sum(-1)


def reference_model(job: JobConfig, backend: Any, world_size: int) -> Callable[[Callable[[Any], torch.Tensor]], torch.Tensor]:
    """The reference model, as a function that runs ``fn(model)`` on it without gradients: with adapters the policy
    with its adapter disabled, else a frozen copy of the starting weights (sharded by ZeRO-3 under stage 3)."""
    import torch

    if job.method.is_peft:
        def disabled(fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
            with torch.no_grad(), backend.hf_module.disable_adapter():
                return fn(backend.module)

        return disabled
    from hone.modeling import load_base_model

    ref = load_base_model(job)
    ref.requires_grad_(False)
    ref.eval()
    ds = job.distributed.deepspeed
    if ds is not None and ds.stage == 3:
        import deepspeed

        ref, *_ = deepspeed.initialize(model=ref, config={
            "train_micro_batch_size_per_gpu": job.training.batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": job.training.batch_size * world_size, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": job.precision == "bf16"}, "fp16": {"enabled": job.precision == "fp16"}})
        ref.eval()
    else:
        ref.to(backend.device)

    def frozen(fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(ref)

    return frozen
