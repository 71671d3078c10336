"""Quantised weights, below the model loader and the quantise stage: applying a method to a model, saving the artifact,
loading it back exactly.

The artifact records the module list it quantised, so it reloads with the recipe it was made with
(``load_quantized``), the way the server loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hone import assets
from hone.artifacts import QUANTIZED_INFO, QUANTIZED_STATE, model_class
from hone.config.quantization import GPU_ONLY
from hone.errors import QuantizeError

__all__ = [
    "apply_method", "artifact_digest", "default_modules", "int8_channel", "int8_token", "load_quantized",
    "quantized_linears", "save_quantized",
]

W8A8_CONFIG = {
    # compressed-tensors' description of W8A8 int8 (what llm-compressor writes and vLLM loads): int8 weights with one
    # scale per output channel, activations quantised to int8 per token at run time.
    "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
        "output_activations": None}},
    "kv_cache_scheme": None,
}

# Output layers stay in full precision (as bitsandbytes' llm_int8_skip_modules does): the LM head
# is often tied to the embeddings, whose outlier rows int8 represents badly.
_SKIP = ("lm_head", "score", "classifier", "embed_out")
# Dynamic int8 also quantises activations per tensor; the MLP output projection's inputs carry the
# outlier features LLM.int8() describes. Measured on SmolLM2-135M (16 validation rows, eval loss
# 1.479 in fp32): every linear layer dynamic-int8 4.54; all but down_proj 1.63 at the same speed.
_SKIP_DYNAMIC = _SKIP + ("down_proj", "fc2", "dense_4h_to_h")


def int8_token(x: Any) -> Any:
    """Symmetric int8 fake-quantisation per token (last dimension): vLLM's dynamic W8A8 activation scheme."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (x / scale).round().clamp(-127, 127) * scale


def int8_channel(w: Any) -> tuple[Any, Any]:
    """(int8 values, scale per output channel): symmetric absmax rounding, W8A8's weight scheme."""
    import torch

    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale


def quantized_linears(model: Any, skip: tuple[str, ...] = _SKIP) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in skip]


def default_modules(model: Any, method: str) -> list[str]:
    return quantized_linears(model, _SKIP_DYNAMIC if method == "int8-dynamic" else _SKIP)


