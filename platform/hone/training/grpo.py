"""The GRPO objective on one Ray Train worker: rollouts on the run's vLLM engines, rewards, group-normalised advantages,
the clipped policy-ratio loss with an optional KL to the reference, and the weight syncs to the engines.

Follows TRL's ``GRPOTrainer`` definitions: advantages are ``(r − mean(group)) / (std(group) + 1e-4)`` (without the
division when ``scale_rewards`` is off), the per-token loss ``−min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·KL`` with the
k3 estimator ``exp(ref − logp) − (ref − logp) − 1``, normalised per ``loss_type``. The old policy of the ratio is the
current one when the rollout engines held the trainer's current weights (then ρ = 1 and its gradient is the policy
gradient), else the engines' log-probs of the sampled tokens (``sync_every`` > 1: the rollouts are off-policy). With
``num_iterations`` > 1 the loop makes that many updates on one step's rollouts; the later passes' old policy is the
trainer's log-probs of the first pass (before any update), as TRL's ``old_per_token_logps``.

A worker's prompts for a micro-batch go to one engine as one rollout batch, with a seed per prompt drawn from the
micro-batch's seeded stream: the same step samples the same completions after a resume. The trainer runs each prompt
once and its ``k`` completions from the prompt's key/value cache, with logits on completion positions only
(:func:`~hone.training.objective.completion_logps`): the prompt tokens, most of a batch, cost ``1/k``. A step whose
groups all tie, on every worker, applies no update at all (every advantage is 0; AdamW would still move the weights on
its momentum), needs no sync, and counts in ``idle_steps``. Each sync (every
``sync_every`` steps, and at the start) gathers the weights (the adapter's A and B, or the full model under ZeRO-3
collectively), puts them in the object store once, loads them on every engine, and checks that the engines'
log-probs of a fixed prompt now equal the trainer's (``sync_logprob_diff``) and moved (``sync_logprob_change``); a
sync that does not take is retried, then fails the run (:class:`~hone.training.rollout.SyncError`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hone.config import JobConfig
from hone.config.grpo import reward_names
from hone.generation import Generation, Sampling
from hone.grammar import Constraints, token_bitmask
from hone.training.objective import Objective, WorkerContext, completion_logps, grouped_batch, reference_model, shares_prompts
from hone.training.rewards import score, total_reward
from hone.training.rollout import SyncError

if TYPE_CHECKING:
    import torch

__all__ = ["GRPO_STATS", "GRPOObjective", "advantages", "engine_weights", "grpo_loss", "rollout_model_dir"]

# Sums kept per window (then one sum and one count per reward term, and with a choice constraint the completions that
# gave each answer): completions, reward and its square, samples a reward could not score, completion tokens, KL and its
# tokens, clipped tokens, rollout seconds, groups, groups whose rewards all tie, sync seconds, syncs, step seconds, steps,
# engine-vs-trainer log-prob gap and its tokens, the sync check's difference and change, rollout engines replaced, steps
# that applied no update (every group tied), completions cut at max_new_tokens, groups left out (dynamic sampling).
GRPO_STATS = ("n", "reward", "reward_sq", "errors", "tokens", "kl", "kl_tokens", "clipped", "rollout_s", "groups", "ties", "sync_s",
              "syncs", "step_s", "steps", "gap", "gap_tokens", "sync_diff", "sync_change", "checks", "replaced", "idle",
              "truncated", "dropped")
_LORA = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_A\.([^.]+)\.weight$")


def advantages(rewards: torch.Tensor, k: int, scale: bool) -> torch.Tensor:
    """Group-normalised advantages of ``rewards`` laid out as consecutive groups of ``k``."""
    groups = rewards.view(-1, k)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def grpo_loss(job: JobConfig, logps: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (and KL) loss from per-token log-probs ``[B, T]`` and per-sequence advantages ``[B]``."""
    import torch

    g = job.grpo
    m = mask.to(logps.dtype)
    ratio = torch.exp(logps - old)
    high = g.epsilon_high if g.epsilon_high is not None else g.epsilon
    a = adv.unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - g.epsilon, 1 + high) * a)
    kl = None
    if ref is not None:
        delta = ref - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + g.beta * kl
    if g.loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif g.loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        loss = (per_token * m).sum() / (logps.shape[0] * g.max_new_tokens)
    clipped = ((ratio < 1 - g.epsilon) & (a < 0)) | ((ratio > 1 + high) & (a > 0))
    out = {"clipped": (clipped.float() * m).sum().detach()}
    if kl is not None:
        out["kl"] = (kl * m).sum().detach()
    return loss, out


