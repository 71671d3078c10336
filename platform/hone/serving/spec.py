"""What a serve config serves: the model reference resolved once on the driver, the gate rule, the API keys.

:func:`resolve` turns ``cfg.model`` (and ``cfg.quantization``) into the replica's load spec: a
:class:`hone.artifacts.ModelSpec` plus the serving settings, so replicas never consult the registry.
A quantised artifact whose quality gate did not pass is refused here, before any Ray work.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from hone.artifacts import QUANTIZED_INFO, quantized_dir, resolve_ref
from hone.config import ServeConfig

__all__ = ["ServeError", "api_key_hashes", "check_auth", "resolve"]


class ServeError(RuntimeError):
    """The serve config names something that cannot be served (missing artifact, failed gate)."""


def resolve(cfg: ServeConfig) -> dict[str, Any]:
    """The replica's load spec: the resolved model (``model``), its task and labels, and the engine settings."""
    ref = cfg.model
    model = resolve_ref(ref)
    if model.kind != "quantized" and cfg.quantization != "none":
        tags = (model.registry or {}).get("tags") or {}
        tag = tags.get(f"hone.quantized.{cfg.quantization}")
        candidate = Path(tag) if tag else quantized_dir(model, cfg.quantization)
        if not (candidate / QUANTIZED_INFO).exists():
            raise ServeError(f"no {cfg.quantization} artifact for {ref}: run `hone quantize {ref} --method {cfg.quantization}` first")
        if tag:
            _check_registered_artifact(ref, candidate, tags.get(f"hone.quantized.{cfg.quantization}.sha256"))
        model = resolve_ref(str(candidate))
    spec: dict[str, Any] = {"served_name": cfg.served_name(), "device": cfg.device, "adapters": dict(cfg.adapters),
                            "max_loaded_adapters": cfg.max_loaded_adapters, "source": ref, "model": model, "kind": model.kind,
                            "path": model.path, "task": model.task}
    if model.kind == "quantized":
        gate = model.info.get("gate") or {}
        if gate.get("passed") is not True and not cfg.allow_failed_gate:
            raise ServeError(f"{model.path} failed its quality gate ({gate.get('rule', 'not measured')}): "
                             "serve the unquantised model, or set allow_failed_gate: true / pass --allow-failed-gate")
        return {**spec, "labels": model.labels, "quantization": model.info["method"], "gate": gate.get("passed")}
    job = model.job
    labels = list(job.task.labels or []) or None if job is not None else None
    return {**spec, "labels": labels, "quantization": "none"}


def _check_registered_artifact(ref: str, folder: Path, recorded: str | None) -> None:
    """A quantised artifact named by a registry tag is loaded only from hone's artifact store, and only if its
    content is what the registry recorded: whoever can write a tag cannot point every replica at other files."""
    import json

    from hone import assets

    store = (assets.hone_home() / "quantized").resolve()
    if not folder.resolve().is_relative_to(store):
        raise ServeError(f"{ref}: its registry tag points at {folder}, outside hone's artifact store {store}; refusing it "
                         "(serve that path explicitly if you trust it, or quantise again)")
    info = json.loads((folder / QUANTIZED_INFO).read_text())
    if not recorded or info.get("sha256") != recorded:
        raise ServeError(f"{ref}: the artifact {folder} is not the one the registry recorded (content hash "
                         f"{str(info.get('sha256'))[:12]}... vs {str(recorded)[:12]}...); quantise again with hone quantize")


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


def check_auth(cfg: ServeConfig, hashes: list[str], *, host: str | None = None) -> None:
    """``require_auth``: refuse to serve without API keys on an address other machines can reach."""
    import ipaddress

    host = cfg.host if host is None else host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if cfg.require_auth and not hashes and not loopback:
        raise ServeError(f"require_auth is set and {host} is reachable from other machines, but no API keys are configured: "
                         "set HONE_API_KEYS (comma-separated) or api_keys_file, or bind host: 127.0.0.1")
