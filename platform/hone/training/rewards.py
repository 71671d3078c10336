"""The rewards a GRPO job declares: built-in verifiable rewards scored in the worker, user functions in Ray tasks.

:func:`score` returns one row per completion and one column per reward term (NaN where a term could not score the
sample: its function raised or returned something that is not a number). A failing reward marks samples, it never
ends the run: they score 0 for that term and are counted in ``reward_errors``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from hone.config import JobConfig
from hone.config.grpo import RewardConfig

__all__ = ["call_reward_function", "concise", "score", "total_reward"]


def _norm(text: Any) -> str:
    return " ".join(str(text).strip().split()).casefold().strip(" .!\"'")


def _expected(reward: RewardConfig, row: dict[str, Any], answer_column: str) -> str | None:
    column = reward.column or (answer_column if reward.type == "exact_match" else None)
    if column is None:
        return None
    value = row.get(column)
    return None if value is None else _norm(value)


def _builtin(reward: RewardConfig, completion: str, row: dict[str, Any], answer_column: str) -> float:
    expected = _expected(reward, row, answer_column)
    if reward.type == "exact_match":
        if expected is None:
            raise ValueError(f"no value in column {reward.column or answer_column!r}")
        return float(_norm(completion) == expected)
    if reward.type == "choice":
        said = _norm(completion)
        labels = [_norm(x) for x in reward.labels or []]
        if said not in labels:
            return 0.0
        return 1.0 if expected is None or said == expected else reward.partial
    if reward.type == "regex":
        found = re.search(reward.pattern or "", completion)
        if found is None:
            return 0.0
        return 1.0 if expected is None else float(_norm(found.group(1)) == expected)
    # json_schema
    try:
        value = json.loads(completion)
    except ValueError:
        return 0.0
    if reward.json_schema is None:
        return 1.0
    import jsonschema

    return float(jsonschema.Draft202012Validator(reward.json_schema).is_valid(value))


def call_reward_function(path: str, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    """Call a user reward function on a batch; where the batch call fails, one sample at a time, so one bad sample
    marks only itself. Failures and non-numbers come back as NaN."""
    import importlib

    module, _, name = path.partition(":")
    fn = getattr(importlib.import_module(module), name)

    def numbers(values: Any, n: int) -> list[float]:
        values = list(values)
        if len(values) != n:
            raise ValueError(f"{path} returned {len(values)} scores for {n} completions")
        return [float(v) if isinstance(v, int | float) and math.isfinite(float(v)) else math.nan for v in values]

    try:
        return numbers(fn(prompts=prompts, completions=completions, rows=rows), len(completions))
    except Exception:  # noqa: BLE001 - isolate the samples that fail
        pass
    out = []
    for p, c, r in zip(prompts, completions, rows):
        try:
            out += numbers(fn(prompts=[p], completions=[c], rows=[r]), 1)
        except Exception as e:  # noqa: BLE001 - a reward that raises marks its sample
            print(f"[hone] reward {path} failed on a sample: {type(e).__name__}: {e}", flush=True)
            out.append(math.nan)
    return out


def score(job: JobConfig, prompts: Sequence[str], completions: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Every reward term of ``job.grpo`` for each completion (``rows[i]`` is the data row completion i answers)."""
    import ray

    rewards = job.grpo.rewards
    answer_column = job.data.columns.answer
    table = [[math.nan] * len(rewards) for _ in completions]
    pending = {}
    for j, reward in enumerate(rewards):
        if reward.type == "function":
            # no CPU reserved: the training workers and engines hold the cluster's CPUs, and a reward is a light call
            task = ray.remote(num_cpus=0, max_retries=2)(call_reward_function)
            pending[j] = task.remote(reward.function, list(prompts), list(completions), [dict(r) for r in rows])
            continue
        for i, (c, r) in enumerate(zip(completions, rows)):
            try:
                table[i][j] = _builtin(reward, c, r, answer_column)
            except Exception as e:  # noqa: BLE001 - a row the reward cannot read marks its sample
                print(f"[hone] reward {reward.label} failed on a sample: {type(e).__name__}: {e}", flush=True)
    for j, ref in pending.items():
        try:
            values = ray.get(ref, timeout=job.grpo.reward_timeout_s)
        except Exception as e:  # noqa: BLE001 - the task itself failed (its node died, …): every sample marked
            if isinstance(e, ray.exceptions.GetTimeoutError):  # a hung reward would otherwise run on, one more per step
                ray.cancel(ref, force=True)
            print(f"[hone] reward {rewards[j].label} failed: {type(e).__name__}: {e}", flush=True)
            values = [math.nan] * len(completions)
        for i, v in enumerate(values):
            table[i][j] = v
    return table


def total_reward(job: JobConfig, terms: Sequence[float]) -> float:
    """A completion's reward: the weighted sum of its terms, a failed term counting 0."""
    return sum(r.weight * (0.0 if math.isnan(v) else v) for r, v in zip(job.grpo.rewards, terms))


def concise(prompts: list[str], completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    """An example reward function (``function: hone.training.rewards:concise``): 1 for an empty completion, falling
    linearly to 0 at 100 characters. The shape every user function has; a dense signal for the tiny recipe."""
    return [max(0.0, 1.0 - len(c.strip()) / 100.0) for c in completions]
