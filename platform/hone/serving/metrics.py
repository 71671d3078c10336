"""The ingress's request metrics (Prometheus, through Ray's metrics agent; hone_* series appear as ray_hone_*), and the
API-key check every route makes first."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from hone.serving.protocol import RequestError

__all__ = ["IngressMetrics", "check_key"]

_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80]
_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]


def check_key(headers: Any, key_hashes: list[bytes]) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` with a key whose SHA-256 is one of ``key_hashes``
    (compared in constant time); nothing to check when no key is configured."""
    if not key_hashes:
        return
    header = headers.get("authorization", "")
    if not header:
        raise RequestError("missing API key: send 'Authorization: Bearer <key>'", 401, code="invalid_api_key")
    scheme, _, key = header.partition(" ")
    digest = hashlib.sha256(key.strip().encode()).digest()
    if not (scheme.lower() == "bearer" and any(hmac.compare_digest(digest, h) for h in key_hashes)):
        raise RequestError("incorrect API key provided", 401, code="invalid_api_key")


class IngressMetrics:
    """Requests by model, route and status; end-to-end latency; time to first token and per output token; prompt and
    generated tokens; failovers (a request sent again, a stream resumed)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.requests = metrics.Counter("hone_requests_total", "HTTP requests by model, route and status.",
                                        tag_keys=("model", "route", "status"))
        self.e2e = metrics.Histogram("hone_e2e_request_latency_seconds", "Request latency, arrival to last byte.",
                                     boundaries=_LATENCY_BUCKETS, tag_keys=("model", "route"))
        self.ttft = metrics.Histogram("hone_time_to_first_token_seconds", "Arrival to the first generated token.",
                                      boundaries=_LATENCY_BUCKETS, tag_keys=("model",))
        self.tpot = metrics.Histogram("hone_time_per_output_token_seconds", "Mean time per generated token after the first.",
                                      boundaries=_TOKEN_BUCKETS, tag_keys=("model",))
        self.prompt = metrics.Counter("hone_prompt_tokens_total", "Prompt tokens processed.", tag_keys=("model",))
        self.generated = metrics.Counter("hone_generation_tokens_total", "Tokens generated.", tag_keys=("model",))
        self.recovered = metrics.Counter("hone_replica_failovers_total",
                                         "Requests whose model replica died, sent again (resend) or resumed mid-stream (resume).",
                                         tag_keys=("kind",))

    def request(self, model: str, route: str, status: int, started: float) -> None:
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.e2e.observe(time.perf_counter() - started, tags={"model": model, "route": route})

    def tokens(self, model: str, started: float, first_at: float | None, n: int, prompt_tokens: int) -> None:
        tags = {"model": model}
        now = time.perf_counter()
        if first_at is not None:
            self.ttft.observe(first_at - started, tags=tags)
            if n > 1:
                self.tpot.observe((now - first_at) / (n - 1), tags=tags)
        self.prompt.inc(prompt_tokens, tags=tags)
        if n:
            self.generated.inc(n, tags=tags)
