"""The model deployment: one replica's engine and the scheduler that batches requests into shared forward passes.

Requests for the same model or adapter wait in one list; the scheduler hands the engine a batch and,
between decode steps, admits requests that arrived meanwhile (continuous batching). Running and
waiting counts are exported as gauges; a failed batch fails its own requests, never the replica.
"""

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from hone.artifacts import localize
from hone.runtime import quiet_libraries
from hone.serving.autoscale import TTFTWindow
from hone.serving.engine import Engine, GenRequest
from hone.serving.protocol import RequestError, body_sampling, collect, require_model, require_task
from hone.serving.spec import DEFAULT_BATCH_SIZE, ServeSpec

__all__ = ["COMPILE_TIMEOUT_S", "ModelServer", "QueueGauges", "replica_id"]

COMPILE_TIMEOUT_S = 5.0
"""How long a structured-output grammar may take to compile before its request gets 400."""
_CRASH_ON = os.environ.get("HONE_TEST_CRASH_PROMPT")
"""Fault injection for the failover tests only: a completion whose prompt is this ends its replica's process."""

logger = logging.getLogger("hone.serve")


def replica_id() -> str:
    """This Serve replica's id, which the ingress returns as the ``X-Hone-Replica`` response header (which replica
    answered: to find it in Serve's logs and dashboard, or to follow a request through a failover); "" outside Serve."""
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # not running inside a Serve replica
        return ""


class QueueGauges:
    """The replica gauges the dashboard and alerts read, the same for both engines: requests decoding and waiting."""

    def __init__(self, model: str):
        from ray.util import metrics

        self.tags = {"model": model}
        self.running = metrics.Gauge("hone_num_requests_running", "Requests in the batch being decoded.", tag_keys=("model",))
        self.waiting = metrics.Gauge("hone_num_requests_waiting", "Requests waiting to join a decoding batch.", tag_keys=("model",))

    def set(self, running: int, waiting: int) -> None:
        self.running.set(running, tags=self.tags)
        self.waiting.set(waiting, tags=self.tags)


