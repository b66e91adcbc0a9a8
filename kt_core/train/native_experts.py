"""Frozen routed experts on the native CPU kernels while training (``kt sft`` / ``kt dpo``).

Forward: the fused native MoE op (every packed format, the CPU's best kernel variant), keeping each
route's gate and up outputs. Backward, with the experts frozen (no adapter on them):

    z_r   = dY[t_r] . W_down          (the native transposed product on the packed down panels)
    dw_r  = <z_r, act(g_r, u_r)> (+ <dY[t_r], b_down>)   the routing weight's gradient
    dg, du = the activation's gradients of w_r z_r        (SwiGLU: native_grad.silu_mul_backward, one
                                                           pass; the others: torch autograd of the reference)
    dX[t_r] += dg_r . W_gate + du_r . W_up                 (two more transposed products)

so autograd reaches the hidden states through both the experts and the router's weights, exactly as
it does through the torch reference (``torch_ops.moe.moe_experts``), without ever dequantizing a
weight in torch. w8a8 and float32 experts stay on the torch reference.

LoRA on the experts (``experts.gate_up_proj`` / ``down_proj``: an adapter per expert) runs each frozen
product on its own native call instead (``native_grad.expert_rows`` forward, ``expert_rows_t``
backward), the adapters' low-rank products and the activation in torch between them
(``AdaptedExperts``, ``moe_experts_adapted``).
"""
from __future__ import annotations

import torch

from kt_core.backend.torch_ops.moe import gated_activation
from kt_core.runtime.scratch import work

FORMATS = ("bf16", "int8", "int4", "fp8")  # w8a8's dynamic activation quantization has no gradient here


def pack(experts):
    """The experts packed for the native kernels, or None when they do not take them (no native
    library, a format outside FORMATS, float32 weights). ``experts`` is handed over (load time): once
    packed, it no longer holds its projections (native.pack's release); when None, it is left whole."""
    from kt_backends.cpu import native

    if not native.available():
        return None
    formats = native.pack_formats(experts)
    if formats is None or any(f not in FORMATS for f in formats):
        return None
    return native.pack(experts, release=True)  # handed over at load time (prepare_experts)


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, topk_weights, packed, topk_ids, activation):
        from kt_backends.cpu import native_grad

        out, gu, routes, counts = native_grad.moe_forward_saving(packed, hidden.detach(), topk_ids,
                                                                  topk_weights.detach(), activation, packed.pool)
        ctx.packed, ctx.activation, ctx.top_k = packed, activation, topk_ids.shape[1]
        ctx.dtypes = (hidden.dtype, topk_weights.dtype)
        ctx.save_for_backward(gu, routes, counts, topk_weights)
        return out

    @staticmethod
    def backward(ctx, dout):
        from kt_backends.cpu import native_grad

        gu, routes, counts, topk_weights = ctx.saved_tensors
        packed, I = ctx.packed, ctx.packed.inter
        T, H = dout.shape
        hidden_dtype, weights_dtype = ctx.dtypes
        bf16 = hidden_dtype == torch.bfloat16  # the forward rounded to bf16 too: AMX tiles may
        tokens = routes // ctx.top_k
        w = topk_weights.reshape(-1)[routes].float()
        R = tokens.numel()
        dy = work("experts.dy", T, H).copy_(dout)  # each route's row read in place by the product (a_rows)
        z = native_grad.expert_rows_t(packed, "down", dy, counts, out=work("experts.z", R, I), round_bf16=bf16,
                                      pool=packed.pool, a_rows=tokens.contiguous())
        if ctx.activation == "silu":  # one native pass (torch autograd made six, ~25 ms a layer)
            dg, du, dw = native_grad.silu_mul_backward(gu, z, w, work("experts.dg", R, I), work("experts.du", R, I),
                                                       pool=packed.pool)
        else:
            with torch.enable_grad():
                g = gu[:, :I].detach().requires_grad_()
                u = gu[:, I:].detach().requires_grad_()
                a = gated_activation(g, u, ctx.activation)
                dg, du = torch.autograd.grad(a, (g, u), z * w[:, None])
            dw = (z * a.detach()).sum(-1)
        if packed.down.bias is not None:  # y_r = a_r W^T + b_e: the bias is weighted too
            expert_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            dw = dw + (dy[tokens] * packed.down.bias[expert_of]).sum(-1)
        dx_rows = native_grad.expert_rows_t(packed, "gate", dg.contiguous(), counts, out=work("experts.dx", R, H),
                                            round_bf16=bf16, pool=packed.pool)
        native_grad.expert_rows_t(packed, "up", du.contiguous(), counts, out=dx_rows, accumulate=True,
                                  round_bf16=bf16, pool=packed.pool)
        # summed in a kept buffer unless it is what leaves (float32 states: .to is then no copy)
        dx = work("experts.dx_tokens", T, H) if hidden_dtype != torch.float32 else torch.empty(T, H)
        dx.zero_().index_add_(0, tokens, dx_rows)
        dweights = torch.zeros(topk_weights.numel(), dtype=torch.float32)
        dweights[routes] = dw
        return dx.to(hidden_dtype), dweights.view(topk_weights.shape).to(weights_dtype), None, None, None


