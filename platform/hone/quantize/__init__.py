"""Quantisation behind a quality gate: the methods (:mod:`hone.quantized`) and the gate (:mod:`hone.quantize.gate`)."""

from hone.config.quantization import CPU_DEFAULT, GPU_DEFAULT, METHODS, GateThresholds, QuantizeError
from hone.quantize.gate import QuantizeResult, Source, quantize, resolve_source
from hone.quantized import load_quantized

__all__ = ["CPU_DEFAULT", "GPU_DEFAULT", "METHODS", "GateThresholds", "QuantizeError", "QuantizeResult", "Source", "load_quantized",
           "quantize", "resolve_source"]
