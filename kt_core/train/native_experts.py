"""Frozen routed experts on the native CPU kernels while training (``kt sft`` / ``kt dpo``).

Forward: the fused native MoE op (every packed format, the CPU's best kernel variant), keeping each
route's gate and up outputs. Backward, with the experts frozen (no adapter on them):

    z_r   = dY[t_r] . W_down          (the native transposed product on the packed down panels)
    dw_r  = <z_r, act(g_r, u_r)> (+ <dY[t_r], b_down>)   the routing weight's gradient
    dg, du = the activation's gradients of w_r z_r        (torch autograd of the reference activation)
    dX[t_r] += dg_r . W_gate + du_r . W_up                 (two more transposed products)

so autograd reaches the hidden states through both the experts and the router's weights, exactly as
it does through the torch reference (``torch_ops.moe.moe_experts``), without ever dequantizing a
weight in torch. LoRA on the experts themselves (``experts.gate_up_proj`` / ``down_proj``) and w8a8
experts stay on the torch reference.
"""
from __future__ import annotations

import threading

import torch

from kt_core.backend.torch_ops.moe import gated_activation

FORMATS = ("bf16", "int8", "int4", "fp8")  # w8a8's dynamic activation quantization has no gradient here


def pack(experts):
    """The experts packed for the native kernels, or None when they do not take them (no native
    library, a format outside FORMATS, float32 weights)."""
    from kt_backends.cpu import native

    if not native.available():
        return None
    packed = native.pack(experts)
    if packed is None or packed.fmt not in FORMATS or (packed.down_fmt or packed.fmt) not in FORMATS:
        return None
    return packed


_scratch = threading.local()


def _buffer(name: str, rows: int, cols: int) -> torch.Tensor:
    """A float32 [rows, cols] work buffer of the backward pass, kept per thread between calls: the
    gradient rows are tens of MB a layer, and fresh pages cost a fault each (a third of the time of
    the products they feed). Never handed out of backward."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    t = bufs.get(name)
    if t is None or t.numel() < rows * cols:
        t = bufs[name] = torch.empty(rows * cols, dtype=torch.float32)
    return t[:rows * cols].view(rows, cols)


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
        dy = torch.index_select(dout.float(), 0, tokens, out=_buffer("dy", R, H))
        z = native_grad.expert_rows_t(packed, "down", dy, counts, out=_buffer("z", R, I), round_bf16=bf16,
                                      pool=packed.pool)
        with torch.enable_grad():
            g = gu[:, :I].detach().requires_grad_()
            u = gu[:, I:].detach().requires_grad_()
            a = gated_activation(g, u, ctx.activation)
            dg, du = torch.autograd.grad(a, (g, u), z * w[:, None])
        dw = (z * a.detach()).sum(-1)
        if packed.down.bias is not None:  # y_r = a_r W^T + b_e: the bias is weighted too
            expert_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            dw = dw + (dy * packed.down.bias[expert_of]).sum(-1)
        dx_rows = native_grad.expert_rows_t(packed, "gate", dg.contiguous(), counts, out=_buffer("dx", R, H),
                                            round_bf16=bf16, pool=packed.pool)
        native_grad.expert_rows_t(packed, "up", du.contiguous(), counts, out=dx_rows, accumulate=True,
                                  round_bf16=bf16, pool=packed.pool)
        dx = torch.zeros(T, H, dtype=torch.float32).index_add_(0, tokens, dx_rows)
        dweights = torch.zeros(topk_weights.numel(), dtype=torch.float32)
        dweights[routes] = dw
        return dx.to(hidden_dtype), dweights.view(topk_weights.shape).to(weights_dtype), None, None, None


def moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, packed,
                activation: str = "silu") -> torch.Tensor:
    """``torch_ops.moe.moe_experts``'s contract on packed experts, differentiable in ``hidden`` and
    ``topk_weights``."""
    return _Experts.apply(hidden, topk_weights, packed, topk_ids, activation).to(hidden.dtype)
