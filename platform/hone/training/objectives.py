"""What a training step optimises: supervised fine-tuning's token cross-entropy, or a preference objective.

The preference losses follow TRL's definitions (checked against TRL's trainers in ``tests/training/test_preference.py``):
sequence log-probs are sums over response tokens (averages per token for SimPO and ORPO; IPO divides the log-ratios by
the response lengths), rewards are ``beta × (policy − reference)`` log-probs (``beta ×`` the policy's own averaged
log-probs for the reference-free SimPO and ORPO). Statistics are kept as sums (all-reduced over workers, then divided)
so a logged metric is over every pair of the window, not a mean of means.

The reference model: with adapters, the policy with its adapter disabled (the base model; no second copy); with full
fine-tuning, a frozen copy of the starting weights, sharded by ZeRO-3 like the policy under stage 3, a replica
otherwise. A copy rather than reference log-probs computed in a first pass: the pass would cost a forward over every
pair before the first step and a column per pair in the cache tied to the starting model, and under ZeRO-3 a sharded
copy costs 1/N of the weights per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hone.config import JobConfig

if TYPE_CHECKING:
    import torch

__all__ = ["PREFERENCE_STATS", "Objective", "collate_preference", "preference_loss", "preference_metrics", "reference_model",
           "sequence_logps", "token_logps"]

# Sums kept per window: pairs (or completions), chosen/rejected reward sums, correctly ordered, chosen/rejected
# log-prob sums, chosen/rejected counts, KL estimate sum and count (KTO).
PREFERENCE_STATS = ("n", "rewards_chosen", "rewards_rejected", "correct", "logps_chosen", "logps_rejected", "n_chosen",
                    "n_rejected", "kl", "n_kl")


def collate_preference(rows: Sequence[dict[str, Any]], pad_id: int, paired: bool, max_length: int | None = None) -> dict[str, Any]:
    """A micro-batch of preference rows as one padded batch: the chosen sequences then the rejected ones (pairs); or
    the completions, then the KL sequences (each row's prompt with the previous row's completion) and ``desirable``."""
    import torch

    from hone.data import collate

    if paired:
        seqs = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        seqs += [{"input_ids": r["rejected_ids"], "labels": r["rejected_labels"]} for r in rows]
        return collate(seqs, pad_id)
    seqs = [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in rows]
    for i, r in enumerate(rows):
        prev = rows[i - 1]
        p, q = int(r["prompt_len"]), int(prev["prompt_len"])
        ids = list(r["input_ids"])[:p] + list(prev["input_ids"])[q:]
        labels = [-100] * p + list(prev["input_ids"])[q:]
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        seqs.append({"input_ids": ids, "labels": labels})
    batch = collate(seqs, pad_id)
    batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
    return batch


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


def preference_loss(job: JobConfig, batch: dict[str, torch.Tensor], policy: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    reference: torch.Tensor | None, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, statistics as the sums of :data:`PREFERENCE_STATS`) from the policy's :func:`sequence_logps` and the
    reference's summed log-probs (None for SimPO and ORPO). ``all_reduce`` averages KTO's KL estimate over workers."""
    import torch
    import torch.nn.functional as F

    pref = job.preference
    beta = pref.strength
    logps, counts, nll = policy
    stats = torch.zeros(len(PREFERENCE_STATS), dtype=torch.float64)
    if pref.loss == "kto":
        n = batch["desirable"].numel()
        logps, kl_logps = logps[:n], logps[n:]
        ratio = logps - reference[:n]
        kl = (kl_logps - reference[n:]).mean().detach()
        kl_all = kl.double().reshape(1).cpu()
        if all_reduce is not None:
            kl_all = all_reduce(torch.cat([kl_all, torch.ones(1, dtype=torch.float64)]))
            kl_all = kl_all[:1] / kl_all[1]
        kl = kl_all.to(logps.dtype).to(logps.device).clamp(min=0)[0]
        want = batch["desirable"].to(logps.device)
        chosen_losses = 1 - torch.sigmoid(beta * (ratio[want] - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - ratio[~want]))
        loss = torch.cat([pref.desirable_weight * chosen_losses, pref.undesirable_weight * rejected_losses]).mean()
        rewards = (beta * ratio).detach().double().cpu()
        want = want.cpu()
        lp = logps.detach().double().cpu()
        correct = ((rewards > 0) == want).sum()
        stats[:] = torch.tensor([n, rewards[want].sum(), rewards[~want].sum(), correct, lp[want].sum(), lp[~want].sum(),
                                 want.sum(), (~want).sum(), float(kl), 1.0], dtype=torch.float64)
        return loss, stats

    n = logps.shape[0] // 2
    avg = logps / counts.clamp(min=1)
    if pref.loss in ("dpo", "ipo"):
        ratios = logps - reference
        chosen, rejected = ratios[:n], ratios[n:]
        if pref.loss == "dpo":
            delta = chosen - rejected
            losses = -F.logsigmoid(beta * delta) * (1 - pref.label_smoothing) - F.logsigmoid(-beta * delta) * pref.label_smoothing
        else:
            c, r = counts[:n].clamp(min=1), counts[n:].clamp(min=1)
            losses = (chosen / c - rejected / r - 1 / (2 * beta)) ** 2
        loss = losses.mean()
        rewards_c, rewards_r = beta * chosen.detach(), beta * rejected.detach()
    elif pref.loss == "simpo":
        delta = avg[:n] - avg[n:] - pref.gamma / beta
        loss = (-F.logsigmoid(beta * delta) * (1 - pref.label_smoothing) - F.logsigmoid(-beta * delta) * pref.label_smoothing).mean()
        rewards_c, rewards_r = beta * avg[:n].detach(), beta * avg[n:].detach()
    else:  # orpo: the chosen responses' token NLL minus λ × log-sigmoid of the log odds ratio
        c, r = avg[:n].float(), avg[n:].float()
        log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
        sft = nll[:n].sum() / counts[:n].sum().clamp(min=1)
        loss = sft - (beta * F.logsigmoid(log_odds)).mean()
        rewards_c, rewards_r = beta * c.detach(), beta * r.detach()
    rc, rr = rewards_c.double().cpu(), rewards_r.double().cpu()
    lp = logps.detach().double().cpu()
    stats[:] = torch.tensor([n, rc.sum(), rr.sum(), (rc > rr).sum(), lp[:n].sum(), lp[n:].sum(), n, n, 0.0, 0.0], dtype=torch.float64)
    return loss, stats


