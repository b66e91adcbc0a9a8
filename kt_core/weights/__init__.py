"""Weight formats and loading."""
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight, dequantize, quantize

__all__ = ["ExpertWeights", "Quant", "QuantizedWeight", "dequantize", "quantize"]