def engine_weights(backend: Any, job: JobConfig) -> dict[str, Any] | None:
    """What the rollout engines load, on rank 0 (None elsewhere; every rank must call: ZeRO-3 gathers collectively):
    ``{"lora": {base weight name: (A, B, scaling)}}`` for an adapter, ``{"full": {name: tensor}}`` otherwise."""
    state = backend.full_state_dict()
    if state is None:
        return None

    def own(t: Any) -> Any:  # a copy: DeepSpeed's parameters are views of one flat buffer, which pickling would send whole
        return t.detach().float().cpu().clone()

    if not job.method.is_peft:
        return {"full": {k: own(v) for k, v in state.items()}}
    lora = {}
    for key, a in state.items():
        found = _LORA.match(key)
        if not found:
            continue
        path, adapter = found.groups()
        b = state[key.replace(f".lora_A.{adapter}.", f".lora_B.{adapter}.")]
        layer = backend.hf_module.get_submodule("base_model.model." + path if key.startswith("base_model.model.") else path)
        lora[path + ".weight"] = (own(a), own(b), float(layer.scaling[adapter]))
    return {"lora": lora}


class _Constraint:
    """The rollouts' structured-output grammar, to compute the trainer's log-probs of the same constrained distribution
    the engines sampled from (xgrammar, the library vLLM's default backend uses, compiled as vLLM does)."""

    def __init__(self, job: JobConfig, vocab_size: int):
        from hone.data import load_tokenizer

        self.vocab_size = vocab_size
        self.grammar = Constraints(load_tokenizer(job), vocab_size).compile(job.grpo.structured_outputs, any_whitespace=True)

    def bitmask(self, spans: list[tuple[int, list[int]]], rows: int, length: int) -> torch.Tensor:
        return token_bitmask(self.grammar, spans, rows, length, self.vocab_size)


def rollout_model_dir(job: JobConfig) -> str:
    """The folder the rollout engines load: the trainer's own model; a hub id at the job's ``model.revision``, the same
    snapshot the trainer reads."""
    from hone import assets

    model_dir = assets.resolve_model(job.model.name)
    if not Path(model_dir).is_dir():
        from huggingface_hub import snapshot_download

        model_dir = snapshot_download(model_dir, revision=job.model.revision)
    return str(model_dir)


def _prompt(row: dict[str, Any]) -> list[int]:
    """The prompt's ids of a cached prompt row (its reference answer follows them)."""
    return list(row["input_ids"])[: int(row["prompt_len"])]


