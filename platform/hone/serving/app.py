"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of model replicas.

``build_app(args)`` is the application builder (``import_path: hone.serving.app:build_app``)
used both by ``hone serve`` and by the plain Ray Serve config ``hone serve --emit-serve-config``
writes for ``serve deploy`` and KubeRay's RayService.

Two deployments: ``OpenAIIngress`` (routes, auth, request validation, SSE framing, request
metrics) and ``ModelServer`` (:mod:`hone.serving.replica`: the engine, batching scheduler,
running/queued gauges), which carries the serve YAML's autoscaling and queue bounds. Past
``max_queued_requests`` the ingress's handle raises Ray Serve's BackPressureError, answered as
503 + Retry-After.
"""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve

from hone.config import validate_serve_config
from hone.runtime import quiet_libraries
from hone.serving.failover import RETRY_DELAYS_S, is_back_pressure, replica_lost, resumable
from hone.serving.openapi import openapi_schema
from hone.serving.protocol import (
    ENGINE_FEATURES,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    RequestError,
    format_logprobs,
    parse_body,
    require_model,
    require_task,
)
from hone.serving.replica import ModelServer
from hone.serving.spec import IngressSettings, api_key_hashes, check_auth, ingress_settings, resolve

__all__ = ["build_app"]

logger = logging.getLogger("hone.serve")
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80]
_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]


# --------------------------------------------------------------------------- the HTTP ingress

# Helpers the deployments use are defined above them: Serve serialises a deployment's class when
# the decorator runs, with the module globals that exist at that moment.


def _replica_header(first: dict[str, Any]) -> dict[str, str]:
    """``X-Hone-Replica``: the id of the model replica that answered (that started the stream, for a stream)."""
    return {"X-Hone-Replica": first["replica"]} if first.get("replica") else {}


api = FastAPI(title="hone", docs_url=None, redoc_url=None, openapi_url=None)  # /openapi.json is a route below, behind the key
@api.exception_handler(RequestError)
async def _api_error(_: Request, e: RequestError) -> JSONResponse:
    return e.response()


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """OpenAI REST routes, API-key auth, validation, SSE framing and request metrics."""

    def __init__(self, model: Any, settings: IngressSettings):
        quiet_libraries()
        from ray.util import metrics

        self.model = model
        self.name = settings.served_name
        self.adapters = list(settings.adapters)
        self.task = settings.task
        self.key_hashes = [bytes.fromhex(h) for h in settings.api_key_hashes]
        self.retry_after = str(settings.retry_after_s)
        self.max_request_bytes = settings.max_request_bytes
        self.engine = settings.engine
        self.supports = ENGINE_FEATURES[self.engine]
        self.created = int(time.time())
        self._openapi: dict[str, Any] | None = None
        self._inflight = 0
        self._draining = False
        tags = ("model", "route", "status")
        self.m_requests = metrics.Counter("hone_requests_total", "HTTP requests by model, route and status.", tag_keys=tags)
        self.m_e2e = metrics.Histogram("hone_e2e_request_latency_seconds", "Request latency, arrival to last byte.",
                                       boundaries=_LATENCY_BUCKETS, tag_keys=("model", "route"))
        self.m_ttft = metrics.Histogram("hone_time_to_first_token_seconds", "Arrival to the first generated token.",
                                        boundaries=_LATENCY_BUCKETS, tag_keys=("model",))
        self.m_tpot = metrics.Histogram("hone_time_per_output_token_seconds", "Mean time per generated token after the first.",
                                        boundaries=_TOKEN_BUCKETS, tag_keys=("model",))
        self.m_prompt = metrics.Counter("hone_prompt_tokens_total", "Prompt tokens processed.", tag_keys=("model",))
        self.m_generated = metrics.Counter("hone_generation_tokens_total", "Tokens generated.", tag_keys=("model",))
        self.m_recovered = metrics.Counter("hone_replica_failovers_total",
                                           "Requests whose model replica died, sent again (resend) or resumed mid-stream (resume).",
                                           tag_keys=("kind",))
        if not self.key_hashes:
            logger.warning("hone serve: no API keys configured: authentication is OFF")

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        if not self.key_hashes:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise RequestError("missing API key: send 'Authorization: Bearer <key>'", 401, code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(digest, h) for h in self.key_hashes)
        if not ok:
            raise RequestError("incorrect API key provided", 401, code="invalid_api_key")

    def _record(self, model: str, route: str, status: int, started: float) -> None:
        self.m_requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.m_e2e.observe(time.perf_counter() - started, tags={"model": model, "route": route})

    async def _parse(self, request: Request, cls: type[BaseModel]) -> Any:
        """The validated request: 413 past ``max_request_bytes`` (checked before reading), 400 for anything else amiss."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise self._too_large()
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > self.max_request_bytes:
                raise self._too_large()
        return parse_body(bytes(data), cls, self.supports)

    def _too_large(self) -> RequestError:
        return RequestError(f"the request body is larger than this server's limit of {self.max_request_bytes} bytes", 413,
                            code="request_too_large")

    async def _call(self, method: str, body: dict[str, Any], stream: bool = False) -> tuple[dict[str, Any], Any] | dict[str, Any]:
        """One call to the model deployment (streaming: its first event and the rest).

        Nothing has reached the client yet, so a call whose replica died is sent again (Serve routes it to a live
        replica) a few times before the client gets 503 + Retry-After.
        """
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
            events = None
            try:
                if stream:
                    events = getattr(self.model.options(stream=True), method).remote(body)
                    return await events.__anext__(), events
                return await getattr(self.model, method).remote(body)
            except asyncio.CancelledError:  # the client went away before its first token: free its place on the replica
                if events is not None:
                    events.cancel()
                raise
            except Exception as e:
                if is_back_pressure(e):
                    raise self._overloaded() from None
                if not replica_lost(e):
                    raise
                if delay is None:
                    raise self._unavailable(e) from None
                logger.warning("model replica lost (%s); attempt %d of %d", type(e).__name__, attempt + 2, len(RETRY_DELAYS_S) + 1)
                self.m_recovered.inc(tags={"kind": "resend"})
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _start(self, body: dict[str, Any], stream: bool) -> tuple[dict[str, Any], Any]:
        """The first event (or, not streaming, the whole answer) of a generation request, and the rest of its stream."""
        if stream:
            first, events = await self._call("generate", body, stream=True)
        else:
            first, events = await self._call("complete", body), None
        if "error" in first:
            raise RequestError(first["error"], first.get("status", 400), code=first.get("code"), param=first.get("param"))
        return first, events

    def _unavailable(self, e: BaseException) -> RequestError:
        return RequestError(f"the model replica serving this request stopped ({type(e).__name__}); retry after a moment", 503,
                            code="replica_unavailable", headers={"Retry-After": self.retry_after}, kind="server_error")

    def _overloaded(self) -> RequestError:
        return RequestError("the server is at capacity: retry after a moment", 503, code="server_overloaded",
                         headers={"Retry-After": self.retry_after}, kind="server_overloaded")

    async def _generate(self, request: Request, route: str, chat: bool) -> Any:
        started = time.perf_counter()
        model = "unknown"
        try:
            self._auth(request)
            req = await self._parse(request, ChatRequest if chat else CompletionRequest)
            model = req.model if (req.model == self.name or req.model in self.adapters) else "unknown"
            require_model(req.model, self.name, self.adapters)
            require_task(self.task, "causal_lm")
            body: dict[str, Any] = {"model": req.model, "max_tokens": (getattr(req, "max_completion_tokens", None) or req.max_tokens),
                                    "temperature": req.temperature, "top_p": req.top_p, "stop": req.stops(), "seed": req.seed}
            extras = {"logprobs": req.top_logprobs_asked(), "structured": req.constraint(),
                      "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
            body.update({k: v for k, v in extras.items() if v is not None})  # engine features (refused above if unsupported)
            if req.n > 1:
                body["n"] = req.n
            if chat:
                body["messages"] = [m.plain() for m in req.messages]
            else:
                body["prompt"] = req.text()
            sent = time.perf_counter()
            first, events = await self._start(body, req.stream)
        except RequestError as e:
            self._record(model, route, e.status, started)
            return e.response()
        except Exception as e:
            logger.exception("request failed")
            self._record(model, route, 500, started)
            return RequestError(f"the request failed on the server: {type(e).__name__}", 500, code="internal_error").response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = first["prompt_tokens"]
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            events = resumable(first, events, body, restart=lambda: self._start(body, True), lost=lambda e: self._unavailable(e).event(),
                               on_resume=lambda: self.m_recovered.inc(tags={"kind": "resume"}))
            return StreamingResponse(self._sse(events, rid, created, req.model, chat, prompt_tokens, include_usage, route, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid, **_replica_header(first)})
        n = first["completion_tokens"]
        first_at = sent + first["first_token_s"] if first["first_token_s"] is not None else None
        self._token_metrics(req.model, started, first_at, n, prompt_tokens)
        self._record(model, route, 200, started)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        choices = []
        for c in first["choices"]:
            logprobs = format_logprobs(c.get("logprobs"), chat) if "logprobs" in body else None
            if chat:
                choices.append({"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": logprobs,
                                "finish_reason": c["finish_reason"]})
            else:
                choices.append({"index": c["index"], "text": c["text"], "logprobs": logprobs, "finish_reason": c["finish_reason"]})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                             "model": req.model, "choices": choices, "usage": usage}, headers=_replica_header(first))

    def _token_metrics(self, model: str, started: float, first_at: float | None, n: int, prompt_tokens: int) -> None:
        tags = {"model": model}
        now = time.perf_counter()
        if first_at is not None:
            self.m_ttft.observe(first_at - started, tags=tags)
            if n > 1:
                self.m_tpot.observe((now - first_at) / (n - 1), tags=tags)
        self.m_prompt.inc(prompt_tokens, tags=tags)
        if n:
            self.m_generated.inc(n, tags=tags)

    async def _sse(self, events: AsyncIterator[dict[str, Any]], rid: str, created: int, model: str, chat: bool, prompt_tokens: int,
                   include_usage: bool, route: str, started: float) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any], usage: dict[str, Any] | None = None, choices: bool = True) -> bytes:
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice] if choices else []}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n".encode()

        status, n, first_at = 200, 0, None
        opened: set[int] = set()
        try:
            async for event in events:
                if "error" in event:  # an SSE error event, then [DONE]: the client sees why its stream ended
                    status = int(event.get("status", 500))
                    error = {"message": event["error"], "type": "server_error", "code": event.get("code")}
                    yield f"data: {json.dumps({'error': error})}\n\n".encode()
                    break
                n = event["completion_tokens"]
                finish, index = event.get("finish_reason"), event.get("index", 0)
                if chat and index not in opened:  # each choice's first chunk carries the role (OpenAI does this per choice)
                    opened.add(index)
                    yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                if event["text"]:
                    first_at = first_at or time.perf_counter()
                    piece = {"delta": {"content": event["text"]}} if chat else {"text": event["text"]}
                    logprobs = format_logprobs(event.get("logprobs"), chat) if "logprobs" in event else None
                    yield chunk({"index": index, **piece, "logprobs": logprobs, "finish_reason": None})
                if finish:
                    piece = {"delta": {}} if chat else {"text": ""}
                    yield chunk({"index": index, **piece, "logprobs": None, "finish_reason": finish})
            if include_usage and status == 200:
                yield chunk({}, {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}, choices=False)
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499  # the client went away: closing the event generator cancels the replica's, which frees its batch row
            raise
        finally:
            self._inflight -= 1
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
            self._token_metrics(model, started, first_at, n, prompt_tokens)
            self._record(model, route, status, started)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        try:
            self._auth(request)
        except RequestError as e:
            return e.response()
        if self._openapi is None:
            self._openapi = openapi_schema(api.routes, [self.name, *self.adapters])
        return self._openapi

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        started = time.perf_counter()
        try:
            self._auth(request)
        except RequestError as e:
            self._record("unknown", "/v1/models", e.status, started)
            return e.response()
        self._record(self.name, "/v1/models", 200, started)
        data = [{"id": self.name, "object": "model", "created": self.created, "owned_by": "hone", "task": self.task}]
        data += [{"id": a, "object": "model", "created": self.created, "owned_by": "hone", "parent": self.name, "task": self.task}
                 for a in self.adapters]
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._tracked(request, "/v1/completions", lambda: self._generate(request, "/v1/completions", chat=False))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._tracked(request, "/v1/chat/completions",
                                   lambda: self._generate(request, "/v1/chat/completions", chat=True))

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> Any:
        return await self._tracked(request, "/v1/classify", lambda: self._classify(request))

    # ------------------------------------------------------------------ draining (hone serve's SIGTERM)

    async def _tracked(self, request: Request, route: str, handle: Any) -> Any:
        """Count a request in flight until its answer is complete (a stream: until its last event is sent);
        while draining, new requests get 503 + Retry-After so a load balancer moves them elsewhere."""
        if self._draining:
            self._record("unknown", route, 503, time.perf_counter())
            return RequestError("the server is shutting down: retry after a moment", 503, code="server_shutting_down",
                                headers={"Retry-After": self.retry_after}, kind="server_error").response()
        self._inflight += 1
        streaming = False
        try:
            answer = await handle()
            streaming = isinstance(answer, StreamingResponse)  # its generator ends the count
            return answer
        finally:
            if not streaming:
                self._inflight -= 1

    async def drain(self) -> int:
        """Refuse new requests from now on; returns how many are still in flight."""
        self._draining = True
        return self._inflight

    async def _classify(self, request: Request) -> Any:
        started = time.perf_counter()
        model, route = "unknown", "/v1/classify"
        try:
            self._auth(request)
            req = await self._parse(request, ClassifyRequest)
            require_model(req.model, self.name, self.adapters)
            model = req.model
            require_task(self.task, "sequence_classification")
            out = await self._call("classify", {"model": req.model, "input": req.input})
            if "error" in out:
                raise RequestError(out["error"], out["status"], code=out.get("code"))
        except RequestError as e:
            self._record(model, route, e.status, started)
            return e.response()
        except Exception as e:
            logger.exception("request failed")
            self._record(model, route, 500, started)
            return RequestError(f"the request failed on the server: {type(e).__name__}", 500, code="internal_error").response()
        self.m_prompt.inc(out["prompt_tokens"], tags={"model": model})
        self._record(model, route, 200, started)
        return {"object": "list", "model": model, "data": out["data"],
                "usage": {"prompt_tokens": out["prompt_tokens"], "total_tokens": out["prompt_tokens"]}}


