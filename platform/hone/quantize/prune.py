"""Structured pruning of a Llama-style model's MLP channels: the same number removed from every layer, so the result is
a standard Hugging Face config (a smaller ``intermediate_size``) that transformers and vLLM load unchanged, and smaller
and faster on every engine (unstructured sparsity is neither on a CPU).

Importance is Wanda's (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv:2306.11695) |weight| × ‖input activation‖ taken per channel, as its structured variant does (An et al., 2024,
FLAP, arXiv:2312.11983): channel ``j`` of a layer's MLP scores ‖X_j‖₂ · Σ_i |W_down[i, j]|, where X_j is the channel's
activation (``act(gate) * up``, the input of ``down_proj``) over calibration rows of the job's own training split.
A layer keeps its highest-scoring channels; ``gate_proj``/``up_proj`` lose those rows and ``down_proj`` those columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hone.config.quantization import QuantizeError

__all__ = ["PruneStats", "channel_scores", "kept_channels", "prune_mlp_channels"]


@dataclass
class PruneStats:
    intermediate_before: int
    intermediate_after: int
    params_before: int
    params_after: int

    @property
    def fewer_params(self) -> float:
        """The fraction of the model's parameters removed."""
        return 1.0 - self.params_after / self.params_before


def _mlps(model: Any) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in layers or []]
    if not mlps or not all(m is not None and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")) for m in mlps):
        raise QuantizeError(f"{type(model).__name__} has no gated MLP (gate_proj/up_proj/down_proj per layer) to prune: "
                            "MLP channel pruning takes Llama, Qwen, Mistral and SmolLM-style models")
    return mlps


def channel_scores(model: Any, batches: Sequence[Any]) -> list[Any]:
    """Each layer's MLP channel importance (a tensor of ``intermediate_size``) over ``batches`` (1 × T token tensors)."""
    import torch

    mlps = _mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]

    def hook(i: int) -> Any:
        def record(_: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[i] += (x * x).sum(0).cpu()
        return record

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [s.sqrt() * m.down_proj.weight.detach().abs().double().sum(0).cpu() for s, m in zip(sums, mlps)]


def kept_channels(intermediate: int, sparsity: float, multiple: int = 32) -> int:
    """Channels each layer keeps: ``(1 - sparsity) × intermediate`` rounded to a multiple of ``multiple`` (kernels
    prefer aligned widths), at least ``multiple``."""
    if not 0.0 <= sparsity < 1.0:
        raise QuantizeError(f"sparsity must be in [0, 1), not {sparsity}")
    return max(multiple, min(intermediate, int(round((1.0 - sparsity) * intermediate / multiple)) * multiple))


def prune_mlp_channels(model: Any, scores: Sequence[Any], keep: int) -> PruneStats:
    """Keep each layer's ``keep`` highest-scoring MLP channels, in place; the config's ``intermediate_size`` follows."""
    import torch

    mlps = _mlps(model)
    before_width = mlps[0].down_proj.in_features
    before = sum(p.numel() for p in model.parameters())
    for m, score in zip(mlps, scores):
        idx = torch.sort(torch.topk(score, keep).indices).values  # the kept channels, in their order
        for name in ("gate_proj", "up_proj"):
            old = getattr(m, name)
            new = torch.nn.Linear(old.in_features, keep, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
            new.weight.data = old.weight.data[idx].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[idx].clone()
            setattr(m, name, new)
        old = m.down_proj
        new = torch.nn.Linear(keep, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
        new.weight.data = old.weight.data[:, idx].clone()
        if old.bias is not None:
            new.bias.data = old.bias.data.clone()
        m.down_proj = new
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = keep
    model.config.intermediate_size = keep
    return PruneStats(before_width, keep, before, sum(p.numel() for p in model.parameters()))