def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, packed,
                activation: str = "silu") -> torch.Tensor:
    """``torch_ops.moe.moe_experts``'s contract on packed experts, differentiable in ``hidden`` and
    ``topk_weights``. Without a gradient to take (DPO's reference pass, activation checkpointing's
    first pass) it is the plain native forward, keeping nothing."""
    if not (torch.is_grad_enabled() and (hidden.requires_grad or topk_weights.requires_grad)):
        from kt_backends.cpu import native

        return native.moe_forward(packed, hidden, topk_ids, topk_weights, activation, packed.pool)
    return _Experts.apply(hidden, topk_weights, packed, topk_ids, activation).to(hidden.dtype)


class _Rows(torch.autograd.Function):
    """C = the rows of each expert times its frozen projection (native, forward direction); the
    gradient of the rows through it is the transposed product."""

    @staticmethod
    def forward(ctx, rows, packed, proj, counts, bf16):
        from kt_backends.cpu import native_grad

        ctx.packed, ctx.proj, ctx.counts, ctx.bf16 = packed, proj, counts, bf16
        return native_grad.expert_rows(packed, proj, rows.detach().contiguous(), counts, bf16, packed.pool)

    @staticmethod
    def backward(ctx, grad):
        from kt_backends.cpu import native_grad

        dx = native_grad.expert_rows_t(ctx.packed, ctx.proj, grad.float().contiguous(), ctx.counts,
                                       round_bf16=ctx.bf16, pool=ctx.packed.pool)
        return dx, None, None, None, None


class AdaptedExperts:
    """Packed frozen experts with LoRA adapters (train/expert_lora.py's ExpertAdapter) on gate_up
    and / or down, trained on the native products."""

    def __init__(self, packed) -> None:
        self.packed = packed
        self.gate_up = self.down = None  # ExpertAdapter: A [E, r, in], B [E, out, r], scaling


def _lora_rows(x: torch.Tensor, ad, counts: list[int]) -> torch.Tensor:
    """s * (x_e A_e^T) B_e^T for the rows x_e of each expert, in order (autograd through A and B).
    Split and unbound once: indexing A[e] or x[a:b] per expert made a full-size zero gradient per
    expert in the backward pass (6 s of an 8.8 s step at 128 experts)."""
    xs, As, Bs = x.split(counts), ad.a.unbind(0), ad.b.unbind(0)
    parts = [(xs[e] @ As[e].T) @ Bs[e].T for e, n in enumerate(counts) if n]
    return torch.cat(parts) * ad.scaling if parts else x.new_zeros(0, ad.b.shape[1])


def moe_experts_adapted(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        ae: AdaptedExperts, activation: str = "silu") -> torch.Tensor:
    """``torch_ops.moe.moe_experts``'s contract with adapters on the experts (its ``_expert_weight``
    adds s * B_e A_e to each frozen weight; here the low-rank products run beside the native ones)."""
    from kt_backends.cpu import native_grad

    packed, I = ae.packed, ae.packed.inter
    T, K = topk_ids.shape
    routes, counts_t = native_grad.route_order(packed, topk_ids)
    counts = counts_t.tolist()
    tokens = routes // K
    bf16 = hidden.dtype == torch.bfloat16
    x = hidden[tokens].float()
    g = _Rows.apply(x, packed, "gate", counts_t, bf16)
    u = _Rows.apply(x, packed, "up", counts_t, bf16)
    if ae.gate_up is not None:  # one A for both, B's rows :I gate, I: up (PEFT's fused gate_up adapter)
        d = _lora_rows(x, ae.gate_up, counts)
        g, u = g + d[:, :I], u + d[:, I:]
    expert_of = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    if packed.gate.bias is not None:
        g = g + packed.gate.bias[expert_of]
    if packed.up.bias is not None:
        u = u + packed.up.bias[expert_of]
    a = gated_activation(g, u, activation)
    y = _Rows.apply(a, packed, "down", counts_t, bf16)
    if ae.down is not None:
        y = y + _lora_rows(a, ae.down, counts)
    if packed.down.bias is not None:
        y = y + packed.down.bias[expert_of]
    w = topk_weights.reshape(-1)[routes].float()
    out = torch.zeros(T, hidden.shape[-1], dtype=torch.float32).index_add(0, tokens, y * w[:, None])
    return out.to(hidden.dtype)
