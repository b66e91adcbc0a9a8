"""Which tensor groups a load keeps in their file's own quantization (torch-free: kt plan asks too)."""
from __future__ import annotations


def kept_groups(quant) -> frozenset:
    """The tensor groups a load keeps in the file's quantization (a GGUF's blocks, pack-quantized int4)
    under config ``quant``: those whose format is none (routers and the embedding are always read as
    floats)."""
    from kt_core.config.schema import choice

    dense = choice(quant.dense)
    head = choice(quant.head) if quant.get("head") is not None else dense
    out = {"attention", "dense", "shared"} if dense == "none" else set()
    out |= {"experts"} if choice(quant.experts) == "none" else set()
    out |= {"lm_head"} if head == "none" else set()
    return frozenset(out)
