"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of model replicas.

``build_app(args)`` is the application builder (``import_path: hone.serving.app:build_app``)
used both by ``hone serve`` and by the plain Ray Serve config ``hone serve --emit-serve-config``
writes for ``serve deploy`` and KubeRay's RayService.

Two deployments: ``OpenAIIngress`` (routes, auth, request validation, SSE framing, request
metrics) and ``ModelServer`` (the engine, batching scheduler, running/queued gauges), which
carries the serve YAML's autoscaling and queue bounds. Past ``max_queued_requests`` the
ingress's handle raises Ray Serve's BackPressureError, answered as 503 + Retry-After.
"""


import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve

from hone.serving.config import ServeConfig
from hone.serving.engine import Engine, GenRequest, RequestError

__all__ = ["build_app", "resolve", "api_key_hashes"]

logger = logging.getLogger("hone.serve")
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80]
_TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28]


def _quiet() -> None:
    for name in ("torchao", "torch.utils._pytree", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- resolving what to serve


class ServeError(RuntimeError):
    """The serve config names something that cannot be served (missing artifact, failed gate)."""


def resolve(cfg: ServeConfig) -> dict[str, Any]:
    """The replica's load spec: concrete paths, task, labels and engine settings (no registry lookups in replicas)."""
    from hone.quantize import INFO_FILE, quantized_artifact, resolve_source

    ref = cfg.model
    registry_info = None
    path = ref
    if ref.startswith("models:/"):
        from hone.registry import resolve_model_ref

        registry_info = resolve_model_ref(ref)
        path = registry_info["source"]
    quantized_dir: Path | None = None
    if (Path(path) / INFO_FILE).exists():
        quantized_dir = Path(path)
    elif cfg.quantization != "none":
        tag = (registry_info or {}).get("tags", {}).get(f"hone.quantized.{cfg.quantization}")
        candidate = Path(tag) if tag else quantized_artifact(ref, cfg.quantization)
        if not (candidate / INFO_FILE).exists():
            raise ServeError(f"no {cfg.quantization} artifact for {ref}: run `hone quantize {ref} --method {cfg.quantization}` first")
        quantized_dir = candidate
    spec: dict[str, Any] = {"served_name": cfg.served_name(), "device": cfg.device, "adapters": dict(cfg.adapters),
                            "max_loaded_adapters": cfg.max_loaded_adapters, "source": ref}
    if quantized_dir is not None:
        info = json.loads((quantized_dir / INFO_FILE).read_text())
        gate = info.get("gate") or {}
        if gate.get("passed") is not True and not cfg.allow_failed_gate:
            raise ServeError(f"{quantized_dir} failed its quality gate ({gate.get('rule', 'not measured')}): "
                             "serve the unquantised model, or set allow_failed_gate: true / pass --allow-failed-gate")
        job = info.get("job") or {}
        labels = ((job.get("task") or {}).get("labels")) or None
        return {**spec, "kind": "quantized", "path": str(quantized_dir), "task": info["task"], "labels": labels,
                "quantization": info["method"], "gate": gate.get("passed")}
    source = resolve_source(ref)
    labels = list(source.job.task.labels or []) or None
    return {**spec, "kind": source.kind, "path": source.path, "task": source.job.task.type, "labels": labels, "quantization": "none"}


def api_key_hashes(cfg: ServeConfig) -> list[str]:
    """SHA-256 digests of the accepted keys: ``HONE_API_KEYS`` (comma-separated) and ``api_keys_file``."""
    hashes = [hashlib.sha256(k.strip().encode()).hexdigest() for k in os.environ.get("HONE_API_KEYS", "").split(",") if k.strip()]
    if cfg.api_keys_file:
        for line in Path(cfg.api_keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip().lower()
            if line:
                if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
                    raise ServeError(f"{cfg.api_keys_file}: every line must be a SHA-256 hex digest (got {line[:12]}...)")
                hashes.append(line)
    return hashes


# --------------------------------------------------------------------------- OpenAI request models


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Req):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request (a string or a list of one string)")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class _Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def plain(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(_Req):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not (1 <= len(v) <= 256):
            raise ValueError("input takes 1 to 256 texts")
        return v


class _APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers or {}
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in e.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"])
        param = param or loc
        parts.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts), param


# --------------------------------------------------------------------------- the model replica


