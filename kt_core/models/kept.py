"""Weights kept in the quantization their file stores them in (a GGUF's blocks that a kt-core
format holds exactly), stacked for the loader without a second copy."""
from __future__ import annotations

from typing import Optional

import torch

from kt_core.models.names import moe_names
from kt_core.models.spec import ModelSpec
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight


def kept(ck, names: list[str], shape) -> Optional[QuantizedWeight]:
    """The named weights stacked in the format their file quantized them in, when the checkpoint
    holds them in one kt-core represents exactly (a GGUF's blocks: gguf_repack.repack); else None."""
    if not hasattr(ck, "quantized") or not all(ck.keeps(n) for n in names):
        return None
    first = ck.quantized(names[0], shape)
    if first is None or len(names) == 1:
        return first
    kind = (first.format, first.group_size, first.zeros is None)
    stacked = [None if t is None else torch.empty((len(names), *t.shape), dtype=t.dtype)
               for t in (first.qdata, first.scales, first.zeros)]  # filled one weight at a time: no 2nd copy
    for j, n in enumerate(names):
        w = first if j == 0 else ck.quantized(n, shape)
        if w is None or (w.format, w.group_size, w.zeros is None) != kind:
            return None
        for out, t in zip(stacked, (w.qdata, w.scales, w.zeros)):
            if out is not None:
                out[j] = t
    return QuantizedWeight(first.format, stacked[0], stacked[1], stacked[2], first.group_size, first.in_features)


def kept_experts(r, p: str, spec: ModelSpec, ids: list[int], idx: torch.Tensor) -> Optional[ExpertWeights]:
    """The experts in the quantization their file (a GGUF) stores them in, when kt-core holds it
    exactly and gate and up share one format (down may have its own); else None (read as floats)."""
    ck, m, H = r.ck, spec.moe, spec.hidden_size
    if not hasattr(ck, "keeps") or r.qp.experts is not Quant.NONE or r.qp.down_format is not Quant.NONE:
        return None
    names = moe_names(spec.family)
    e, lists = names.experts(p), names.expert_lists(p, ids)
    if not all(n in ck and ck.keeps(n) for ns in lists for n in ns):
        return None
    kept_ws = [kept(ck, ns, shape) for ns, shape in zip(lists, ((m.intermediate, H), (m.intermediate, H),
                                                               (H, m.intermediate)))]
    if any(k is None for k in kept_ws) or len({(k.format, k.group_size, k.zeros is None) for k in kept_ws[:2]}) > 1:
        return None
    biases = {}
    if names.fused and m.expert_bias:  # GPT-OSS biases as the HF checkpoint holds them: gate and up interleaved
        gu = ck.get(e + "gate_up_proj_bias", (m.num_experts, 2 * m.intermediate))[idx]
        biases = dict(gate_bias=gu[..., ::2], up_bias=gu[..., 1::2],
                      down_bias=ck.get(e + "down_proj_bias", (m.num_experts, H))[idx])
    placed = {k: v.to(r.dtype).to(r.device) for k, v in biases.items()}
    return ExpertWeights(idx.to(r.device), *(k.to(r.device) for k in kept_ws), **placed)
