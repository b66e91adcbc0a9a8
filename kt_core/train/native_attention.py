"""Causal self-attention's backward pass (and, without AMX, its forward) while fine-tuning a bf16 model on
a CPU that multiplies bf16 pairs (AMX tiles, AVX512-BF16).

torch's fused CPU attention (SDPA's flash kernel) runs the forward of a 512-token, 32-head layer in
~5 ms on 2 threads of an AMX Xeon, but its backward in ~29 ms: a sixth of the benchmark's LoRA step
(bench/train_lora.py). Here the forward stays torch's; the backward, per chunk of query positions
(a chunk sees keys up to its last position only), is:

    S  = Q K^T,  dP = dO V^T                          float32 sums of the bf16 products
    P  = softmax(scale S),  dS = P (dP - <dO, O>) scale      bf16, zeros past the causal limit
    dV += P^T dO,  dK += dS^T Q,  dQ = dS K            torch's bf16 products, float32 sums

The first two lines are one native call for every head (``kt_attn_scores_grad``, native/attn_grad.inc):
the keys packed as AMX B tiles once, 16 query rows a tile against them, S and dP kept in L2 for the
rows' AVX-512 pass, q / dO / O read where they lie. Without the tiles, on AVX512-BF16, the same call runs
the pair kernels on the same packed keys (a 512-token layer's backward 18 -> 14 ms on a Zen 5 EPYC).
Elsewhere (the native ops' other variants, ``any_cpu`` in the tests) torch makes S and dP (its float32
products on the tiles' bf16 mode,
``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, exact for bf16 operands) and
``kt_attn_softmax_grad`` the rest. Each KV head's G query heads are stacked as [G x positions] rows,
so GQA needs no repeated keys. P and dS are rounded to bf16 for the last three products, as flash
attention rounds P. Against float64 the gradients are as close as torch's own backward's, or closer
(tests). A 512-token layer's forward + backward: ~22 ms against torch's 33-34.

Without AMX (Zen 4 / 5) torch's fused forward is slow too (24 ms for that layer on 2 threads of a Zen 5
EPYC); ``attention_forward`` runs it as the same chunks (S in float32 sums, the native softmax writing P in
bf16, then P v): forward + backward 67 -> 28 ms there. The chunks, the forward and the native calls live in
the CPU backend (backends/cpu/chunked_attention.py), whose plain causal prefill runs the same forward.

Where torch's bf16 products are its scalar loop (AVX2-only CPUs), bf16 and float32 models take the float32
chunks instead (backends/cpu/chunked_attention_f32.py): a 512-token layer's forward + backward 119 -> 71 ms
on 2 threads of a Zen 3 EPYC with the casts (bench/attention_grad.py), float32 throughout.

``attend`` has ``torch_ops.attention.attend``'s contract and takes these paths only for plain causal
attention that wants gradients, with the native ops loaded: the bf16 chunks for bf16 tensors with a torch
that has the precision switch and bf16 pair products in hardware (elsewhere their float32 products would
be slower than torch's backward; the tests pass ``any_cpu``), the float32 chunks as above (``_path``);
``KT_NATIVE_ATTENTION_GRAD=0`` turns both off.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from kt_backends.cpu import chunked_attention_f32 as attention_f32
from kt_backends.cpu.chunked_attention import (_bf16_products, _chunks, _ops, _precision_switch,
                                               _products_fp32, attention_forward, scores_grad, softmax_grad,
                                               takes_forward)
from kt_core.backend.torch_ops import attention as torch_attention
from kt_core.runtime.scratch import work


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, sinks, any_cpu: bool = False) -> bool:
    """Whether ``attend`` runs this module's path for these inputs (``_path``)."""
    return _path(q, k, v, mask, sinks, any_cpu) is not None


