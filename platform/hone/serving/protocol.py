"""The OpenAI protocol as hone serves it: request models, the error shape, and the checks every route shares."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ChatMessage", "ChatRequest", "ClassifyRequest", "CompletionRequest", "GenerationRequest", "RequestError", "require_model",
           "require_task", "validation_message"]


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


class GenerationRequest(BaseModel):
    """Fields completions and chat completions share."""

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


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request (a string or a list of one string)")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def plain(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
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


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in e.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"])
        param = param or loc
        parts.append(f"{loc}: {str(err['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts), param