@serve.deployment(name="ModelServer")
class ModelServer:
    """One replica: the engine plus a scheduler that batches waiting requests into shared forward passes."""

    def __init__(self, spec: ServeSpec):
        quiet_libraries(redact=spec.redact_logs)
        from ray.util import metrics

        # a model from object storage is fetched onto this replica's node, never read from the deploying machine's disk
        spec = dataclasses.replace(spec, model=localize(spec.model, spec.content_sha256))
        self.model_path = spec.path
        self.engine = Engine(spec)
        self.replica = replica_id()
        self._encoding = ThreadPoolExecutor(1, thread_name_prefix="hone-encode")  # the engine's encoder is used by one thread
        # structured-output grammars compile apart from prompt encoding: a slow compile never stalls other requests
        self._compiling = ThreadPoolExecutor(2, thread_name_prefix="hone-grammar")
        self.name = spec.served_name
        self.ttft = TTFTWindow(spec.ttft_window_s)
        self.max_batch_size = spec.max_batch_size or DEFAULT_BATCH_SIZE
        self.batch_wait_timeout_s = spec.batch_wait_timeout_s
        self._waiting: list[tuple[GenRequest, asyncio.Queue]] = []
        self._waiting_lock = threading.Lock()  # the engine thread admits waiting requests into a running batch
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._running = 0
        self._gauges = QueueGauges(self.name)
        self._m_batch = metrics.Histogram("hone_batch_size", "Sequences per decoding batch.", boundaries=[1, 2, 4, 8, 16, 32, 64],
                                          tag_keys=("model",))
        self._report_gauges()

    def _report_gauges(self) -> None:
        self._gauges.set(self._running, len(self._waiting))

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.batch_wait_timeout_s and len(self._waiting) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_timeout_s)  # optional: gather a burst before starting
            with self._waiting_lock:
                self._waiting = [(r, q) for r, q in self._waiting if not r.cancelled]
                if not self._waiting:
                    self._wake.clear()
                    continue
                adapter = self._waiting[0][0].adapter
                batch = self._take(adapter, self.max_batch_size)
                if not self._waiting:
                    self._wake.clear()
            self._running = len(batch)
            self._report_gauges()
            self._m_batch.observe(len(batch), tags={"model": self.name})
            queues = [q for _, q in batch]

            def emit(i: int, text: str, finish: str | None, n: int) -> None:
                event = {"error": "generation failed for this request", "status": 500} if finish == "error" else \
                    {"text": text, "finish_reason": finish, "completion_tokens": n}
                loop.call_soon_threadsafe(queues[i].put_nowait, event)
                if finish:
                    loop.call_soon_threadsafe(self._left, 1)

            def admit(free: int, adapter: str | None = adapter) -> list[GenRequest]:
                """Engine thread, between decode steps: requests that arrived since the batch started join it."""
                if not self._waiting:  # a racy read is fine: anything missed waits for the next batch
                    return []
                with self._waiting_lock:
                    oldest = next((r for r, _ in self._waiting if not r.cancelled), None)  # (every decode step: no list)
                    if oldest is not None and oldest.adapter != adapter:
                        # The oldest waiting request needs another adapter (or the base): stop admitting, so this
                        # batch drains and that request goes next, however busy this model is (no starvation).
                        return []
                    joined = self._take(adapter, free)
                if joined:
                    queues.extend(q for _, q in joined)  # emit's index i continues after the batch's own requests
                    loop.call_soon_threadsafe(self._joined, len(joined))
                return [r for r, _ in joined]

            try:
                await asyncio.to_thread(self.engine.generate_batch, [r for r, _ in batch], emit, admit, self.max_batch_size)
            except Exception as e:  # every request of the batch gets the error, the replica lives on
                logger.exception("batch failed")
                for q in queues:
                    q.put_nowait({"error": f"generation failed: {type(e).__name__}", "status": 500})
            finally:
                self._running = 0
                self._report_gauges()

    def _take(self, adapter: str | None, n: int) -> list[tuple[GenRequest, asyncio.Queue]]:
        """Remove and return up to ``n`` live waiting requests for ``adapter`` (caller holds the lock)."""
        taken = [item for item in self._waiting if item[0].adapter == adapter and not item[0].cancelled][:n]
        ids = {id(item[0]) for item in taken}
        self._waiting = [item for item in self._waiting if id(item[0]) not in ids]
        return taken

    def _left(self, n: int) -> None:
        self._running = max(0, self._running - n)
        self._report_gauges()

    def _joined(self, n: int) -> None:
        self._running += n
        self._report_gauges()
        self._m_batch.observe(self._running, tags={"model": self.name})

    async def _compile(self, constraint: dict[str, Any]) -> Any:
        """The compiled grammar, or 400 when compiling takes longer than :data:`COMPILE_TIMEOUT_S` (the compile itself
        finishes in its thread; a pool of two bounds how many such threads there are)."""
        compiling = asyncio.get_running_loop().run_in_executor(self._compiling, self.engine.compile_constraint, constraint)
        try:
            return await asyncio.wait_for(compiling, COMPILE_TIMEOUT_S)
        except (asyncio.TimeoutError, TimeoutError):
            kind = next(iter(constraint))
            raise RequestError(f"the {kind} constraint did not compile within {COMPILE_TIMEOUT_S:g} s: simplify it",
                               code="invalid_value", param="structured_outputs") from None

    async def generate(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if _CRASH_ON and body.get("prompt") == _CRASH_ON:  # tests only: a request that ends the replica running it
            # while it runs, as a crash in the model would: Ray Serve itself re-sends, out of hone's count, a request
            # whose replica died before the replica's acceptance of it reached the router (sent before this code runs)
            await asyncio.sleep(0.5)
            with open(os.environ.get("HONE_TEST_CRASH_LOG", os.devnull), "a") as log:
                log.write(f"{os.getpid()}\n")
            os._exit(1)
        started, first = time.monotonic(), True
        async for event in self._generate(body):
            if first and "error" not in event:
                self.ttft.add(time.monotonic() - started)
            first = False
            yield event

    async def _generate(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream events for one request: text pieces, the last with a finish reason; the first also carries
        ``prompt_tokens``. A request that cannot run gets one event instead, ``{"error", "status", ...}``."""
        try:
            adapter = None if body["model"] == self.name else body["model"]
            require_model(body["model"], self.name, self.engine.adapter_names())
            require_task(self.engine.task, "causal_lm")
            # tokenising a long prompt takes a while: off the event loop, so other streams keep flowing meanwhile
            ids = await asyncio.get_running_loop().run_in_executor(self._encoding, self.engine.encode_prompt, body.get("prompt"),
                                                                   body.get("messages"))
            max_tokens = self.engine.max_tokens(ids, body.get("max_tokens"))
            grammar = None
            if body.get("structured"):
                grammar = await self._compile(body["structured"])
        except RequestError as e:
            yield e.event()
            return
        req = GenRequest(ids, body_sampling(body, max_tokens), adapter, grammar)
        queue: asyncio.Queue = asyncio.Queue()
        with self._waiting_lock:
            self._waiting.append((req, queue))
        self._report_gauges()
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.create_task(self._schedule())
        self._wake.set()
        try:
            event = {**await queue.get(), "prompt_tokens": len(ids), "replica": self.replica}
            while True:
                yield event
                if event.get("finish_reason") or event.get("error"):
                    return
                event = await queue.get()
        finally:
            req.cancelled = True  # a client that went away frees its batch row at the next step

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A whole answer in one reply, for requests that do not stream: one round trip instead of a stream."""
        return await collect(self.generate(body))

    async def classify(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = [body["input"]] if isinstance(body["input"], str) else list(body["input"])
        try:
            require_model(body["model"], self.name, [])
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(self._encoding, self.engine.count_tokens, texts)
            return {"data": await asyncio.to_thread(self.engine.classify, texts), "prompt_tokens": tokens}
        except RequestError as e:
            return e.event()

    def check_health(self) -> None:
        """Serve's periodic health check; it also re-exports the gauges (Ray drops a gauge that nobody sets for two
        export intervals, and an idle replica sets none)."""
        self._report_gauges()

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What hone's autoscaling policy (:mod:`hone.serving.autoscale`) reads of this replica, through Ray Serve."""
        return {"ttft_p90_s": self.ttft.p90(), "queue_depth": float(self.stats()["waiting"])}

    def stats(self) -> dict[str, int]:
        """Requests decoding and (live) requests waiting on this replica."""
        with self._waiting_lock:
            waiting = sum(1 for r, _ in self._waiting if not r.cancelled)
        return {"running": self._running, "waiting": waiting}