@serve.deployment(name="ModelServer")
class ModelServer:
    """One replica: the engine plus a scheduler that batches waiting requests into shared forward passes."""

    def __init__(self, spec: dict[str, Any], max_batch_size: int, batch_wait_timeout_s: float):
        _quiet()
        from ray.util import metrics

        self.engine = Engine(spec)
        self.name = spec["served_name"]
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._waiting: list[tuple[GenRequest, asyncio.Queue]] = []
        self._waiting_lock = threading.Lock()  # the engine thread admits waiting requests into a running batch
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._running = 0
        self._m_running = metrics.Gauge("hone_num_requests_running", "Requests in the batch being decoded.", tag_keys=("model",))
        self._m_waiting = metrics.Gauge("hone_num_requests_waiting", "Requests waiting to join a decoding batch.", tag_keys=("model",))
        self._m_batch = metrics.Histogram("hone_batch_size", "Sequences per decoding batch.", boundaries=[1, 2, 4, 8, 16, 32, 64],
                                          tag_keys=("model",))
        self._report_gauges()

    def _report_gauges(self) -> None:
        tags = {"model": self.name}
        self._m_running.set(self._running, tags=tags)
        self._m_waiting.set(len(self._waiting), tags=tags)

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
                loop.call_soon_threadsafe(queues[i].put_nowait, {"text": text, "finish_reason": finish, "completion_tokens": n})

            def admit(free: int, adapter: str | None = adapter) -> list[GenRequest]:
                """Engine thread, between decode steps: requests that arrived since the batch started join it."""
                if not self._waiting:  # a racy read is fine: anything missed waits for the next batch
                    return []
                with self._waiting_lock:
                    joined = self._take(adapter, free)
                if joined:
                    queues.extend(q for _, q in joined)  # emit's index i continues after the batch's own requests
                    loop.call_soon_threadsafe(self._joined, len(joined))
                return [r for r, _ in joined]

            try:
                await asyncio.to_thread(self.engine.generate_batch, [r for r, _ in batch], emit, admit, self.max_batch_size)
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error, the replica lives on
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

    def _joined(self, n: int) -> None:
        self._running += n
        self._report_gauges()
        self._m_batch.observe(self._running, tags={"model": self.name})

    async def generate(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream events for one request: text pieces, the last with a finish reason; the first also carries
        ``prompt_tokens``. A request that cannot run gets one event instead, ``{"error", "status", ...}``."""
        try:
            adapter = None if body["model"] == self.name else body["model"]
            if adapter is not None and adapter not in self.engine.adapter_names():
                raise RequestError(f"the model {body['model']!r} does not exist; this server has "
                                   f"{', '.join([self.name, *self.engine.adapter_names()])}", status=404, code="model_not_found",
                                   param="model")
            if self.engine.task != "causal_lm":
                raise RequestError("this model is a classifier: use /v1/classify", code="wrong_task")
            ids = self.engine.encode_prompt(body.get("prompt"), body.get("messages"))
            max_tokens = body.get("max_tokens") or min(body["default_max_tokens"], max(1, self.engine.context_length - len(ids)))
            self.engine.check_length(ids, max_tokens)
        except RequestError as e:
            yield {"error": str(e), "status": e.status, "code": e.code, "param": e.param}
            return
        req = GenRequest(ids, max_tokens, body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("stop") or [],
                         body.get("seed"), adapter)
        queue: asyncio.Queue = asyncio.Queue()
        with self._waiting_lock:
            self._waiting.append((req, queue))
        self._report_gauges()
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.create_task(self._schedule())
        self._wake.set()
        try:
            event = {**await queue.get(), "prompt_tokens": len(ids)}
            while True:
                yield event
                if event.get("finish_reason") or event.get("error"):
                    return
                event = await queue.get()
        finally:
            req.cancelled = True  # a client that went away frees its batch row at the next step

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A whole answer in one reply, for requests that do not stream: one round trip instead of a stream."""
        started = time.perf_counter()
        out: dict[str, Any] = {"text": "", "finish_reason": None, "completion_tokens": 0, "first_token_s": None}
        async for event in self.generate(body):
            if "error" in event:
                return event
            if event["text"] and out["first_token_s"] is None:
                out["first_token_s"] = time.perf_counter() - started
            out["prompt_tokens"] = event.get("prompt_tokens", out.get("prompt_tokens"))
            out["text"] += event["text"]
            out["finish_reason"] = event.get("finish_reason") or out["finish_reason"]
            out["completion_tokens"] = event["completion_tokens"]
        return out

    async def classify(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = [body["input"]] if isinstance(body["input"], str) else list(body["input"])
        if body["model"] != self.name:
            return {"error": f"the model {body['model']!r} does not exist; this server has {self.name}", "status": 404,
                    "code": "model_not_found"}
        try:
            return {"data": await asyncio.to_thread(self.engine.classify, texts),
                    "prompt_tokens": sum(len(self.engine.tokenizer(t)["input_ids"]) for t in texts)}
        except RequestError as e:
            return {"error": str(e), "status": e.status, "code": e.code}

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()


# --------------------------------------------------------------------------- the HTTP ingress

# Helpers the deployments use are defined above them: Serve serialises a deployment's class when
# the decorator runs, with the module globals that exist at that moment.


async def _after(first: dict[str, Any], rest: Any) -> AsyncIterator[dict[str, Any]]:
    """A stream whose first event was already read (``first`` ends it when it finishes or fails)."""
    yield first
    if not (first.get("finish_reason") or first.get("error")):
        async for event in rest:
            yield event


def _is_back_pressure(e: Exception) -> bool:
    """Ray Serve refused the call: the model deployment's queue is full (raised directly or wrapped by a remote caller)."""
    from ray.serve.exceptions import BackPressureError

    return isinstance(e, BackPressureError) or "BackPressureError" in type(e).__name__ or "max_queued_requests" in str(e)


api = FastAPI(title="hone", docs_url=None, redoc_url=None)


@api.exception_handler(_APIError)
async def _api_error(_: Request, e: _APIError) -> JSONResponse:
    return e.response()


@serve.deployment(name="OpenAIIngress")
@serve.ingress(api)
class OpenAIIngress:
    """OpenAI REST routes, API-key auth, validation, SSE framing and request metrics."""

    def __init__(self, model: Any, settings: dict[str, Any]):
        _quiet()
        from ray.util import metrics

        self.model = model
        self.name = settings["served_name"]
        self.adapters = list(settings.get("adapters") or [])
        self.task = settings["task"]
        self.key_hashes = [bytes.fromhex(h) for h in settings.get("api_key_hashes") or []]
        self.default_max_tokens = settings["max_tokens_default"]
        self.retry_after = str(settings.get("retry_after_s", 1))
        self.created = int(time.time())
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
        if not self.key_hashes:
            logger.warning("hone serve: no API keys configured: authentication is OFF")

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        if not self.key_hashes:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise _APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(digest, h) for h in self.key_hashes)
        if not ok:
            raise _APIError(401, "incorrect API key provided", code="invalid_api_key")

    def _record(self, model: str, route: str, status: int, started: float) -> None:
        self.m_requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.m_e2e.observe(time.perf_counter() - started, tags={"model": model, "route": route})

    async def _parse(self, request: Request, cls: type[BaseModel]) -> Any:
        try:
            raw = await request.json()
        except Exception:  # noqa: BLE001 - any decode failure is the client's
            raise _APIError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise _APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise _APIError(400, message, code="invalid_value", param=param) from None

    def _known(self, model: str) -> None:
        if model != self.name and model not in self.adapters:
            raise _APIError(404, f"the model {model!r} does not exist; this server has {', '.join([self.name, *self.adapters])}",
                            code="model_not_found", param="model")

    async def _start(self, body: dict[str, Any], stream: bool) -> tuple[dict[str, Any], Any]:
        """Send a request to the model deployment: the first event (or, not streaming, the whole answer) and the stream."""
        try:
            if stream:
                events = self.model.options(stream=True).generate.remote(body)
                first = await events.__anext__()
            else:
                first, events = await self.model.complete.remote(body), None
        except Exception as e:
            if _is_back_pressure(e):
                raise self._overloaded() from None
            raise
        if "error" in first:
            raise _APIError(first.get("status", 400), first["error"], code=first.get("code"), param=first.get("param"))
        return first, events

    def _overloaded(self) -> _APIError:
        return _APIError(503, "the server is at capacity: retry after a moment", code="server_overloaded",
                         headers={"Retry-After": self.retry_after}, kind="server_overloaded")

    async def _generate(self, request: Request, route: str, chat: bool) -> Any:
        started = time.perf_counter()
        model = "unknown"
        try:
            self._auth(request)
            req = await self._parse(request, ChatRequest if chat else CompletionRequest)
            model = req.model if (req.model == self.name or req.model in self.adapters) else "unknown"
            self._known(req.model)
            body: dict[str, Any] = {"model": req.model, "max_tokens": (getattr(req, "max_completion_tokens", None) or req.max_tokens),
                                    "temperature": req.temperature, "top_p": req.top_p, "stop": req.stops(), "seed": req.seed,
                                    "default_max_tokens": self.default_max_tokens}
            if chat:
                body["messages"] = [m.plain() for m in req.messages]
            else:
                body["prompt"] = req.text()
            sent = time.perf_counter()
            first, events = await self._start(body, req.stream)
        except _APIError as e:
            self._record(model, route, e.status, started)
            return e.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = first["prompt_tokens"]
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(first, events, rid, created, req.model, chat, prompt_tokens, include_usage, route, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        n, finish = first["completion_tokens"], first["finish_reason"]
        first_at = sent + first["first_token_s"] if first["first_token_s"] is not None else None
        self._token_metrics(req.model, started, first_at, n, prompt_tokens)
        self._record(model, route, 200, started)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": first["text"]}, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": first["text"], "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice], "usage": usage}

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

    async def _sse(self, first: dict[str, Any], stream: Any, rid: str, created: int, model: str, chat: bool, prompt_tokens: int,
                   include_usage: bool, route: str, started: float) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any], usage: dict[str, Any] | None = None, choices: bool = True) -> bytes:
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice] if choices else []}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n".encode()

        status, n, first_at = 200, 0, None
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            async for event in _after(first, stream):
                if "error" in event:
                    status = 500
                    yield f"data: {json.dumps({'error': {'message': event['error'], 'type': 'server_error'}})}\n\n".encode()
                    break
                n = event["completion_tokens"]
                finish = event.get("finish_reason")
                if event["text"]:
                    first_at = first_at or time.perf_counter()
                    piece = {"delta": {"content": event["text"]}} if chat else {"text": event["text"]}
                    yield chunk({"index": 0, **piece, "logprobs": None, "finish_reason": None})
                if finish:
                    piece = {"delta": {}} if chat else {"text": ""}
                    yield chunk({"index": 0, **piece, "logprobs": None, "finish_reason": finish})
            if include_usage and status == 200:
                yield chunk({}, {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}, choices=False)
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499  # the client went away: cancel the replica's generator, which frees its batch row
            stream.cancel()
            raise
        finally:
            self._token_metrics(model, started, first_at, n, prompt_tokens)
            self._record(model, route, status, started)

    # ------------------------------------------------------------------ routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        started = time.perf_counter()
        try:
            self._auth(request)
        except _APIError as e:
            self._record("unknown", "/v1/models", e.status, started)
            return e.response()
        self._record(self.name, "/v1/models", 200, started)
        data = [{"id": self.name, "object": "model", "created": self.created, "owned_by": "hone", "task": self.task}]
        data += [{"id": a, "object": "model", "created": self.created, "owned_by": "hone", "parent": self.name, "task": self.task}
                 for a in self.adapters]
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._generate(request, "/v1/completions", chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._generate(request, "/v1/chat/completions", chat=True)

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> Any:
        started = time.perf_counter()
        model, route = "unknown", "/v1/classify"
        try:
            self._auth(request)
            req = await self._parse(request, ClassifyRequest)
            self._known(req.model)
            model = req.model
            if self.task != "sequence_classification":
                raise _APIError(400, "this model is a causal LM: use /v1/completions or /v1/chat/completions", code="wrong_task")
            try:
                out = await self.model.classify.remote({"model": req.model, "input": req.input})
            except Exception as e:
                if _is_back_pressure(e):
                    raise self._overloaded() from None
                raise
            if "error" in out:
                raise _APIError(out["status"], out["error"], code=out.get("code"))
        except _APIError as e:
            self._record(model, route, e.status, started)
            return e.response()
        self.m_prompt.inc(out["prompt_tokens"], tags={"model": model})
        self._record(model, route, 200, started)
        return {"object": "list", "model": model, "data": out["data"],
                "usage": {"prompt_tokens": out["prompt_tokens"], "total_tokens": out["prompt_tokens"]}}


# --------------------------------------------------------------------------- the application builder


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve application builder: ``args = {"config": <serve YAML mapping>}`` (or the mapping itself)."""
    from hone.serving.config import validate_serve_config

    raw = args.get("config", args)
    cfg = validate_serve_config(raw)
    if cfg.engine == "vllm":
        from hone.serving.vllm import build_vllm_app

        return build_vllm_app(cfg, resolve(cfg))
    spec = resolve(cfg)
    options: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests, "max_queued_requests": cfg.max_queued_requests,
                               "ray_actor_options": dict(cfg.ray_actor_options)}
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = dict(cfg.autoscaling_config)
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    model = ModelServer.options(**options).bind(spec, cfg.max_batch_size, cfg.batch_wait_timeout_s)
    max_replicas = (cfg.autoscaling_config or {}).get("max_replicas", cfg.num_replicas or 1)
    capacity = max_replicas * (cfg.max_ongoing_requests + max(cfg.max_queued_requests, 0)) + 64
    settings = {"served_name": spec["served_name"], "adapters": list(cfg.adapters), "task": spec["task"],
                "api_key_hashes": api_key_hashes(cfg), "max_tokens_default": cfg.max_tokens_default, "retry_after_s": cfg.retry_after_s}
    return OpenAIIngress.options(max_ongoing_requests=capacity, ray_actor_options={"num_cpus": 0.1}).bind(model, settings)
