"""The OpenAPI document of the ingress: FastAPI's, plus the real request schemas (the handlers read raw bodies, so
FastAPI alone would declare none) and the error shape every refusal uses."""

from __future__ import annotations

from typing import Any

from hone.serving.protocol import UNSUPPORTED, ChatRequest, ClassifyRequest, CompletionRequest

__all__ = ["openapi_schema"]

_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest, "/v1/classify": ClassifyRequest}
_ERRORS = {"400": "invalid or unsupported request", "401": "missing or wrong API key", "404": "unknown model",
           "413": "request body too large", "503": "at capacity: retry after Retry-After seconds"}


def _json_ref(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def openapi_schema(routes: list[Any], models: list[str]) -> dict[str, Any]:
    """The OpenAPI document, with the real request schemas of the POST routes (the handlers read raw bodies,
    so FastAPI alone would declare none) and the error shape every refusal uses. ``model`` lists the names this
    server answers to; an unsupported OpenAI parameter is declared with the "off" values it accepts."""
    from fastapi.openapi.utils import get_openapi

    from hone.version import __version__

    doc = get_openapi(title="hone", version=__version__, routes=routes,
                      description="OpenAI-compatible API of a hone serve application.")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}
    for path, model in _BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        props = body["properties"]
        props["model"] = {**props["model"], "enum": list(models)}
        for name in set(props) & set(UNSUPPORTED):
            props[name] = {"enum": list(UNSUPPORTED[name]), "description": props[name].get("description", "")}
        schemas[model.__name__] = body
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": _json_ref(model.__name__)}
        op["responses"] = {"200": {"description": "the answer (JSON, or an SSE stream when stream is true)"},
                           **{code: {"description": text, "content": _json_ref("Error")} for code, text in _ERRORS.items()}}
    return doc
