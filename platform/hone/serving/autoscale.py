"""Autoscaling on what LLM users watch: time to first token and queue depth, from the model replicas' own stats.

Each replica reports ``ttft_p90_s`` (the 90th percentile of its requests' time from arrival at the replica to their
first token, over the last ``window_s``) and ``queue_depth`` (requests waiting for a place in a batch) through Ray
Serve's ``record_autoscaling_stats``; :class:`LLMAutoscalingPolicy`, a Ray Serve custom autoscaling policy, adds a
replica while the worst replica's p90 TTFT is over ``target_ttft_p90_s`` or the replicas' mean queue is over
``target_queue_depth``, and removes one when every signal is under half its target and nothing waits. Serve applies
the deployment's ``min_replicas``/``max_replicas`` and ``upscale_delay_s``/``downscale_delay_s`` on top.

The policy is shipped to Serve's controller by value (cloudpickle): this module imports nothing of hone.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

__all__ = ["POLICY", "LLMAutoscalingPolicy", "TTFTWindow"]

POLICY = "hone.serving.autoscale:LLMAutoscalingPolicy"
"""The import path of :class:`LLMAutoscalingPolicy` (Ray Serve ``autoscaling_config.policy.policy_function``)."""


class TTFTWindow:
    """A replica's recent times to first token: the p90 over the last ``window_s`` seconds (0 when none)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._seen: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, ttft_s: float, now: float | None = None) -> None:
        self._seen.append((time.monotonic() if now is None else now, ttft_s))

    def p90(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        values = sorted(v for _, v in self._seen)
        return values[max(0, math.ceil(0.9 * len(values)) - 1)] if values else 0.0


class LLMAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (class form: constructed once with ``policy_kwargs``, called per tick)."""

    def __init__(self, target_ttft_p90_s: float | None = None, target_queue_depth: float | None = None):
        self.target_ttft = target_ttft_p90_s
        self.target_queue = target_queue_depth

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        current = ctx.current_num_replicas
        if current == 0:
            return (1 if ctx.total_num_requests > 0 else 0), {}
        metrics = ctx.aggregated_metrics or {}
        ttft = max((metrics.get("ttft_p90_s") or {}).values(), default=0.0)
        queue = sum((metrics.get("queue_depth") or {}).values()) / current
        over = (self.target_ttft is not None and ttft > self.target_ttft) or \
               (self.target_queue is not None and queue > self.target_queue)
        under = (self.target_ttft is None or ttft < 0.5 * self.target_ttft) and \
                (self.target_queue is None or queue < 0.5 * self.target_queue) and queue == 0
        desired = current + 1 if over else current - 1 if under and ctx.total_num_requests < current else current
        return desired, {"ttft_p90_s": ttft, "queue_depth": queue}
