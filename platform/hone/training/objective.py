"""What a training step optimises, as a recipe: each objective is one class behind :class:`Objective`, chosen by
the job's sections (:func:`objective_class`). The per-worker loop (:mod:`hone.training.loop`) only orchestrates:
it asks the objective for a batch, its loss and statistics, its metrics and its evaluation, and lets it act once
the run's state is loaded and after each optimiser step. The driver (:mod:`hone.training.driver`) asks it to check
the data before any Ray work and to start the extra models it needs on the cluster (GRPO's rollout engines).

Recipes: supervised fine-tuning (:mod:`hone.training.sft`, the default), the preference losses
(:mod:`hone.training.preference`, ``preference:``) and GRPO (:mod:`hone.training.grpo`, ``grpo:``). A new objective is
one module with a subclass plus its config section (``hone.config``) and its line in :data:`RECIPES`.

The shared pieces live here: label-token log-probs (:func:`token_logps`, :func:`sequence_logps`), completions of
shared prompts and their log-probs (:func:`grouped_batch`, :func:`completion_logps`) and the reference model
(:func:`reference_model`).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hone.config import JobConfig

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_RECIPE", "RECIPES", "Objective", "WorkerContext", "completion_logps", "grouped_batch", "objective_class",
           "reference_model", "sequence_logps", "shares_prompts", "takes_logits_to_keep", "token_logps"]

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

    @classmethod
    def passes(cls, job: JobConfig) -> int:
        """Optimiser passes over each step's micro-batches (an online objective may reuse its rollouts, PPO-style): each
        pass is an optimiser update, and the learning-rate schedule counts updates."""
        return 1

    may_idle = False
    """Whether a step can carry no learning signal at all (:meth:`signal`): the loop then asks every rank and, when none
    has any, applies no update (an optimizer with momentum would otherwise keep moving the weights)."""

    def signal(self, batch: dict[str, Any]) -> bool:
        """Whether the micro-batch can change the weights (asked only when :attr:`may_idle`)."""
        return True

    def idle_stats(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The statistics of a micro-batch of a step that applied no update (its loss was never computed)."""
        return None

    def after_step(self, step: int, updated: bool = True) -> torch.Tensor:
        """Called after each optimiser step (``updated``: False when the step applied no update); returns statistics
        to add to the step's."""
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


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the Hugging Face model inside ``model`` (a DeepSpeed engine, DDP or PEFT wrapper, or the model itself)
    can compute logits for its last positions only (``logits_to_keep``)."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return _forward_keeps(type(base))


@functools.cache
def _forward_keeps(cls: type) -> bool:  # asked every micro-batch: a signature is read once per model class
    import inspect

    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def token_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(each label token's log-prob, 0 elsewhere; the label mask), both ``[batch, length − 1]``, at ``temperature``.

    With ``trim`` the model computes logits only from the first label position of the batch on (``logits_to_keep``):
    a prompt's positions carry no label, and their vocabulary-wide logits are most of the memory and of the head's
    work when prompts are long and completions short (preference pairs)."""
    import torch

    labels = batch["labels"][:, 1:]
    mask = labels != -100
    width = labels.shape[1]
    first = int(mask.any(0).float().argmax()) if trim and bool(mask.any()) else 0
    kwargs = {"logits_to_keep": width - first + 1} if first and takes_logits_to_keep(model) else {}
    if not kwargs:
        first = 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kwargs).logits[:, :-1].float()
    labels, mask = labels[:, first:], mask[:, first:]
    if temperature != 1.0:
        logits = logits / temperature
    chosen = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    out = torch.nn.functional.pad(chosen * mask, (first, 0))
    return out, torch.nn.functional.pad(mask, (first, 0))


def grouped_batch(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Groups of completions of shared prompts as tensors: ``prompt_ids``/``prompt_mask`` ``[groups, P]`` (left-padded:
    every prompt ends at the same column), ``labels`` ``[groups × k, C]`` (the completions, right-padded with -100), and
    ``attention_mask`` ``[groups × k, P + C]`` (each row's prompt then its completion)."""
    import torch

    k = len(completions) // len(prompts)
    width, length = max(len(p) for p in prompts), max(1, max(len(c) for c in completions))
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for g, p in enumerate(prompts):
        prompt_ids[g, width - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[g, width - len(p):] = 1
    labels = torch.full((len(completions), length), -100, dtype=torch.long)
    for b, c in enumerate(completions):
        labels[b, : len(c)] = torch.tensor(c, dtype=torch.long)
    attention = torch.cat([prompt_mask.repeat_interleave(k, 0), (labels != -100).long()], 1)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "labels": labels, "attention_mask": attention}


def completion_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     shared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(each completion token's log-prob, 0 at padding; the completion mask), both ``[groups × k, C]``, of a
    :func:`grouped_batch` at ``temperature`` (with ``batch["bitmask"]``, one row per completion position, of the
    constrained distribution).

    ``shared``: each prompt goes through the model once, and its ``k`` completions continue from its key/value cache
    (repeated ``k`` times; the gradient flows back through it into the prompt's one pass), so the prompt tokens, most of
    a GRPO batch, cost ``1/k`` of what ``k`` full sequences cost. Otherwise every row runs whole (models without a key/value
    cache, or with gradient checkpointing, which turns the cache off): the same numbers, at the full cost."""
    import torch

    prompt_ids, prompt_mask, labels = batch["prompt_ids"], batch["prompt_mask"], batch["labels"]
    k = labels.shape[0] // prompt_ids.shape[0]
    width = prompt_ids.shape[1]
    mask = labels != -100
    completion_ids = labels.clamp(min=0)
    attention = batch["attention_mask"]
    if shared:
        prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(k)
        starts = prompt_mask.sum(-1).repeat_interleave(k).unsqueeze(1)
        position = starts + torch.arange(labels.shape[1], device=labels.device)
        rest = model(input_ids=completion_ids, attention_mask=attention, position_ids=position, past_key_values=cache, use_cache=True)
        logits = torch.cat([first.logits[:, -1:].float().repeat_interleave(k, 0), rest.logits[:, :-1].float()], 1)
    else:
        ids = torch.cat([prompt_ids.repeat_interleave(k, 0), completion_ids], 1)
        position = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attention, position_ids=position, use_cache=False)
        logits = out.logits[:, width - 1 : -1].float()
    if temperature != 1.0:
        logits = logits / temperature
    if batch.get("bitmask") is not None:
        import xgrammar

        flat = logits.reshape(-1, logits.shape[-1]).contiguous()
        xgrammar.apply_token_bitmask_inplace(flat, batch["bitmask"].to(flat.device))
        logits = flat.view_as(logits)
    chosen = torch.gather(logits, 2, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return chosen * mask, mask


def shares_prompts(model: Any, gradient_checkpointing: bool) -> bool:
    """Whether :func:`completion_logps` can run each prompt once for its group: a model that returns a key/value cache
    and computes logits for the last positions only, without gradient checkpointing (which turns the cache off)."""
    return not gradient_checkpointing and takes_logits_to_keep(model)


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
