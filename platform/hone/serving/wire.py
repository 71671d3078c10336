"""The OpenAI wire format of the ingress, apart from the routes: a validated request turned into the replica's request
body, a replica's answer turned into the OpenAI response, and a replica's event stream framed as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from hone.serving.protocol import RequestError, format_logprobs

__all__ = ["StreamTally", "check_size", "completion_json", "mask_answers", "masked_events", "replica_body", "sse"]


def replica_body(req: Any, chat: bool) -> dict[str, Any]:
    """What a model replica's ``generate``/``complete`` takes for a validated completion or chat request (engine features
    only when asked: the request model refused them already when this engine has none)."""
    body: dict[str, Any] = {"model": req.model, "max_tokens": (getattr(req, "max_completion_tokens", None) or req.max_tokens),
                            "temperature": req.temperature, "top_p": req.top_p, "stop": req.stops(), "seed": req.seed}
    extras = {"logprobs": req.top_logprobs_asked(), "structured": req.constraint(),
              "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
    body.update({k: v for k, v in extras.items() if v is not None})
    if req.n > 1:
        body["n"] = req.n
    if chat:
        body["messages"] = [m.plain() for m in req.messages]
    else:
        body["prompt"] = req.text()
    return body


def check_size(body: dict[str, Any], max_n: int, max_request_tokens: int, max_tokens_default: int) -> None:
    """400 for a request that asks for more completions (``n``) or more tokens in all (``n`` × ``max_tokens``) than the
    serve config allows: one request holds one place in Serve's queue, whatever it asks the engine for."""
    n = int(body.get("n", 1))
    if n > max_n:
        raise RequestError(f"n is {n}; this server answers at most {max_n} completions per request (serve YAML max_n)",
                           code="invalid_value", param="n")
    total = n * int(body.get("max_tokens") or max_tokens_default)
    if n > 1 and total > max_request_tokens:  # one completion is bounded by the context window (the replica's 400)
        raise RequestError(f"n × max_tokens asks for {total} tokens; this server generates at most {max_request_tokens} per "
                           "request (serve YAML max_request_tokens): lower n or max_tokens", code="invalid_value", param="max_tokens")


def completion_json(first: dict[str, Any], body: dict[str, Any], model: str, chat: bool, rid: str, created: int) -> dict[str, Any]:
    """The (non-streamed) OpenAI response of a replica's whole answer."""
    prompt_tokens, n = first["prompt_tokens"], first["completion_tokens"]
    choices = []
    for c in first["choices"]:
        logprobs = format_logprobs(c.get("logprobs"), chat) if "logprobs" in body else None
        if chat:
            choices.append({"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": logprobs,
                            "finish_reason": c["finish_reason"]})
        else:
            choices.append({"index": c["index"], "text": c["text"], "logprobs": logprobs, "finish_reason": c["finish_reason"]})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}}


async def mask_answers(first: dict[str, Any]) -> dict[str, Any]:
    """A replica's whole answer with personal data masked in each choice's text (``mask_pii: output``), off the event loop."""
    from hone.privacy import redact

    texts = await asyncio.to_thread(lambda: [redact(c["text"]) for c in first["choices"]])
    return {**first, "choices": [{**c, "text": t} for c, t in zip(first["choices"], texts, strict=True)]}


async def masked_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """A replica's event stream with each choice's text masked (``mask_pii: output``) by a
    :class:`hone.privacy.StreamRedactor` of its own: an event's text is what can be released masked by then ("" while it is
    held back; its token count still goes on), and a choice's last event carries the rest."""
    from hone.privacy import StreamRedactor

    held: dict[int, StreamRedactor] = {}
    last: dict[int, dict[str, Any]] = {}
    try:
        async for event in events:
            if "error" in event:  # the stream breaks: what was held back still goes, masked, before the error
                for index, redactor in held.items():
                    if redactor.pending:
                        yield {**last[index], "text": await asyncio.to_thread(redactor.flush), "finish_reason": None}
                yield event
                continue
            index = event.get("index", 0)
            redactor, last[index] = held.setdefault(index, StreamRedactor()), event
            text = await asyncio.to_thread(redactor.release) if redactor.push(event["text"]) else ""
            if event.get("finish_reason"):
                text += await asyncio.to_thread(redactor.flush)
            yield {**event, "text": text}
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]


@dataclass
class StreamTally:
    """What a stream did, for its metrics once it ends: the HTTP-level status, tokens sent, when the first one went."""

    status: int = 200
    tokens: int = 0
    first_at: float | None = None


async def sse(events: AsyncIterator[dict[str, Any]], tally: StreamTally, *, rid: str, created: int, model: str, chat: bool,
              prompt_tokens: int, include_usage: bool, on_end: Callable[[], None]) -> AsyncIterator[bytes]:
    """A replica's events as OpenAI server-sent events: per-choice chunks (the chat role first), an error event when the
    stream breaks, the usage chunk when asked, then ``[DONE]``. ``on_end`` runs however the stream ends (a client that
    went away included: closing this generator cancels the replica's, which frees its batch row)."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any], usage: dict[str, Any] | None = None, choices: bool = True) -> bytes:
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice] if choices else []}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n".encode()

    opened: set[int] = set()
    try:
        async for event in events:
            if "error" in event:  # an SSE error event, then [DONE]: the client sees why its stream ended
                tally.status = int(event.get("status", 500))
                error = {"message": event["error"], "type": "server_error", "code": event.get("code")}
                yield f"data: {json.dumps({'error': error})}\n\n".encode()
                break
            tally.tokens = event["completion_tokens"]
            finish, index = event.get("finish_reason"), event.get("index", 0)
            if chat and index not in opened:  # each choice's first chunk carries the role (OpenAI does this per choice)
                opened.add(index)
                yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            if event["text"]:
                tally.first_at = tally.first_at or time.perf_counter()
                piece = {"delta": {"content": event["text"]}} if chat else {"text": event["text"]}
                logprobs = format_logprobs(event.get("logprobs"), chat) if "logprobs" in event else None
                yield chunk({"index": index, **piece, "logprobs": logprobs, "finish_reason": None})
            if finish:
                piece = {"delta": {}} if chat else {"text": ""}
                yield chunk({"index": index, **piece, "logprobs": None, "finish_reason": finish})
        if include_usage and tally.status == 200:
            n = tally.tokens
            yield chunk({}, {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}, choices=False)
        yield b"data: [DONE]\n\n"
    except asyncio.CancelledError:
        tally.status = 499  # the client went away: closing the replica's event generator frees its batch row
        raise
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
        on_end()
