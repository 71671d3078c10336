"""What a serve config serves: the model reference resolved once on the driver, the gate rule, the API keys.

:func:`resolve` turns a validated serve config into :class:`ServeSpec`, the one typed record both replica kinds
(hone's engine and vLLM's) are built from: the model reference resolved to a :class:`hone.artifacts.ModelSpec` (so
replicas never consult the registry) plus every setting a replica applies. :func:`ingress_settings` is the
ingress's share. A quantised artifact whose quality gate did not pass is refused here, before any Ray work.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from hone.artifacts import QUANTIZED_INFO, ModelSpec, quantized_dir, resolve_ref
from hone.config import ServeConfig
from hone.errors import ServeError

__all__ = ["DEFAULT_BATCH_SIZE", "IngressSettings", "ServeError", "ServeSpec", "api_key_hashes", "check_auth", "ingress_settings",
           "resolve"]

DEFAULT_BATCH_SIZE = 8
"""hone's engine: sequences decoded together when the serve config leaves ``max_batch_size`` unset (vLLM then keeps its
own ``max_num_seqs``)."""


@dataclass(frozen=True)
class ServeSpec:
    """What a model replica serves and how: resolved once (on the driver for ``hone serve``, on the cluster for
    ``serve deploy``) and handed to every replica."""

    served_name: str
    source: str
    """The model reference as the config gave it."""
    model: ModelSpec
    task: str
    labels: list[str] | None
    quantization: str
    """The artifact's method, or ``none``."""
    gate: bool | None
    """A quantised artifact's quality-gate verdict (None: not quantised)."""
    engine: str
    """``transformers`` or ``vllm``: the serve config's ``engine``, with ``auto`` decided (:mod:`hone.serving.choice`)."""
    device: str
    max_tokens_default: int
    """``max_tokens`` of a request that gives none, capped by the context window (:func:`hone.serving.engine.max_tokens_for`)."""
    max_batch_size: int | None
    """hone's engine: sequences per forward pass (None: :data:`DEFAULT_BATCH_SIZE`); vLLM: its ``max_num_seqs``."""
    batch_wait_timeout_s: float
    adapters: dict[str, str] = field(default_factory=dict)
    max_loaded_adapters: int = 4
    trust_remote_code: bool = False
    """The serve config's flag (never the artifact's)."""
    engine_reason: str = ""
    """Why this engine (``hone serve`` prints it)."""
    ttft_window_s: float = 10.0
    """How far back a replica's reported TTFT percentile looks (``autoscaling.window_s``)."""
    redact_logs: bool = False
    """Mask personal data in what the replica logs (``hone.privacy.redact_logging``)."""
    content_sha256: str | None = None
    """A model from object storage: the hash of its files as resolved here; each replica fetches the model itself onto its
    own node (:func:`hone.artifacts.localize`) and serves it only if it hashes the same."""

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def path(self) -> str:
        return self.model.path


@dataclass(frozen=True)
class IngressSettings:
    """What the HTTP ingress needs: the names it routes, the task, the accepted key digests and its limits."""

    served_name: str
    adapters: list[str]
    task: str
    engine: str
    api_key_hashes: list[str]
    retry_after_s: float
    max_request_bytes: int
    max_n: int
    max_request_tokens: int
    max_tokens_default: int
    redact_logs: bool = False
    mask_output: bool = False
    """``mask_pii: output``: personal data in every generated answer is masked before it leaves (:mod:`hone.privacy`)."""


def ingress_settings(cfg: ServeConfig, spec: ServeSpec, key_hashes: list[str]) -> IngressSettings:
    return IngressSettings(served_name=spec.served_name, adapters=list(spec.adapters), task=spec.task, engine=spec.engine,
                           api_key_hashes=list(key_hashes), retry_after_s=cfg.retry_after_s, max_request_bytes=cfg.max_request_bytes,
                           max_n=cfg.max_n, max_request_tokens=cfg.max_request_tokens, max_tokens_default=spec.max_tokens_default,
                           redact_logs=cfg.redact_logs, mask_output=cfg.mask_pii == "output")


def resolve(cfg: ServeConfig) -> ServeSpec:
    """The :class:`ServeSpec` of a validated serve config."""
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
    gate = None
    if model.kind == "quantized":
        verdict = model.info.get("gate") or {}
        if verdict.get("passed") is not True and not cfg.allow_failed_gate:
            raise ServeError(f"{model.path} failed its quality gate ({verdict.get('rule', 'not measured')}): "
                             "serve the unquantised model, or set allow_failed_gate: true / pass --allow-failed-gate")
        labels, quantization, gate = model.labels, model.info["method"], verdict.get("passed")
    else:
        pruned = model.info.get("pruned") if model.kind == "export" else None
        if pruned is not None and (pruned.get("gate") or {}).get("passed") is not True and not cfg.allow_failed_gate:
            verdict = pruned.get("gate") or {}
            raise ServeError(f"{model.path} is a pruned model whose quality gate "
                             + (f"failed ({verdict.get('rule')})" if verdict else "was never measured (hone prune did not finish)")
                             + f": serve the unpruned {pruned.get('from')}, or set allow_failed_gate: true / pass --allow-failed-gate")
        labels = (list(model.job.task.labels or []) or None) if model.job is not None else None
        quantization = "none"
    from hone import storage
    from hone.serving.choice import choose_engine

    engine = choose_engine(cfg, model, quantization)
    content = None
    if model.origin:  # a registered version's recorded hash was checked when it resolved: not hashed again
        from hone.registry import CONTENT_TAG

        content = ((model.registry or {}).get("tags") or {}).get(CONTENT_TAG) or storage.content_sha256(model.path)
    return ServeSpec(served_name=cfg.served_name(), source=ref, model=model, task=model.task, labels=labels,
                     quantization=quantization, gate=gate, engine=engine.engine, engine_reason=engine.reason, device=cfg.device,
                     max_tokens_default=cfg.max_tokens_default, max_batch_size=cfg.max_batch_size,
                     batch_wait_timeout_s=cfg.batch_wait_timeout_s, adapters=dict(cfg.adapters),
                     max_loaded_adapters=cfg.max_loaded_adapters, trust_remote_code=cfg.trust_remote_code,
                     content_sha256=content, ttft_window_s=cfg.autoscaling.window_s if cfg.autoscaling else 10.0,
                     redact_logs=cfg.redact_logs)


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
    """Fail closed: no API keys on an address other machines can reach (``serve deploy``/KubeRay: always) is refused
    unless the config says ``require_auth: false``, and then served with a loud warning."""
    import ipaddress

    host = cfg.host if host is None else host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if hashes or loopback:
        return
    if cfg.require_auth is False:
        import logging

        logging.getLogger("hone.serve").warning(
            "hone serve: %s is reachable from other machines and no API keys are configured (require_auth: false): "
            "anyone who can reach it can use the model", host)
        print(f"[hone] WARNING: serving on {host} without API keys (require_auth: false): an open API", flush=True)
        return
    raise ServeError(f"{host} is reachable from other machines, but no API keys are configured: set HONE_API_KEYS "
                     "(comma-separated) or api_keys_file, bind host: 127.0.0.1, or set require_auth: false to serve an "
                     "open API on purpose")
