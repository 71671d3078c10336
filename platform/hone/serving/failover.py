"""What the ingress does when a model replica dies under a request: which failures those are, which requests can be
sent again (all, before anything reached the client) or resumed mid-stream (greedy or seeded ones, regenerated on
another replica and continued after the text already sent)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from hone.serving.engine import GREEDY_BELOW
from hone.serving.protocol import RequestError

__all__ = ["MAX_DEATHS", "RETRY_DELAYS_S", "after", "is_back_pressure", "last", "repeatable", "replica_died", "replica_lost",
           "resumable"]

logger = logging.getLogger("hone.serve")


def last(event: dict[str, Any]) -> bool:
    """The event ends its request's stream (its choice finished and no other is still running)."""
    return bool(event.get("finish_reason")) and not event.get("more")


async def after(first: dict[str, Any], rest: Any) -> AsyncIterator[dict[str, Any]]:
    """A stream whose first event was already read (``first`` ends it when it finishes or fails)."""
    yield first
    if not (last(first) or first.get("error")):
        async for event in rest:
            yield event


REPLICA_LOST = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError")
REPLICA_DIED = ("RayActorError", "ActorDiedError")
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)
"""Waits before each new attempt of a request whose model replica died or could not be reached (Serve replaces it
meanwhile)."""
MAX_DEATHS = 2
"""A request whose replica died while running it is sent once more; if that replica dies too, the request is answered
503 and never sent a third time: it may be what ends them, and one request must not take down the service."""


def replica_died(e: BaseException) -> bool:
    """The replica was running the call when it died (not merely unreachable before the call reached it)."""
    return any(cls.__name__ in REPLICA_DIED for cls in type(e).__mro__)


def replica_lost(e: BaseException) -> bool:
    """The model replica serving a call died or became unreachable (not an error of the request itself)."""
    return any(cls.__name__ in REPLICA_LOST for cls in type(e).__mro__)


def repeatable(body: dict[str, Any]) -> bool:
    """Whether generating ``body`` again gives the same text (greedy or seeded, one choice): a stream can then resume elsewhere."""
    return body.get("n", 1) == 1 and (body.get("temperature", 1.0) < GREEDY_BELOW or body.get("seed") is not None)


def is_back_pressure(e: Exception) -> bool:
    """Ray Serve refused the call: the model deployment's queue is full (raised directly or wrapped by a remote caller)."""
    from ray.serve.exceptions import BackPressureError

    return isinstance(e, BackPressureError) or "BackPressureError" in type(e).__name__ or "max_queued_requests" in str(e)




async def resumable(first: dict[str, Any], stream: Any, body: dict[str, Any], restart: Callable[[], Awaitable[tuple[dict[str, Any], Any]]],
                lost: Callable[[BaseException], dict[str, Any]], on_resume: Callable[[], None]) -> AsyncIterator[dict[str, Any]]:
    """A request's events; when its replica dies mid-stream, a repeatable request (greedy or seeded) is generated
    again on another replica and continues after the text already sent. Anything else ends in an error event.
    Closing this generator early (the client went away) cancels the replica's, which frees its batch row."""
    sent = ""
    resumes = 0
    finished = False
    try:
        while True:
            regenerated = ""
            try:
                async for event in after(first, stream):
                    if "error" in event:
                        finished = True
                        yield event
                        return
                    regenerated += event["text"]
                    finish = last(event)
                    if len(regenerated) < len(sent) and not finish:
                        continue
                    if not regenerated.startswith(sent):
                        finished = True
                        yield {"error": "the request was resumed on another replica and its text diverged", "status": 500}
                        return
                    piece, sent = regenerated[len(sent):], max(sent, regenerated, key=len)
                    if finish:
                        finished = True
                    if piece or event.get("finish_reason"):
                        yield {**event, "text": piece}
                    if finish:
                        return
                finished = True
                return
            except Exception as e:
                if not replica_lost(e):
                    logger.exception("stream failed")
                    finished = True
                    yield {"error": f"generation failed: {type(e).__name__}", "status": 500}
                    return
                if not repeatable(body) or resumes + 1 >= MAX_DEATHS:  # this replica died: the stream's second death ends it
                    finished = True
                    yield lost(e)
                    return
                resumes += 1
                logger.warning("model replica lost mid-stream (%s): resuming on another replica", type(e).__name__)
                on_resume()
                try:
                    first, stream = await restart()
                except RequestError as refused:
                    finished = True
                    yield refused.event()
                    return
    finally:
        if not finished:
            stream.cancel()