def preference_metrics(stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Window metrics from summed :data:`PREFERENCE_STATS`."""
    s = dict(zip(PREFERENCE_STATS, (float(x) for x in stats)))
    chosen = s["rewards_chosen"] / max(s["n_chosen"], 1)
    rejected = s["rewards_rejected"] / max(s["n_rejected"], 1)
    out = {"rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
           "reward_accuracy": s["correct"] / max(s["n"], 1), "logps_chosen": s["logps_chosen"] / max(s["n_chosen"], 1),
           "logps_rejected": s["logps_rejected"] / max(s["n_rejected"], 1)}
    if s["n_kl"]:
        out["kl"] = s["kl"] / s["n_kl"]
    return {prefix + k: v for k, v in out.items()}


class Objective:
    """One training objective on one worker: batches, the loss of a micro-batch (with its statistics), and the
    evaluation of held-out rows: supervised fine-tuning, or the job's preference loss (building the reference model
    where one is needed)."""

    def __init__(self, job: JobConfig, engine: Any, pad_id: int, world_size: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.job, self.engine, self.pad_id, self.world_size, self.all_reduce = job, engine, pad_id, world_size, all_reduce
        self.task = job.task.type
        self.pref = job.preference
        self.reference = reference_model(job, engine, world_size) if self.pref is not None and self.pref.uses_reference else None

    @property
    def n_stats(self) -> int:
        return len(PREFERENCE_STATS) if self.pref is not None else 0

    def batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from hone.data import collate

        if self.pref is None:
            batch = collate(rows, self.pad_id, self.task)
        else:
            batch = collate_preference(rows, self.pad_id, self.pref.paired, self.job.data.max_length)
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pref is None:
            from hone.modeling import forward_loss

            return forward_loss(self.engine.module, batch, self.task)[0], None
        policy = sequence_logps(self.engine.module, batch)
        reference = self.reference(lambda model: sequence_logps(model, batch)[0]) if self.reference else None
        return preference_loss(self.job, batch, policy, reference, self.all_reduce)

    def metrics(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        return preference_metrics(stats, prefix) if self.pref is not None else {}

    def start(self, step: int, rows: Any) -> None:
        """Called once the run's state is loaded (online objectives sync their rollout engines here)."""

    def after_step(self, step: int) -> torch.Tensor:
        """Called after each optimiser step; returns statistics to add to the step's."""
        import torch

        return torch.zeros(self.n_stats, dtype=torch.float64)

    def evaluate(self, rows: Sequence[dict[str, Any]], batch_size: int, rank: int) -> dict[str, float]:
        """Held-out metrics (``eval_loss`` and, for preferences, ``eval_reward_accuracy`` and the rest); every rank
        runs the same number of forward passes (ZeRO-3 gathers collectively), short shards padding with weight 0."""
        import torch

        if self.pref is None:
            from hone.modeling import evaluate

            return evaluate(self.engine.module, rows, self.job, self.pad_id, batch_size=batch_size, rank=rank,
                            world_size=self.world_size, all_reduce=self.all_reduce)
        from hone.modeling import rank_batches

        sums = torch.zeros(len(PREFERENCE_STATS) + 2, dtype=torch.float64)  # + loss × pairs, pairs
        module = self.engine.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for chunk, weight in rank_batches(rows, batch_size, rank, self.world_size):
                loss, stats = self.loss(self.batch(chunk))
                n = float(stats[0])
                sums += weight * torch.cat([stats, torch.tensor([float(loss) * n, n], dtype=torch.float64)])
        module.train(was_training)
        sums = self.all_reduce(sums)
        return {"eval_loss": float(sums[-2] / max(float(sums[-1]), 1.0)), **preference_metrics(sums[:-2], "eval_")}


def reference_model(job: JobConfig, engine: Any, world_size: int) -> Callable[[Callable[[Any], torch.Tensor]], torch.Tensor]:
    """The reference model, as a function that runs ``fn(model)`` on it without gradients: with adapters the policy
    with its adapter disabled, else a frozen copy of the starting weights (sharded by ZeRO-3 under stage 3)."""
    import torch

    if job.method.is_peft:
        def disabled(fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
            with torch.no_grad(), engine.hf_module.disable_adapter():
                return fn(engine.module)

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
        ref.to(engine.device)

    def frozen(fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(ref)

    return frozen
