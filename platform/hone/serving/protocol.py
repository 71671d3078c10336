"""The OpenAI protocol as hone serves it: request models, the error shape, and the checks every route shares."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hone.generation import Sampling
from hone.grammar import MAX_CONSTRAINT_BYTES

__all__ = [
    "ENGINE_FEATURES", "UNSUPPORTED", "ChatMessage", "ChatRequest", "ClassifyRequest", "CompletionRequest",
    "ContentPart", "GenerationRequest", "RequestError", "ResponseFormat", "StructuredOutputs", "body_sampling",
    "collect", "format_logprobs", "parse_body", "require_model", "require_task", "validation_message",
]


class RequestError(ValueError):
    """A request hone refuses or cannot serve as asked: an HTTP status and the OpenAI error body."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers or {}
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def event(self) -> dict[str, Any]:
        """The form a replica hands back to the ingress instead of raising across Ray."""
        return {"error": str(self), "status": self.status, "code": self.code, "param": self.param}


def require_model(model: str, served: str, adapters: list[str]) -> None:
    """404 unless ``model`` is the served model or one of its adapters."""
    if model != served and model not in adapters:
        raise RequestError(f"the model {model!r} does not exist; this server has {', '.join([served, *adapters])}", status=404,
                           code="model_not_found", param="model")


_OTHER_ROUTE = {"causal_lm": "this model is a classifier: use /v1/classify",
                "sequence_classification": "this model is a causal LM: use /v1/completions or /v1/chat/completions"}


def require_task(task: str, route_task: str) -> None:
    """400 when a route of one task (generation, classification) is asked of a model of the other."""
    if task != route_task:
        raise RequestError(_OTHER_ROUTE[route_task], code="wrong_task")


_SEED_RANGE = (-(2**63), 2**63 - 1)  # what vLLM and torch generators take