# --------------------------------------------------------------------------- the application builder


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: ``args = {"config": <serve YAML mapping>}`` (or the mapping itself).

    ``hone serve`` passes the spec it already resolved as ``args["spec"]`` and the key digests it already read as
    ``args["api_key_hashes"]`` (one resolution per start); ``serve deploy`` and KubeRay resolve here, on the cluster.
    """
    raw = args.get("config", args)
    cfg = validate_serve_config(raw)
    spec, hashes = args.get("spec"), args.get("api_key_hashes")
    if hashes is None:
        hashes = api_key_hashes(cfg)
    if spec is None:  # serve deploy / KubeRay: resolved on the cluster, whose HTTP proxy listens on every interface
        check_auth(cfg, hashes, host="0.0.0.0")
        spec = resolve(cfg)
    options: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests, "max_queued_requests": cfg.max_queued_requests,
                               "ray_actor_options": dict(cfg.ray_actor_options)}
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = dict(cfg.autoscaling_config)
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    if cfg.engine == "vllm":
        from hone.serving.vllm import VLLMServer, engine_args, replica_options

        model = VLLMServer.options(**replica_options(cfg, options)).bind(spec, engine_args(cfg, spec))
    else:
        model = ModelServer.options(**options).bind(spec)
    max_replicas = (cfg.autoscaling_config or {}).get("max_replicas", cfg.num_replicas or 1)
    capacity = max_replicas * (cfg.max_ongoing_requests + max(cfg.max_queued_requests, 0)) + 64
    return OpenAIIngress.options(max_ongoing_requests=capacity, ray_actor_options={"num_cpus": 0.1}).bind(
        model, ingress_settings(cfg, spec, hashes))
