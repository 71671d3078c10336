"""``engine: auto``: which engine serves a model, and why.

vLLM when it is installed and supports the model (its architecture, head size and dtype on this device), else hone's
transformers engine; the reason is printed by ``hone serve`` and recorded in the pipeline summary. Classification
models, hone's torch-quantised artifacts and ``batch_wait_timeout_s`` keep hone's engine; vLLM's own formats
(``w8a8-int8``, ``bf16``) need vLLM.

What vLLM supports is asked of the installed vLLM itself (its model registry, its CPU attention backend), in a
subprocess of vLLM's environment (:func:`hone.runtime.vllm_python`), and cached per installed vLLM under
``$HONE_HOME/cache``: about 6 s the first time, nothing after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hone.artifacts import ModelSpec
from hone.config import ServeConfig
from hone.config.quantization import VLLM_ONLY
from hone.errors import ServeError

__all__ = ["EngineChoice", "choose_engine", "vllm_capabilities"]

# Run in vLLM's environment: what this vLLM serves. Prints one JSON line.
_PROBE = """
import json, torch
import vllm
from vllm.model_executor.models.registry import ModelRegistry
from vllm.platforms import current_platform
out = {"version": vllm.__version__, "archs": sorted(ModelRegistry.get_supported_archs()),
       "device": current_platform.device_type, "head_sizes": None, "dtypes": None}
if out["device"] == "cpu":
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as B
    out["head_sizes"] = list(B.get_supported_head_sizes())
    out["dtypes"] = [str(d).removeprefix("torch.") for d in B.supported_dtypes]
print("HONE-PROBE " + json.dumps(out))
"""


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    """``transformers`` or ``vllm``."""
    reason: str


def _cache_key(python: str) -> str | None:
    """The installed vLLM's identity: the interpreter and its vLLM distribution's metadata folder (name and version)."""
    prefix = Path(python).absolute().parent.parent
    dists = sorted(p.name for p in prefix.glob("lib/python*/site-packages/vllm*.dist-info"))
    if not dists:
        return None
    return hashlib.sha256(f"{python}\0{dists}".encode()).hexdigest()[:16]


def vllm_capabilities(python: str | None) -> dict[str, Any]:
    """What the vLLM of ``python`` (None: this interpreter) serves: version, architectures, device, and on CPU the
    attention head sizes and dtypes. Raises RuntimeError when it cannot be asked."""
    from hone import assets

    python = python or sys.executable
    key = _cache_key(python)
    cached = assets.hone_home() / "cache" / f"vllm-capabilities-{key}.json" if key else None
    if cached is not None and cached.is_file():
        try:
            return json.loads(cached.read_text())
        except ValueError:
            pass  # a damaged cache entry is asked again
    out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((line for line in out.stdout.splitlines() if line.startswith("HONE-PROBE ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"asking vLLM ({python}) what it supports failed: {(out.stderr or out.stdout).strip()[-500:]}")
    caps = json.loads(line.removeprefix("HONE-PROBE "))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(caps))
        tmp.replace(cached)
    return caps


def _model_config(model: ModelSpec, trust_remote_code: bool) -> Any:
    """The Hugging Face config vLLM would load for ``model``."""
    from transformers import AutoConfig

    from hone import assets

    if model.kind == "export" and model.adapter:
        job = model.job
        assert job is not None
        path = assets.resolve_model(job.model.name)
    elif model.kind in ("export", "quantized"):
        path = model.path
    else:
        path = assets.resolve_model(model.path)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def choose_engine(cfg: ServeConfig, model: ModelSpec, quantization: str) -> EngineChoice:
    """The engine that serves ``model`` (already resolved, ``quantization`` its artifact's method or ``none``) under
    ``cfg``: the config's own choice, or ``auto``'s with its reason. ServeError when the model needs an engine that
    is not there."""
    if cfg.engine != "auto":
        return EngineChoice(cfg.engine, f"engine: {cfg.engine} in the serve config")
    hone_engine = "transformers"
    if model.task != "causal_lm":
        return EngineChoice(hone_engine, f"a {model.task} model: vLLM serves causal LMs here, hone's engine classifies")
    if quantization != "none" and quantization not in VLLM_ONLY:
        return EngineChoice(hone_engine, f"{quantization} is hone's torch-quantised format, which only hone's engine loads")
    if cfg.batch_wait_timeout_s:
        return EngineChoice(hone_engine, "batch_wait_timeout_s is a setting of hone's engine (vLLM schedules every step)")
    if cfg.adapters and not cfg.on_gpu():
        return EngineChoice(hone_engine, "several LoRA adapters on one base: vLLM's CPU LoRA path decodes ~6x slower than "
                                         "its base (docs/benchmarks.md); merge them, or set engine: vllm")
    needs = quantization in VLLM_ONLY
    try:
        from hone.runtime import vllm_python

        python = vllm_python(cfg.vllm_python)
        caps = vllm_capabilities(python)
    except RuntimeError as e:
        if needs:
            raise ServeError(f"{quantization} is vLLM's format and vLLM cannot be used here: {e}") from None
        return EngineChoice(hone_engine, f"vLLM is not available ({str(e).split(':')[0]}): `make setup` installs it")
    where = f"vLLM {caps['version']} ({python or sys.executable})"
    gpu = cfg.on_gpu()
    if gpu != (caps["device"] == "cuda"):
        why = f"the installed vLLM runs on {caps['device']}, this server on {'a GPU' if gpu else 'CPU'}"
        if needs:
            raise ServeError(f"{quantization} is vLLM's format, but {why}")
        return EngineChoice(hone_engine, why)
    try:
        config = _model_config(model, cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the model's config could not be read; hone's engine will say why
        return EngineChoice(hone_engine, f"its config could not be read for vLLM ({type(e).__name__})")
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    refusal = None
    if arch not in caps["archs"]:
        refusal = f"{where} does not support the architecture {arch}"
    elif caps.get("head_sizes"):
        heads = getattr(config, "num_attention_heads", 0) or 1
        head = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
        dtype = "bfloat16" if needs else "float32"
        if head not in caps["head_sizes"]:
            refusal = f"{where}'s CPU attention has no kernel for head size {head} (it has {caps['head_sizes']})"
        elif caps.get("dtypes") and dtype not in caps["dtypes"]:
            refusal = f"{where}'s CPU attention does not run {dtype}"
    if refusal:
        if needs:
            raise ServeError(f"{quantization} is vLLM's format, but {refusal}")
        return EngineChoice(hone_engine, refusal)
    return EngineChoice("vllm", f"{where} supports {arch} on {caps['device']}: the faster engine (docs/benchmarks.md)")
