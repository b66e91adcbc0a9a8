"""LoRA on the routed experts while training (``train.lora.targets`` ``experts.gate_up_proj`` /
``experts.down_proj``): one adapter per expert, saved as PEFT's ``target_parameters`` adapters.

gate_up_proj's adapter is one A [r, H] and one B [2I, r] per expert, as PEFT keeps it for
transformers' fused gate_up tensor: kt-core's gate reads rows :I of B, up rows I:, both with that A.
The torch ops' expert loop (``torch_ops.moe``) adds ``s * B_e @ A_e`` to each expert's frozen weight.
"""
from __future__ import annotations

import math

import torch

from kt_core.errors import KtError

TARGETS = {"experts.gate_up_proj": "gate_up_proj", "experts.down_proj": "down_proj"}


class ExpertAdapter:
    """The A [E, r, in] and B [E, out, r] of one adapted expert tensor of one layer."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        self.a, self.b, self.scaling = a, b, float(scaling)


class ExpertLoraWeight:
    """Frozen experts [E, out, in] (a tensor or quantized) plus rows ``rows`` of an adapter's update."""

    def __init__(self, base, adapter: ExpertAdapter, rows: slice) -> None:
        self.base, self.adapter, self.rows = base, adapter, rows

    @property
    def shape(self):
        return self.base.shape

    @property
    def format(self):
        from kt_core.weights.quant import weight_format

        return weight_format(self.base)

    def delta(self, e: int) -> torch.Tensor:
        ad = self.adapter
        return ad.scaling * (ad.b[e, self.rows] @ ad.a[e])


def attach(model, targets: list[str], r: int, scaling: float, init: dict, g: torch.Generator) -> dict:
    """Wrap every MoE layer's experts in ``targets``; {(experts prefix, param): ExpertAdapter}. ``init``:
    an adapter's stacked matrices (weights.lora_experts.stacked) to start from."""
    from kt_core.models.layers import MoEBlock
    from kt_core.models.names import moe_names
    from kt_core.weights.lora_experts import check_family
    from kt_core.train.native_experts import AdaptedExperts
    from kt_core.weights.quant import ExpertWeights

    spec = model.spec
    check_family(spec, "train.lora.targets")
    I, H, E = spec.moe.intermediate, spec.hidden_size, spec.moe.num_experts
    block = moe_names(spec.family).block
    out = {}
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.ffn, MoEBlock):
            continue
        if len(layer.ffn.shards) != 1:
            raise KtError("LoRA on the routed experts trains with every expert of a layer on one device")
        be, device, ex = layer.ffn.shards[0]
        if not isinstance(ex, (ExpertWeights, AdaptedExperts)):  # packed for the native kernels
            if not hasattr(ex, "call_parts"):
                raise KtError("LoRA on the routed experts trains on kt sft's autograd backend (native or torch "
                              "experts)")
            if not torch.equal(ex.expert_ids.cpu(), torch.arange(E)):  # adapters are indexed by expert id
                raise KtError("LoRA on the routed experts trains with every expert of a layer, in id order, "
                              "on one device")
            ex = AdaptedExperts(ex)
            layer.ffn.shards[0] = (be, device, ex)
        prefix = f"model.layers.{i}.{block}.experts"
        for target in sorted(set(targets) & set(TARGETS)):
            param = TARGETS[target]
            out_f, in_f = (2 * I, H) if param == "gate_up_proj" else (H, I)
            if (prefix, param) in init:
                a, b = (t.float().clone() for t in init[(prefix, param)])
            else:  # PEFT's initialisation: A Kaiming-uniform, B zero
                a = (torch.rand(E, r, in_f, generator=g) * 2 - 1) / math.sqrt(in_f)
                b = torch.zeros(E, out_f, r)
            # on the experts' device
            ad = ExpertAdapter(a.to(device).requires_grad_(), b.to(device).requires_grad_(), scaling)
            if isinstance(ex, AdaptedExperts):
                setattr(ex, "gate_up" if param == "gate_up_proj" else "down", ad)
            elif param == "gate_up_proj":
                ex.gate, ex.up = ExpertLoraWeight(ex.gate, ad, slice(0, I)), ExpertLoraWeight(ex.up, ad, slice(I, 2 * I))
            else:
                ex.down = ExpertLoraWeight(ex.down, ad, slice(0, H))
            out[(prefix, param)] = ad
    return out


def state(adapters: dict, prefix_of_peft: str) -> dict[str, torch.Tensor]:
    """The adapters as PEFT stores them: gate_up_proj wrapped inside down_proj when both are adapted
    (the order PEFT applies them in: the experts module's parameter order)."""
    from kt_core.weights.lora_experts import fused_tensors

    out = {}
    for (prefix, param), ad in adapters.items():
        depth = 1 if param == "gate_up_proj" and (prefix, "down_proj") in adapters else 0
        out.update(fused_tensors(prefix_of_peft + prefix, ad.a.detach(), ad.b.detach(), depth))
    return out