class GRPOObjective(Objective):
    """GRPO on one worker: rollouts on the run's vLLM engines (started by :meth:`resources`), the clipped
    policy-ratio loss, and the weight syncs."""

    name = "grpo"
    may_idle = True  # a step whose groups all tie (on every rank) teaches nothing: no update, not a step on momentum

    @classmethod
    def passes(cls, job: JobConfig) -> int:
        return job.grpo.num_iterations

    @classmethod
    def check(cls, job: JobConfig, tokenizer: Any) -> None:
        from hone.data import check_sample

        check_sample(job, tokenizer)  # reward columns, prompts, before any Ray work

    @classmethod
    @contextlib.contextmanager
    def resources(cls, job: JobConfig, run_dir: Path, quiet: bool) -> Iterator[dict[str, Any]]:
        """The run's rollout engines on the cluster, started without waiting for them (they load while the training
        workers start; a worker's first rollout or sync waits, and a failed start fails the run with its cause)."""
        import uuid

        from hone.training.rollout import start_pool, stop_pool

        name = f"hone-rollout-{run_dir.name}-{uuid.uuid4().hex[:6]}"
        pool = start_pool(job, rollout_model_dir(job), name, wait=False, quiet=quiet)
        try:
            yield {"rollout_pool": name}
        finally:
            stop_pool(pool)

    def __init__(self, ctx: WorkerContext):
        import ray

        super().__init__(ctx)
        self.g = ctx.job.grpo
        self.names = reward_names(self.g.rewards)
        self.choices = [str(c) for c in (self.g.structured_outputs or {}).get("choice", [])]  # the answers counted
        self.pool = ray.get_actor(ctx.extras["rollout_pool"])
        self.reference = reference_model(ctx.job, ctx.backend, ctx.world_size) if self.g.beta > 0 else None
        self.changed = 0  # the step whose update last changed the trainer's weights: their version
        self.synced = -1  # the version the engines hold
        self.calls = 0
        self.replaced = 0  # engines the pool had replaced, as last seen (rank 0 counts them)
        self.probe: list[int] = []
        self._pending = self._zeros()
        self._step_started = time.perf_counter()
        self.constraint = _Constraint(ctx.job, int(ctx.backend.hf_module.config.vocab_size)) if self.g.structured_outputs else None
        # each prompt runs once for its k completions (its key/value cache shared), unless the model cannot
        self.shared = shares_prompts(ctx.backend.module, ctx.job.training.gradient_checkpointing)

    @property
    def n_stats(self) -> int:
        return len(GRPO_STATS) + 2 * len(self.names) + len(self.choices)

    def _zeros(self) -> torch.Tensor:
        import torch

        return torch.zeros(self.n_stats, dtype=torch.float64)

    def _count_choices(self, stats: torch.Tensor, texts: Sequence[str]) -> None:
        """How many completions gave each answer of a ``choice`` constraint (``answer_<choice>`` in the metrics)."""
        base = len(GRPO_STATS) + 2 * len(self.names)
        for i, choice in enumerate(self.choices):
            stats[base + i] += sum(t.strip() == choice for t in texts)

    def _put(self, stats: torch.Tensor, **values: float) -> None:
        for k, v in values.items():
            stats[GRPO_STATS.index(k)] += v

    # ------------------------------------------------------------------ rollouts
    def _rollouts(self, rows: Sequence[dict[str, Any]], greedy: bool = False) -> tuple[list[list[Generation]], dict[str, Any], list[dict]]:
        import ray
        import torch

        k = 1 if greedy else self.g.k
        sampling = Sampling(n=k, max_tokens=self.g.max_new_tokens, temperature=0.0 if greedy else self.g.temperature,
                            top_p=1.0 if greedy else self.g.top_p, stop=tuple(self.g.stop or ()), structured=self.g.structured_outputs)
        seeds = [int(x) for x in torch.randint(0, 2**31 - 1, (len(rows),))]
        index = self.rank + self.world_size * self.calls
        self.calls += 1
        out = ray.get(self.pool.generate.remote(index, [_prompt(r) for r in rows], sampling, seeds))
        data = [json.loads(r["row"]) for r in rows]
        return out["groups"], out, data

    def batch(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Sample ``k`` completions of each prompt, score them, and lay them out as one padded batch with advantages."""
        import torch

        start = time.perf_counter()
        groups, out, data = self._rollouts(rows)
        rollout_s = time.perf_counter() - start
        prompt_col = self.job.data.columns.prompt
        flat = [(i, o) for i, group in enumerate(groups) for o in group]
        terms = score(self.job, [str(data[i].get(prompt_col)) for i, _ in flat], [o.text for _, o in flat], [data[i] for i, _ in flat])
        rewards = torch.tensor([total_reward(self.job, t) for t in terms], dtype=torch.float64)
        adv = advantages(rewards, self.g.k, self.g.scale_rewards)
        grouped = rewards.view(-1, self.g.k)
        tied = grouped.max(1).values == grouped.min(1).values
        truncated = [o.finish_reason == "length" for _, o in flat]
        kept = list(range(len(groups)))
        if self.g.dynamic_sampling:  # one group stays when all tie: every rank runs the same passes (a zero gradient)
            kept = [i for i in kept if not tied[i]] or kept[:1]
        rows_kept = [b for b, (i, _) in enumerate(flat) if i in kept]
        prompts = [_prompt(rows[i]) for i in range(len(groups))]
        limit = self.job.data.max_length
        completions = [list(flat[b][1].token_ids)[: limit - len(prompts[flat[b][0]])] for b in rows_kept]
        batch = grouped_batch([prompts[i] for i in kept], completions, self.pad_id)
        if self.g.mask_truncated_completions:
            for row, b in enumerate(rows_kept):
                if truncated[b]:
                    batch["labels"][row] = -100
        width = batch["labels"].shape[1]
        if self.constraint is not None:  # one row per completion position (the first predicted from the prompt's end)
            batch["bitmask"] = self.constraint.bitmask([(1, c) for c in completions], len(completions), width)
        old_logps = torch.zeros(len(completions), width)
        for b, c in enumerate(completions):
            lps = (flat[rows_kept[b]][1].logprobs or [])[: len(c)]
            if lps:
                old_logps[b, : len(lps)] = torch.tensor(lps)
        stats = self._zeros()
        table = torch.tensor(terms, dtype=torch.float64)
        failed = torch.isnan(table)
        n_tokens = sum(len(o.token_ids) for _, o in flat)
        self._put(stats, n=len(flat), reward=float(rewards.sum()), reward_sq=float((rewards**2).sum()),
                  errors=float(failed.any(1).sum()), tokens=n_tokens, rollout_s=rollout_s, groups=len(groups),
                  ties=float(tied.sum()), truncated=float(sum(truncated)), dropped=float(len(groups) - len(kept)))
        if self.rank == 0:
            self._put(stats, replaced=out["replaced"] - self.replaced)
            self.replaced = out["replaced"]
        r = len(self.names)
        stats[len(GRPO_STATS):len(GRPO_STATS) + r] = torch.nan_to_num(table, nan=0.0).sum(0)
        stats[len(GRPO_STATS) + r:len(GRPO_STATS) + 2 * r] = (~failed).sum(0).double()
        self._count_choices(stats, [o.text for _, o in flat])
        device = self.backend.device
        adv = adv[torch.tensor(rows_kept, dtype=torch.long)]
        return {**{k: v.to(device) for k, v in batch.items()}, "advantages": adv.float().to(device), "old_logps": old_logps.to(device),
                "on_policy": out["version"] == self.changed, "stats": stats}

    def signal(self, batch: dict[str, Any]) -> bool:
        """Whether any group's rewards differ (else every advantage is 0 and the policy gradient with them)."""
        return bool((batch["advantages"] != 0).any())

    def idle_stats(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["stats"].clone()

    # ------------------------------------------------------------------ loss
    def _logps(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logps(model, batch, self.g.temperature, shared=self.shared)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logps, mask = self._logps(self.backend.module, batch)
        stats = batch["stats"].clone()
        engine_logps = batch["old_logps"]
        old = logps.detach() if batch["on_policy"] else engine_logps
        if batch["on_policy"]:
            gap = ((logps.detach() - engine_logps).abs() * mask).sum()
            batch["gap"] = (float(gap), float(mask.sum()))
            # later passes over these rollouts (num_iterations): the ratio's old policy is the one that sampled them,
            # these log-probs before the first update (TRL's old_per_token_logps)
            batch["old_logps"], batch["on_policy"] = old, False
        if "gap" in batch:
            self._put(stats, gap=batch["gap"][0], gap_tokens=batch["gap"][1])
        ref = None
        if self.reference is not None:
            ref = self.reference(lambda model: self._logps(model, batch)[0])
        loss, parts = grpo_loss(self.job, logps, old, batch["advantages"], mask, ref)
        self._put(stats, clipped=float(parts["clipped"]), kl=float(parts.get("kl", 0.0)),
                  kl_tokens=float(mask.sum()) if ref is not None else 0.0)
        return loss, stats

    def metrics(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        s = dict(zip(GRPO_STATS, (float(x) for x in stats)))
        n = max(s["n"], 1.0)
        mean = s["reward"] / n
        out = {"reward": mean, "reward_std": math.sqrt(max(s["reward_sq"] / n - mean**2, 0.0)), "reward_errors": s["errors"],
               "completion_length": s["tokens"] / n, "clip_ratio": s["clipped"] / max(s["tokens"], 1.0),
               "frac_reward_zero_std": s["ties"] / max(s["groups"], 1.0), "truncated_ratio": s["truncated"] / n}
        r = len(self.names)
        sums, counts = stats[len(GRPO_STATS):len(GRPO_STATS) + r], stats[len(GRPO_STATS) + r:len(GRPO_STATS) + 2 * r]
        for name, total, count in zip(self.names, sums, counts):
            out[f"reward_{name}"] = float(total) / max(float(count), 1.0)
        for choice, count in zip(self.choices, stats[len(GRPO_STATS) + 2 * r:]):  # the answer distribution
            out[f"answer_{choice}"] = float(count) / n
        if s["kl_tokens"]:
            out["kl"] = s["kl"] / s["kl_tokens"]
        if prefix:  # held-out prompts: the rewards (greedy, one completion each)
            keys = ("reward", *(f"reward_{name}" for name in self.names), *(f"answer_{c}" for c in self.choices))
            return {prefix + k: out[k] for k in keys}
        w = self.world_size
        steps = max(s["steps"] / w, 1.0)  # every rank counts each step (and its times): per-rank means below
        rollout, sync = s["rollout_s"] / w / steps, s["sync_s"] / w / steps
        out.update(rollout_tokens_per_s=s["tokens"] / max(s["rollout_s"] / w, 1e-9), rollout_time_s=rollout, sync_time_s=sync,
                   train_time_s=max(s["step_s"] / w / steps - rollout - sync, 0.0))
        if s["replaced"]:
            out["rollout_engines_replaced"] = s["replaced"]
        out["idle_steps"] = s["idle"] / w  # steps of the window that applied no update: every group tied
        if self.g.dynamic_sampling:
            out["frac_groups_dropped"] = s["dropped"] / max(s["groups"], 1.0)
        if s["gap_tokens"]:
            out["engine_logprob_gap"] = s["gap"] / s["gap_tokens"]
        if s["checks"]:
            out.update(sync_logprob_diff=s["sync_diff"] / s["checks"], sync_logprob_change=s["sync_change"] / s["checks"])
        return out

    def evaluate(self, rows: Sequence[dict[str, Any]], batch_size: int, rank: int) -> dict[str, float]:
        """Greedy completions of the held-out prompts on the engines (synced first): ``eval_reward`` and each term's."""
        import torch

        from hone.modeling import rank_batches

        if self.synced != self.changed:
            self._pending += self._sync()
        stats = self._zeros()
        for chunk, weight in rank_batches(rows, batch_size, rank, self.world_size):
            if not weight:
                continue
            groups, _, data = self._rollouts(chunk, greedy=True)
            prompt_col = self.job.data.columns.prompt
            terms = score(self.job, [str(d.get(prompt_col)) for d in data], [g[0].text for g in groups], data)
            table = torch.tensor(terms, dtype=torch.float64)
            r = len(self.names)
            self._put(stats, n=len(terms), reward=sum(total_reward(self.job, t) for t in terms))
            stats[len(GRPO_STATS):len(GRPO_STATS) + r] += torch.nan_to_num(table, nan=0.0).sum(0)
            stats[len(GRPO_STATS) + r:len(GRPO_STATS) + 2 * r] += (~torch.isnan(table)).sum(0).double()
            self._count_choices(stats, [g[0].text for g in groups])
        return self.metrics(self.all_reduce(stats), "eval_")

    # ------------------------------------------------------------------ weight sync
    def start(self, step: int, rows: Any) -> None:
        """Sync the engines with the trainer's weights (new, or loaded from a checkpoint) before the first rollout."""
        self.changed = step
        self.probe = _prompt(rows.take([0])[0])
        self._pending += self._sync()
        self._step_started = time.perf_counter()

    def after_step(self, step: int, updated: bool = True) -> torch.Tensor:
        stats, self._pending = self._pending, self._zeros()
        if updated:
            self.changed = step
        else:
            self._put(stats, idle=1.0)
        if step % self.g.sync_every == 0 and self.synced != self.changed:  # unchanged weights need no sync
            stats += self._sync()
        now = time.perf_counter()
        self._put(stats, step_s=now - self._step_started, steps=1.0)
        self._step_started = now
        return stats

    def _probe_logps(self) -> list[float]:
        import torch

        module = self.backend.module
        was_training = module.training
        module.eval()
        ids = torch.tensor([self.probe], device=self.backend.device)
        with torch.no_grad():
            logits = module(input_ids=ids, use_cache=False).logits[0, :-1].float()
        module.train(was_training)
        return torch.gather(logits.log_softmax(-1), 1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).cpu().tolist()

    def _sync(self) -> torch.Tensor:
        """Load the trainer's weights on every engine and check they took (rank 0 talks to the pool; all ranks wait)."""
        import ray
        import torch

        start = time.perf_counter()
        weights = engine_weights(self.backend, self.job)
        trainer = self._probe_logps()
        stats = self._zeros()
        if self.rank == 0:
            tolerance = self.g.tolerance(self.job.precision)
            before = ray.get(self.pool.check.remote(self.probe))
            ref = ray.put(weights)
            for attempt in range(self.g.sync_retries + 1):
                ray.get(self.pool.sync.remote([ref], self.changed))
                after = ray.get(self.pool.check.remote(self.probe))
                diff = max(abs(x - y) for engine in after for x, y in zip(engine, trainer))
                if diff <= tolerance:
                    break
                print(f"[hone] WARNING: weight sync {self.changed}: the rollout engines' log-probs differ from the trainer's by "
                      f"{diff:.3g} (> {tolerance:g}); retrying ({attempt + 1}/{self.g.sync_retries + 1})", flush=True)
            else:
                raise SyncError(f"weight sync {self.changed}: the rollout engines' log-probs still differ from the trainer's by {diff:.3g} "
                                f"after {self.g.sync_retries + 1} tries (grpo.sync_tolerance {tolerance:g}): the engines do not "
                                "hold the trained weights")
            change = max(abs(x - y) for a, b in zip(after, before) for x, y in zip(a, b))
            self._put(stats, sync_diff=diff, sync_change=change, checks=1.0)
        self.all_reduce(torch.zeros(1, dtype=torch.float64))  # every rank waits for the engines to hold the new weights
        self.synced = self.changed
        self._put(stats, sync_s=time.perf_counter() - start, syncs=1.0)
        return stats
