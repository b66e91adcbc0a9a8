"""Weight formats and loading. The names below load on first use, so importing a light module of
this package (gguf or checkpoint helpers used by ``kt plan`` / ``kt config``) does not import torch."""
__all__ = ["ExpertWeights", "Quant", "QuantizedWeight", "dequantize", "quantize"]


def __getattr__(name: str):
    if name in __all__:
        from kt_core.weights import quant

        return getattr(quant, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
