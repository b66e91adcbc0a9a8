"""kt-core: hybrid accelerator + CPU inference for large Mixture-of-Experts models.

Public API: ``Engine`` (``from_pretrained``, ``logits``, ``generate``, ``tokenizer``).
"""
__version__ = "0.1.0"


def __getattr__(name):  # keep ``import kt_core`` light: torch loads on first use
    if name in ("Engine", "GenerationResult"):
        from kt_core.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'kt_core' has no attribute {name!r}")


__all__ = ["Engine", "GenerationResult", "__version__"]