def _path(q, k, v, mask, sinks, any_cpu: bool = False) -> Optional[str]:
    """"pairs": the bf16 chunks on bf16 pair products (``any_cpu``: on any CPU, for the tests);
    "float32": the float32 chunks (backends/cpu/chunked_attention_f32.py), for bf16 and float32 models
    where torch's bf16 products are its scalar loop (AVX2-only CPUs); None: torch's attention."""
    if mask is not None or sinks is not None or os.environ.get("KT_NATIVE_ATTENTION_GRAD", "1") == "0":
        return None
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return None
    if not all(t.dtype == q.dtype and t.device.type == "cpu" and t.dim() == 3 for t in (q, k, v)):
        return None
    if not k.shape[0] or not q.shape[-2] or q.shape[-2] != k.shape[-2] or q.shape[0] % k.shape[0] \
            or v.shape != k.shape or q.shape[-1] != k.shape[-1]:
        return None
    native, _ = _ops()
    if native is None:
        return None
    if q.dtype == torch.bfloat16 and _precision_switch() and (any_cpu or _bf16_products(native)):
        return "pairs"
    if q.dtype in (torch.bfloat16, torch.float32) and attention_f32.takes():
        return "float32"
    return None


def attention_backward(q, k, v, o, do, scale: float):
    """(dq, dk, dv) of causal attention o = softmax(scale q k^T) v: q, o, do [Hq, n, D], k, v [Hkv, n, D]
    (bf16; GQA by head groups); float32 sums, results in bf16."""
    Hq, n, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    dq = torch.empty(Hq, n, D, dtype=q.dtype)
    dk = torch.zeros(Hkv, n, D, dtype=torch.float32)
    dv = torch.zeros(Hkv, n, D, dtype=torch.float32)
    for c0, c1 in _chunks(n, G):
        m = c1 - c0
        rows = G * m
        P = work("attention.P", Hkv * rows, c1, torch.bfloat16).view(Hkv, rows, c1)
        dS = work("attention.dS", Hkv * rows, c1, torch.bfloat16).view(Hkv, rows, c1)
        tiles = scores_grad(q, do, o, k, v, c0, c1, scale, P.view(Hkv, G, m, c1), dS.view(Hkv, G, m, c1))
        qc = q[:, c0:c1].reshape(Hkv, rows, D)  # each KV head's query rows stacked (a copy: q lies [n, Hq, D])
        doc = do[:, c0:c1].reshape(Hkv, rows, D)
        if not tiles:
            for h in range(Hkv):
                heads = slice(h * G, (h + 1) * G)
                S = _products_fp32(qc[h], k[h, :c1], work("attention.S", rows, c1))
                dP = _products_fp32(doc[h], v[h, :c1], work("attention.dP", rows, c1))
                softmax_grad(S, dP, o[heads, c0:c1].reshape(rows, D).contiguous(), doc[h].contiguous(), m, c0, scale,
                             P[h], dS[h])
        dv[:, :c1] += torch.bmm(P.transpose(1, 2), doc)
        dk[:, :c1] += torch.bmm(dS.transpose(1, 2), qc)
        dq[:, c0:c1] = torch.bmm(dS, k[:, :c1]).view(Hq, m, D)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        with torch.no_grad():
            if takes_forward():
                o = attention_forward(q, k, v, scale)
            else:
                o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                   enable_gqa=q.shape[0] != k.shape[0])[0]
        ctx.save_for_backward(q, k, v, o)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # (P and dS are native: no graph for second derivatives)
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, o, do, ctx.scale)
        return dq, dk, dv, None


class _CausalAttentionF32(torch.autograd.Function):
    """The float32 chunks (chunked_attention_f32): float32 q, k, v; o in float32 kept for <dO, O>."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        with torch.no_grad():
            o = attention_f32.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        return (*attention_f32.backward(q, k, v, o, do.float(), ctx.scale), None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           sinks: Optional[torch.Tensor] = None, any_cpu: bool = False) -> torch.Tensor:
    """``torch_ops.attention.attend``'s contract (q [Hq, n, D], k / v [Hkv, L, D] here), with this
    module's paths where ``_path`` takes them."""
    path = _path(q, k, v, mask, sinks, any_cpu)
    if path is None:
        return torch_attention.attend(q, k, v, mask, scale, sinks)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if path == "pairs":
        return _CausalAttention.apply(q, k, v, scale)
    return _CausalAttentionF32.apply(q.float(), k.float(), v.float(), scale).to(q.dtype)
