"""Quantisation methods and quality-gate thresholds: the one list every YAML, command and stage reads.

Methods: ``int8-dynamic`` (torch dynamic int8, CPU), ``int8-weight-only`` (torchao, CPU or GPU),
``int4-weight-only`` (torchao, GPU), ``bnb-8bit`` / ``bnb-4bit`` (bitsandbytes, GPU), and ``w8a8-int8`` (vLLM's format:
compressed-tensors int8 weights per channel and int8 activations per token, calibrated with SmoothQuant and GPTQ on rows
of the job's training split) and ``bf16`` (the weights in bfloat16), both served by vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hone.errors import QuantizeError

__all__ = ["CPU_DEFAULT", "GPU_DEFAULT", "GPU_ONLY", "METHODS", "PRUNE_METHODS", "VLLM_ONLY", "GateThresholds", "PruneMethod",
           "QuantizeError", "QuantMethod", "check_method", "default_method"]

QuantMethod = Literal["int8-dynamic", "int8-weight-only", "int4-weight-only", "bnb-8bit", "bnb-4bit", "w8a8-int8", "bf16"]
METHODS: tuple[str, ...] = QuantMethod.__args__  # type: ignore[attr-defined]
PruneMethod = Literal["mlp-channels", "layers"]
PRUNE_METHODS: tuple[str, ...] = PruneMethod.__args__  # type: ignore[attr-defined]
"""Structured pruning methods (:mod:`hone.quantize.prune`): ``mlp-channels`` cuts the same MLP channels from every layer,
``layers`` removes whole decoder layers (those that change their input least)."""
GPU_ONLY = frozenset({"int4-weight-only", "bnb-8bit", "bnb-4bit"})
VLLM_ONLY = frozenset({"w8a8-int8", "bf16"})
"""Artifacts that only ``engine: vllm`` serves (their gate times decoding on vLLM); the others only ``engine: transformers``."""
# Measured on the 2-core reference machine with SmolLM2-135M (greedy decode, ms per token): fp32 67,
# dynamic int8 38-39, torchao int8 weight-only 73 (no faster int8 CPU kernel): dynamic int8 is the CPU default.
CPU_DEFAULT = "int8-dynamic"
GPU_DEFAULT = "int8-weight-only"


def default_method() -> str:
    """The method used when none is given: this machine's default."""
    import torch

    return GPU_DEFAULT if torch.cuda.is_available() else CPU_DEFAULT


def check_method(method: str) -> None:
    """Raise :class:`QuantizeError` unless ``method`` is known and runs on this machine."""
    import torch

    if method not in METHODS:
        raise QuantizeError(f"unknown quantisation method {method!r}; choose one of {', '.join(METHODS)}")
    if method in GPU_ONLY and not torch.cuda.is_available():
        raise QuantizeError(f"{method} needs a CUDA GPU (no GPU here); on CPU use int8-dynamic or int8-weight-only")
    if method.startswith("bnb-"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise QuantizeError(f"{method} needs bitsandbytes: pip install 'hone[gpu]'") from e


@dataclass(frozen=True)
class GateThresholds:
    """How much worse the quantised model may be; ``None`` leaves that measure unchecked.

    ``max_relative_loss_increase``: eval loss, relative (causal LM). ``max_accuracy_drop``: accuracy
    points as a fraction (classification accuracy; for causal LM on instruction/chat data, the accuracy
    of the generated answers, the measure a task like sentiment is judged by).
    """

    max_relative_loss_increase: float | None = 0.01
    max_accuracy_drop: float | None = 0.01

    def __post_init__(self) -> None:
        if self.max_relative_loss_increase is None and self.max_accuracy_drop is None:
            raise QuantizeError("the quality gate would check nothing: give a loss or an accuracy threshold")