def apply_method(model: Any, method: str, modules: list[str] | None = None) -> Any:
    """Quantise ``modules`` (default: the method's recipe) of ``model`` in place and return it.

    The artifact records the module list, so it reloads with the recipe it was made with.
    """
    modules = modules if modules is not None else default_modules(model, method)
    if method == "w8a8-int8":  # written quantised by save_quantized; the model stays in full precision until then
        return model
    if method == "bf16":
        import torch

        return model.to(torch.bfloat16)
    if method == "int8-dynamic":
        import torch
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {name: per_channel_dynamic_qconfig for name in modules}
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    chosen = set(modules)
    keep = lambda module, fqn: fqn in chosen  # noqa: E731
    if method == "int8-weight-only":
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=keep)
    elif method == "int4-weight-only":
        import torch

        # tinygemm's bf16 kernel (in torch itself): torchao's default packing needs the separate `mslk` package on CUDA
        model = model.to(torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"), filter_fn=keep)
    else:
        raise QuantizeError(f"{method} is applied at load time, not in place")
    return model


def artifact_digest(folder: str | Path) -> str:
    """SHA-256 over an artifact's weight files (names and bytes): what ``quantization.json`` and the registry record."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.name == QUANTIZED_STATE or p.suffix == ".safetensors")
    if not files:
        raise QuantizeError(f"{folder} holds no weights ({QUANTIZED_STATE} or *.safetensors)")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        assets.hash_file(path, digest)
    return digest.hexdigest()


def _skeleton(folder: Path, task: str, device: str = "cpu") -> Any:
    """An fp32 model of the artifact's architecture (weights come from the quantised state dict)."""
    from transformers import AutoConfig

    model = model_class(task).from_config(AutoConfig.from_pretrained(folder))
    return model.to(device).eval()


def load_quantized(folder: str | Path, device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info) from a quantised artifact, loaded exactly as the server loads it."""
    import torch
    from transformers import AutoTokenizer

    folder = Path(folder)
    info_path = folder / QUANTIZED_INFO
    if not info_path.exists():
        raise QuantizeError(f"{folder} is not a quantised artifact (no {QUANTIZED_INFO})")
    info = json.loads(info_path.read_text())
    method, task = info["method"], info["task"]
    recorded = info.get("sha256")
    if not recorded:
        raise QuantizeError(f"{folder} records no content hash (made by an older hone): quantise again with hone quantize")
    if artifact_digest(folder) != recorded:
        raise QuantizeError(f"{folder}: the weights changed since they were quantised (SHA-256 differs from {QUANTIZED_INFO}); "
                            "refusing to load them: quantise again")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = device or ("cuda" if method in GPU_ONLY or (torch.cuda.is_available() and method != "int8-dynamic") else "cpu")
    if device == "cuda":  # torchao's tensors loaded onto "cuda" do not assign onto a module on "cuda:0": name the index
        device = f"cuda:{torch.cuda.current_device()}"
    if method.startswith("bnb-"):
        return model_class(task).from_pretrained(folder, device_map=device).eval(), tokenizer, info
    if method == "w8a8-int8":
        return _load_w8a8(folder, task, info["quantized_modules"]), tokenizer, info
    if method == "bf16":
        return model_class(task).from_pretrained(folder, dtype=torch.bfloat16).to(device).eval(), tokenizer, info
    model = apply_method(_skeleton(folder, task, device), method, info.get("quantized_modules"))
    # weights only: no pickled code runs, whatever the file holds
    state = torch.load(folder / QUANTIZED_STATE, map_location=device, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise QuantizeError(f"{folder}: state dict does not match the architecture (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {unexpected[:5]})")
    return model.eval(), tokenizer, info


def save_quantized(model: Any, tokenizer: Any, method: str, folder: Path, modules: list[str] | None = None,
                   rounded: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Write the artifact's weights; ``rounded``: W8A8 int8 weights and scales already computed (calibrated) per
    linear, else each is rounded to the nearest level here."""
    import torch

    tokenizer.save_pretrained(folder)
    base = getattr(model, "config", None)
    if method.startswith("bnb-") or method == "bf16":
        model.save_pretrained(folder, safe_serialization=True)
        return
    if method == "w8a8-int8":
        _save_w8a8(model, folder, modules if modules is not None else default_modules(model, method), rounded or {})
        return
    base.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / QUANTIZED_STATE)


def _save_w8a8(model: Any, folder: Path, modules: list[str], rounded: dict[str, tuple[Any, Any]]) -> None:
    """A Hugging Face folder in compressed-tensors W8A8 int8: ``model.safetensors`` with int8 ``weight`` and fp32
    ``weight_scale`` (per output channel) for ``modules``, and the scheme in ``config.json``."""
    from safetensors.torch import save_file

    chosen = {f"{name}.weight" for name in modules}
    state: dict[str, Any] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and key.endswith("lm_head.weight"):  # tied to the embeddings: stored once
            continue
        seen.add(tensor.data_ptr())
        if key.removesuffix(".weight") in rounded:
            q, scale = rounded[key.removesuffix(".weight")]
            state[key], state[key.removesuffix("weight") + "weight_scale"] = q.contiguous(), scale.float().contiguous()
        elif key in chosen:
            q, scale = int8_channel(tensor.detach().float())
            state[key], state[key.removesuffix("weight") + "weight_scale"] = q.contiguous(), scale.contiguous()
        else:
            state[key] = tensor.detach().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    config.quantization_config = {**W8A8_CONFIG, "ignore": [name for name in _linear_names(model) if name not in set(modules)]}
    config.save_pretrained(folder)
    del config.quantization_config
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _linear_names(model: Any) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _load_w8a8(folder: Path, task: str, modules: list[str]) -> Any:
    """A W8A8 artifact as vLLM computes it, in torch: the int8 weights times their scales, and each quantised layer's
    input rounded to int8 per token (the gate measures these numerics; vLLM runs them with int8 kernels)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is plain fp32; the weights are dequantised below
    model = model_class(task).from_config(config).eval()
    state = load_file(folder / "model.safetensors")
    for name in modules:
        state[f"{name}.weight"] = state[f"{name}.weight"].float() * state.pop(f"{name}.weight_scale")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise QuantizeError(f"{folder}: weights do not match the architecture (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {unexpected[:5]})")
    if tied:
        model.tie_weights()

    def per_token_int8(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (int8_token(args[0]), *args[1:])

    named = dict(model.named_modules())
    for name in modules:
        named[name].register_forward_pre_hook(per_token_int8)
    return model
