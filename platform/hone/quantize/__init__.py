"""Quantisation and structured pruning behind a quality gate: the methods (:mod:`hone.quantized`, :mod:`hone.quantize.prune`)
and the gate (:mod:`hone.quantize.gate`)."""

from hone.config.quantization import CPU_DEFAULT, GPU_DEFAULT, METHODS, GateThresholds, QuantizeError
from hone.quantize.gate import QuantizeResult, Source, quantize, resolve_source
from hone.quantize.prune import PRUNE_METHODS, PruneResult, gate_pruned, prune
from hone.quantized import load_quantized

__all__ = ["CPU_DEFAULT", "GPU_DEFAULT", "METHODS", "PRUNE_METHODS", "GateThresholds", "PruneResult", "QuantizeError", "QuantizeResult",
           "Source", "gate_pruned", "load_quantized", "prune", "quantize", "resolve_source"]
