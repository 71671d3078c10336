"""Serving: a quantised (or full-precision) model on Ray Serve behind an OpenAI-compatible API."""

from hone.serving.config import ServeConfig, ServeConfigError, load_serve_config, validate_serve_config

__all__ = ["ServeConfig", "ServeConfigError", "load_serve_config", "validate_serve_config"]
