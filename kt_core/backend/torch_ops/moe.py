"""Expert GEMM and dense linear on torch: the reference every native kernel matches."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kt_core.backend.torch_ops import wide_mm
from kt_core.config.limits import DEEPSEEK_V4_SWIGLU_LIMIT
from kt_core.weights.quant import ExpertWeights, Quant, Weight, dequantize, fake_quant_activations, weight_format

ACTIVATIONS = ("silu", "gelu_tanh", "swiglu_oai", "silu_clamp10")
# GPT-OSS clamped SwiGLU constants (fixed by that architecture)
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0
# DeepSeek-V4 clamped SwiGLU ("silu_clamp10"): silu(min(gate, 10)) * clamp(up, -10, 10)


def linear(x: torch.Tensor, weight: Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if hasattr(weight, "scaling") and hasattr(weight, "base"):  # a LoraWeight being trained
        xl = x.float()
        if getattr(weight, "dropout", 0.0) and torch.is_grad_enabled():  # PEFT's lora_dropout, training only
            xl = F.dropout(xl, weight.dropout, training=True)
        # the scaling on the rank-r intermediate, not on the [tokens, out] delta (a pass less each way)
        delta = ((xl @ weight.a.T) * weight.scaling) @ weight.b.T
        return linear(x, weight.base, bias) + delta.to(x.dtype)
    if weight_format(weight) is Quant.W8A8:
        x = fake_quant_activations(x)
    w = dequantize(weight, x.dtype) if not isinstance(weight, torch.Tensor) else weight
    return wide_mm.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, in the inputs' dtype."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "swiglu_oai":
        gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
        up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
        return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_OAI_ALPHA))
    if activation == "silu_clamp10":
        gate = gate.clamp(max=DEEPSEEK_V4_SWIGLU_LIMIT)
        up = up.clamp(-DEEPSEEK_V4_SWIGLU_LIMIT, DEEPSEEK_V4_SWIGLU_LIMIT)
        return F.silu(gate) * up
    raise ValueError(f"unknown MoE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")


def local_route_index(topk_ids: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """For every route, the index of its expert among ``expert_ids`` or -1 if not held here."""
    size = int(max(int(topk_ids.max()), int(expert_ids.max()))) + 1 if topk_ids.numel() else 1
    lut = torch.full((size,), -1, dtype=torch.long, device=topk_ids.device)
    lut[expert_ids.to(topk_ids.device, torch.long)] = torch.arange(
        expert_ids.numel(), device=topk_ids.device)
    return lut[topk_ids.long()]


def routes_by_expert(topk_ids: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(routes, counts): the flat indices (token * top_k + k) of the routes to ``expert_ids``, by local
    expert then token (the order every expert loop, and the native kernels, lay them out), and each
    local expert's count of them."""
    local = local_route_index(topk_ids, expert_ids).reshape(-1)
    held = (local >= 0).nonzero().squeeze(-1)
    routes = held[local[held].argsort(stable=True)]
    return routes, torch.bincount(local[routes], minlength=expert_ids.numel())


def _expert_weight(w: Weight, e: int, dtype: torch.dtype) -> torch.Tensor:
    if hasattr(w, "adapter") and hasattr(w, "base"):  # a LoRA on the experts being trained (train.expert_lora)
        return (_expert_weight(w.base, e, torch.float32) + w.delta(e)).to(dtype)
    if isinstance(w, torch.Tensor):
        return w[e].to(dtype)
    return dequantize(w.select(e), dtype)


def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                experts: ExpertWeights, activation: str = "silu") -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    T, K = topk_ids.shape
    out = torch.zeros(T, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    if T == 0 or experts.expert_ids.numel() == 0:
        return out.to(hidden.dtype)
    routes, counts = routes_by_expert(topk_ids, experts.expert_ids)
    if routes.numel() == 0:
        return out.to(hidden.dtype)
    counts = counts.tolist()
    tokens = routes // K
    weights = topk_weights.reshape(-1)[routes].float()
    dyn = (lambda t: fake_quant_activations(t)) if experts.format is Quant.W8A8 else (lambda t: t)  # noqa: E731
    # under autograd, every route's row is gathered once and split by expert (views) and every expert's
    # rows are joined once and summed into the tokens once: one op each in the backward pass, where a
    # gather and a scatter per expert made and summed a full-size gradient per expert. Without it, an
    # expert's rows at a time (inference: no copy of every route's rows, ~T*K*H*12 bytes, at once)
    grad = torch.is_grad_enabled()
    xs = dyn(hidden[tokens]).split(counts) if grad else None
    ys, start = [], 0
    for e, n in enumerate(counts):
        start += n
        if n == 0:
            continue
        x = xs[e] if grad else dyn(hidden[tokens[start - n:start]])
        g = F.linear(x, _expert_weight(experts.gate, e, x.dtype))
        u = F.linear(x, _expert_weight(experts.up, e, x.dtype))
        if experts.gate_bias is not None:
            g = g + experts.gate_bias[e].to(x.dtype)
        if experts.up_bias is not None:
            u = u + experts.up_bias[e].to(x.dtype)
        y = F.linear(dyn(gated_activation(g, u, activation)), _expert_weight(experts.down, e, x.dtype))
        if experts.down_bias is not None:
            y = y + experts.down_bias[e].to(x.dtype)
        if grad:
            ys.append(y)
        else:
            out.index_add_(0, tokens[start - n:start], y.float() * weights[start - n:start, None])
    if grad:
        out.index_add_(0, tokens, torch.cat(ys).float() * weights[:, None])
    return out.to(hidden.dtype)