class _Strict(BaseModel):
    """Unknown fields are refused (an argument hone does not know would otherwise be silently ignored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # OpenAI parameters an engine may not implement, with the values that mean "off" (accepted by every engine).
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "response_format": (None, {"type": "text"}),
    "structured_outputs": (None,),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
}
"""Each is declared on the request models (so it is documented in /openapi.json) and refused with 400
``unsupported_parameter`` when set to anything but an "off" value, unless the serving engine implements it."""

ENGINE_FEATURES: dict[str, frozenset[str]] = {
    "transformers": frozenset({"response_format", "structured_outputs"}),
    "vllm": frozenset({"n", "logprobs", "top_logprobs", "response_format", "structured_outputs", "presence_penalty",
                       "frequency_penalty"}),
}
"""Which of the parameters above (and ``n > 1``) each engine implements."""


class ResponseFormat(BaseModel):
    """OpenAI ``response_format``: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("schema"), dict):
            raise ValueError("json_schema needs a 'schema' object (and optionally name, description, strict)")
        return v

    def constraint(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"json_object": True}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise RequestError("response_format of type json_schema needs json_schema.schema", param="response_format")
            return {"json": self.json_schema["schema"]}
        return None


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs (``extra_body={"structured_outputs": ...}``): exactly one of a choice among fixed
    strings, a regular expression, a JSON schema, or a grammar."""

    model_config = ConfigDict(extra="forbid")
    choice: list[str] | None = Field(default=None, min_length=1)
    regex: str | None = Field(default=None, min_length=1)
    json_: dict[str, Any] | None = Field(default=None, alias="json")
    grammar: str | None = Field(default=None, min_length=1)

    def constraint(self) -> dict[str, Any]:
        given = {k: v for k, v in self.model_dump(by_alias=True).items() if v is not None}
        if len(given) != 1:
            raise RequestError("structured_outputs takes exactly one of choice, regex, json, grammar", param="structured_outputs")
        if any(c == "" for c in given.get("choice", [])):
            raise RequestError("structured_outputs.choice takes non-empty strings", param="structured_outputs.choice")
        return given


def _unsupported_field() -> Any:
    return Field(default=None, description="Not supported by hone's engine: refused with 400 unless absent or off.")


def _same(value: Any, off: Any) -> bool:
    if off is None or isinstance(off, bool):
        return value is off
    if isinstance(off, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == off
    return value == off


class GenerationRequest(_Strict):
    """Fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """Below 1e-5 decoding is greedy (as in vLLM): dividing logits by a tiny temperature overflows."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_SEED_RANGE[0], le=_SEED_RANGE[1])
    stream: bool = False
    n: int = Field(default=1, ge=1)
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logit_bias: Any = _unsupported_field()
    response_format: ResponseFormat | None = Field(default=None, description="text, json_object or json_schema.")
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM's extension (extra_body): one of choice, regex, json, grammar.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Engine vllm.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="Engine vllm.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "" or (isinstance(v, list) and (len(v) > 4 or any(not s for s in v))):
            raise ValueError("stop takes a non-empty string or up to 4 non-empty strings")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self, supports: frozenset[str] = frozenset()) -> None:
        """400 for a parameter the serving engine does not implement, set to something other than off."""
        if self.n > 1 and "n" not in supports:  # (only engine transformers lacks it)
            raise RequestError("n > 1 is unsupported by this server's engine (transformers): send one request per completion, "
                               "or serve with engine: vllm", code="unsupported_parameter", param="n")
        for name, off in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if isinstance(value, BaseModel):
                value = value.model_dump(exclude_none=True)
            if name in self.model_fields_set and name not in supports and not any(_same(value, o) for o in off):
                raise RequestError(f"{name} is unsupported by this server's engine (transformers does not implement it): "
                                   "leave it out, or serve with engine: vllm", code="unsupported_parameter", param=name)

    def constraint(self) -> dict[str, Any] | None:
        """The structured-output constraint asked for (response_format or structured_outputs), if any."""
        if self.response_format is not None and self.structured_outputs is not None and self.response_format.type != "text":
            raise RequestError("give response_format or structured_outputs, not both", param="structured_outputs")
        if self.structured_outputs is not None:
            constraint = self.structured_outputs.constraint()
        else:
            constraint = self.response_format.constraint() if self.response_format is not None else None
        if constraint is not None and len(json.dumps(constraint)) > MAX_CONSTRAINT_BYTES:
            kind = next(iter(constraint))
            raise RequestError(f"the {kind} constraint is {len(json.dumps(constraint))} bytes; this server compiles constraints of "
                               f"at most {MAX_CONSTRAINT_BYTES} bytes: simplify it", code="invalid_value",
                               param="response_format" if self.structured_outputs is None else "structured_outputs")
        return constraint

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives per token to return with logprobs (None: no logprobs)."""
        return None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20,
                                 description="Alternatives per token with their log probabilities (engine vllm).")
    best_of: Any = _unsupported_field()
    echo: Any = _unsupported_field()
    suffix: Any = _unsupported_field()

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request (a string or a list of one string)")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ContentPart(_Strict):
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are unsupported: this model reads text parts only")
        return v

    @field_validator("text")
    @classmethod
    def _has_text(cls, v: str | None) -> str | None:
        if v is None:
            raise ValueError("a text part needs a string in 'text'")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def plain(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text or "" for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="Return each token's log probability (engine vllm).")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: alternatives per token (engine vllm).")
    tools: Any = _unsupported_field()
    tool_choice: Any = _unsupported_field()
    functions: Any = _unsupported_field()
    function_call: Any = _unsupported_field()
    parallel_tool_calls: Any = _unsupported_field()
    audio: Any = _unsupported_field()
    modalities: Any = _unsupported_field()
    prediction: Any = _unsupported_field()
    reasoning_effort: Any = _unsupported_field()
    web_search_options: Any = _unsupported_field()

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassifyRequest(_Strict):
    model: str
    input: str | list[str]
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not (1 <= len(v) <= 256):
            raise ValueError("input takes 1 to 256 texts")
        return v

    def unsupported(self, supports: frozenset[str] = frozenset()) -> None:
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(data: bytes, cls: type[BaseModel], supports: frozenset[str] = frozenset()) -> Any:
    """Decode and validate a request body: 400 for invalid JSON (NaN and Infinity included), invalid Unicode
    (a lone surrogate, which no tokenizer can encode), a field out of range, an unknown or unsupported argument."""
    import json

    try:
        raw = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    bad = _surrogate_path(raw)
    if bad is not None:
        raise RequestError(f"{bad or 'the body'} is not valid Unicode (a lone surrogate)", code="invalid_value", param=bad or None)
    try:
        req = cls.model_validate(raw)
    except ValidationError as e:
        message, param = validation_message(e)
        raise RequestError(message, code="invalid_value", param=param) from None
    req.unsupported(supports)
    return req


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) that is not encodable as UTF-8, else None."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p
        elif isinstance(v, dict):
            for k, item in v.items():
                sub = f"{p}.{k}" if p else str(k)
                try:
                    str(k).encode("utf-8")
                except UnicodeEncodeError:
                    return p
                stack.append((item, sub))
        elif isinstance(v, list):
            stack.extend((item, f"{p}.{i}") for i, item in enumerate(v))
    return None


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One line naming each offending field (union branches that merely had the wrong type are left out
    when another branch says what is wrong)."""
    errors = e.errors(include_url=False, include_input=False)
    specific = [err for err in errors if not err["type"].endswith("_type")]
    parts: list[str] = []
    param = None
    for err in (specific or errors)[:8]:
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and _UNION_TAG.match(x)))
        param = param or loc
        text = f"unrecognized request argument: {loc}" if err["type"] == "extra_forbidden" else \
            f"{loc}: {str(err['msg']).removeprefix('Value error, ')}"
        if text not in parts:
            parts.append(text)
    return "; ".join(parts), param


# --------------------------------------------------------------------------- replica events → OpenAI answers
#
# A model replica (either engine) streams events: {"index", "text", "finish_reason", "completion_tokens" (all choices
# so far), "logprobs"?: [{"token", "logprob", "top": [[token, logprob], ...]}], "more"?: True on a choice's last event
# while other choices still run}; the first also carries "prompt_tokens". A request that cannot run gets one
# {"error", "status", "code", "param"} event instead.


async def collect(events: Any) -> dict[str, Any]:
    """A whole answer from a replica's events (requests that do not stream): one choice per index, the first
    token's time, token counts; or the error event."""
    import time

    started = time.perf_counter()
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"completion_tokens": 0, "first_token_s": None, "prompt_tokens": 0}
    async for event in events:
        if "error" in event:
            return event
        if event["text"] and out["first_token_s"] is None:
            out["first_token_s"] = time.perf_counter() - started
        out["prompt_tokens"] = event.get("prompt_tokens", out["prompt_tokens"])
        if "replica" in event:
            out["replica"] = event["replica"]
        out["completion_tokens"] = event["completion_tokens"]
        c = choices.setdefault(event.get("index", 0), {"index": event.get("index", 0), "text": "", "finish_reason": None})
        c["text"] += event["text"]
        c["finish_reason"] = event.get("finish_reason") or c["finish_reason"]
        if "logprobs" in event:
            c.setdefault("logprobs", []).extend(event["logprobs"])
    return {**out, "choices": [choices[i] for i in sorted(choices)]}


def format_logprobs(entries: list[dict[str, Any]] | None, chat: bool) -> dict[str, Any] | None:
    """Token log probabilities in the OpenAI shape of chat (``content``) or completions (``tokens``, ...)."""
    entries = entries or []
    if chat:
        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

        return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in e["top"]]} for e in entries]}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def body_sampling(body: dict[str, Any], max_tokens: int) -> Sampling:
    """How a replica decodes a request body (the ingress's :func:`hone.serving.wire.replica_body`): the same
    :class:`~hone.generation.Sampling` for hone's engine and vLLM's, with ``max_tokens`` already resolved."""
    return Sampling(max_tokens=max_tokens, temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                    n=body.get("n", 1), stop=tuple(body.get("stop") or ()), seed=body.get("seed"), logprobs=body.get("logprobs"),
                    presence_penalty=body.get("presence_penalty") or 0.0, frequency_penalty=body.get("frequency_penalty") or 0.0,
                    structured=body.get("structured"))
