"""The preference objectives (DPO, IPO, SimPO, ORPO, KTO): ``preference:`` in the job.

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
from hone.training.objective import Objective, WorkerContext, reference_model, sequence_logps

if TYPE_CHECKING:
    import torch

__all__ = ["PREFERENCE_STATS", "PreferenceObjective", "collate_preference", "preference_loss", "preference_metrics"]

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


class PreferenceObjective(Objective):
    """The job's preference loss on pairs (or KTO's unpaired completions), with the reference model where the loss
    needs one; evaluation: ``eval_loss`` and ``eval_reward_accuracy`` and the rest over the held-out pairs."""

    name = "preference"

    @classmethod
    def label(cls, job: JobConfig) -> str:
        return job.preference.loss

    @classmethod
    def check(cls, job: JobConfig, tokenizer: Any) -> None:
        from hone.data import check_sample

        check_sample(job, tokenizer)  # identical pairs, missing columns, before any Ray work

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        self.pref = ctx.job.preference
        self.reference = reference_model(ctx.job, ctx.backend, ctx.world_size) if self.pref.uses_reference else None

    @property
    def n_stats(self) -> int:
        return len(PREFERENCE_STATS)

    def batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_preference(rows, self.pad_id, self.pref.paired, self.job.data.max_length)
        return {k: v.to(self.backend.device) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        policy = sequence_logps(self.backend.module, batch)
        reference = self.reference(lambda model: sequence_logps(model, batch)[0]) if self.reference else None
        return preference_loss(self.job, batch, policy, reference, self.all_reduce)

    def metrics(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        return preference_metrics(stats, prefix)

    def evaluate(self, rows: Sequence[dict[str, Any]], batch_size: int, rank: int) -> dict[str, float]:
        """``eval_loss`` (per pair) and the preference metrics over every held-out pair; short shards pad with weight 0."""
        import torch

        from hone.modeling import rank_batches

        sums = torch.zeros(len(PREFERENCE_STATS) + 2, dtype=torch.float64)  # + loss × pairs, pairs
        module = self.backend.module
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
