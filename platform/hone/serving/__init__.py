"""Serving: a quantised (or full-precision) model on Ray Serve behind an OpenAI-compatible API.

- :mod:`hone.serving.spec`: what a serve config serves (``ServeSpec``, ``IngressSettings``: model reference, gate rule,
  API keys), resolved once
- :mod:`hone.serving.protocol`: OpenAI request models, the error shape, the checks every route shares
- :mod:`hone.serving.engine`: the transformers engine (batched decoding, adapters, classification; grammars from
  :mod:`hone.grammar`, sampling as :class:`hone.generation.Sampling`)
- :mod:`hone.serving.replica`: the model deployment (engine + continuous-batching scheduler)
- :mod:`hone.serving.app`: the ingress deployment (routes, failover, draining) and the application builder
- :mod:`hone.serving.wire`: the OpenAI wire format (request → replica body, responses, server-sent events)
- :mod:`hone.serving.metrics`: the ingress's Prometheus metrics and the API-key check
- :mod:`hone.serving.failover`: requests whose replica died: sent again, or resumed mid-stream when repeatable
- :mod:`hone.serving.openapi`: the published OpenAPI document with the real request schemas
- :mod:`hone.serving.runner`: ``hone serve`` (the Ray session, HAProxy, clean stop)
- :mod:`hone.serving.vllm`: ``engine: vllm`` (vLLM's async engine in the model replicas, CPU or GPU)

The serve YAML's schema is :mod:`hone.config.serve`.
"""

from hone.config.serve import ServeConfig, ServeConfigError, load_serve_config, validate_serve_config
from hone.serving.runner import serve, serve_config_document
from hone.serving.spec import ServeError

__all__ = ["ServeConfig", "ServeConfigError", "ServeError", "load_serve_config", "serve", "serve_config_document",
           "validate_serve_config"]
