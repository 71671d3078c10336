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
from hone.serving.failover import MAX_DEATHS, RETRY_DELAYS_S, is_back_pressure, replica_died, replica_lost, resumable
from hone.serving.metrics import IngressMetrics, check_key
from hone.serving.openapi import openapi_schema
from hone.serving.protocol import (
    ENGINE_FEATURES,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    RequestError,
    parse_body,
    require_model,
    require_task,
)
from hone.serving.replica import ModelServer
from hone.serving.spec import IngressSettings, api_key_hashes, check_auth, ingress_settings, resolve
from hone.serving.wire import StreamTally, check_size, completion_json, mask_answers, masked_events, replica_body, sse

__all__ = ["build_app"]

logger = logging.getLogger("hone.serve")


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
        quiet_libraries(redact=settings.redact_logs)
        self.model = model
        self.settings = settings
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
        self.metrics = IngressMetrics()
        if settings.mask_output:  # Presidio's engines are built now, not on the event loop of the first answer
            from hone.privacy import redact

            redact("warm-up: ops@example.com")
        if not self.key_hashes:
            logger.warning("hone serve: no API keys configured: authentication is OFF")

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        check_key(request.headers, self.key_hashes)

    def _record(self, model: str, route: str, status: int, started: float) -> None:
        self.metrics.request(model, route, status, started)

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
        deaths = 0
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
                deaths += replica_died(e)
                if delay is None or deaths >= MAX_DEATHS:
                    raise self._unavailable(e, deaths) from None
                logger.warning("model replica lost (%s); attempt %d of %d", type(e).__name__, attempt + 2, len(RETRY_DELAYS_S) + 1)
                self.metrics.recovered.inc(tags={"kind": "resend"})
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

    def _unavailable(self, e: BaseException, deaths: int = 0) -> RequestError:
        why = (f"the model replicas running this request stopped {deaths} times ({type(e).__name__}); it is not sent again, as it "
               "may be what stops them" if deaths >= MAX_DEATHS else
               f"the model replica serving this request stopped ({type(e).__name__}); retry after a moment")
        return RequestError(why, 503, code="replica_unavailable", headers={"Retry-After": self.retry_after}, kind="server_error")

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
            body = replica_body(req, chat)
            if self.settings.mask_output and "logprobs" in body:
                raise RequestError("this server masks personal data in its answers (serve YAML mask_pii: output): logprobs, "
                                   "which carry the unmasked tokens, are not served", code="unsupported_parameter", param="logprobs")
            check_size(body, self.settings.max_n, self.settings.max_request_tokens, self.settings.max_tokens_default)
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
                               on_resume=lambda: self.metrics.recovered.inc(tags={"kind": "resume"}))
            if self.settings.mask_output:
                events = masked_events(events)
            return StreamingResponse(self._stream(events, rid, created, req.model, chat, prompt_tokens, include_usage, route, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid, **_replica_header(first)})
        if self.settings.mask_output:
            first = await mask_answers(first)
        n = first["completion_tokens"]
        first_at = sent + first["first_token_s"] if first["first_token_s"] is not None else None
        self.metrics.tokens(req.model, started, first_at, n, prompt_tokens)
        self._record(model, route, 200, started)
        return JSONResponse(completion_json(first, body, req.model, chat, rid, created), headers=_replica_header(first))

    def _stream(self, events: AsyncIterator[dict[str, Any]], rid: str, created: int, model: str, chat: bool, prompt_tokens: int,
                include_usage: bool, route: str, started: float) -> AsyncIterator[bytes]:
        """The SSE body (:func:`hone.serving.wire.sse`); when it ends, the request leaves the in-flight count and its
        metrics are recorded."""
        tally = StreamTally()

        def end() -> None:
            self._inflight -= 1
            self.metrics.tokens(model, started, tally.first_at, tally.tokens, prompt_tokens)
            self._record(model, route, tally.status, started)

        return sse(events, tally, rid=rid, created=created, model=model, chat=chat, prompt_tokens=prompt_tokens,
                   include_usage=include_usage, on_end=end)

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
        self.metrics.prompt.inc(out["prompt_tokens"], tags={"model": model})
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
        if cfg.autoscaling is not None:  # hone's policy on the replicas' TTFT and queue depth (hone.serving.autoscale)
            from hone.serving.autoscale import POLICY

            kwargs = cfg.autoscaling.model_dump(exclude={"window_s"})
            options["autoscaling_config"]["policy"] = {"policy_function": POLICY, "policy_kwargs": kwargs}
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    if spec.engine == "vllm":
        from hone.serving.vllm import VLLMServer, engine_args, replica_options

        model = VLLMServer.options(**replica_options(cfg, options)).bind(spec, engine_args(cfg, spec))
    else:
        model = ModelServer.options(**options).bind(spec)
    max_replicas = (cfg.autoscaling_config or {}).get("max_replicas", cfg.num_replicas or 1)
    capacity = max_replicas * (cfg.max_ongoing_requests + max(cfg.max_queued_requests, 0)) + 64
    return OpenAIIngress.options(max_ongoing_requests=capacity, ray_actor_options={"num_cpus": 0.1}).bind(
        model, ingress_settings(cfg, spec, hashes))
