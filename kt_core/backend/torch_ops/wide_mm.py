"""bf16 products in float32 on CPUs where torch's own bf16 GEMM is its scalar fallback.

torch multiplies bf16 matrices on the CPU with oneDNN only where oneDNN takes bf16 (AVX-512 or AMX,
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``); elsewhere (AVX2-only CPUs: most desktops, Zen 2 / 3)
it runs a scalar loop on one thread. On a 2-core Zen 3 EPYC: 512 x 2048 x 4096 took 399 ms (21 GFLOPS)
against 51 ms in float32, and a fine-tuning step's products (the LM head's with a transposed operand)
took 274 s of a 303 s step, under 1 GFLOPS. Here the bf16 operands are widened to float32 (exact) a block
of weight rows at a time into a kept buffer (converted while in cache; a whole float32 copy of a 32000-
row head would be 262 MB) and multiplied by torch's float32 GEMM: the same products and float32
sums as a bf16 GEMM, one rounding at the end. ``linear`` takes torch's ``F.linear`` contract, with
autograd (the gradient of the input the same way; of the weight and bias too, when they need one).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from kt_core.runtime.scratch import work

BLOCK_BYTES = 8 << 20  # a block of weight rows widened at a time (float32): within L2 + L3 of a desktop
MIN_ROWS = 16  # fewer input rows: torch's bf16 x w^T (a GEMV reads each weight once; widening costs more) ...
# ... but never its g @ w (a gradient's product, the sum over w's rows): that one is slow at any row count
# (Zen 3, 2 threads, one row of 32000 x 2048: 464 ms against 13 widened; a 4096 x 2048 row 59 against 4.3)


@lru_cache(maxsize=None)
def onednn_bf16() -> bool:
    """Whether torch's CPU products of bf16 matrices run on oneDNN (else on its scalar loop)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def scalar_bf16(t: torch.Tensor) -> bool:
    """Whether torch's products of ``t`` run its scalar bf16 loop: a bf16 CPU tensor without oneDNN bf16."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not onednn_bf16()


def takes_nn(g: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``g @ w`` (bf16 CPU tensors, w 2-D: a linear's input gradient) runs faster here widened:
    wherever torch's bf16 product is its scalar loop, whatever the rows."""
    return w.dim() == 2 and g.numel() > 0 and scalar_bf16(g) and scalar_bf16(w)


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w^T`` (bf16 CPU tensors, w 2-D) runs faster here than torch's bf16 product."""
    return x.dim() >= 1 and x.numel() >= MIN_ROWS * max(1, x.shape[-1]) and takes_nn(x, w)


def _block(w: torch.Tensor) -> int:
    return max(1, BLOCK_BYTES // (4 * max(1, w.shape[1])))


def mm_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [n, K] (float32) @ w [M, K]^T (bf16): float32 [n, M]."""
    n, M = x.shape[0], w.shape[0]
    out = torch.empty(n, M, dtype=torch.float32)
    b = _block(w)
    if b >= M:  # one block: the product straight into out
        buf = work("wide_mm.w", M, w.shape[1])
        buf.copy_(w)
        return torch.mm(x, buf.t(), out=out)
    for m0 in range(0, M, b):  # each block's product written into its columns of out as they lie (BLAS's
        m1 = min(M, m0 + b)    # row stride: no block-sized copy; 384 x 32000 x 2048, 32 blocks: 44 -> 26 ms)
        buf = work("wide_mm.w", m1 - m0, w.shape[1])
        buf.copy_(w[m0:m1])
        torch.mm(x, buf.t(), out=out[:, m0:m1])
    return out


def mm_nn(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g [n, M] (float32) @ w [M, K] (bf16): float32 [n, K], the sum over M a block of w's rows at a time."""
    M, K = w.shape
    out = torch.zeros(g.shape[0], K, dtype=torch.float32)
    b = _block(w)
    for m0 in range(0, M, b):
        m1 = min(M, m0 + b)
        buf = work("wide_mm.w", m1 - m0, K)
        buf.copy_(w[m0:m1])
        out.addmm_(g[:, m0:m1], buf)
    return out


class _WideLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        ctx.lead = x.shape[:-1]
        if not takes(x, w):  # a few rows with a gradient to come: torch's forward, the backward widened
            return F.linear(x, w, bias)
        out = mm_nt(x.reshape(-1, x.shape[-1]).float(), w)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = mm_nn(g2, w).to(g.dtype).reshape(*ctx.lead, w.shape[1])
        if ctx.needs_input_grad[1]:
            gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]).float()).to(w.dtype)
        if ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(g.dtype)
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, bias)``; in float32 products where ``takes`` says they are faster, and its
    backward's always where torch's bf16 products are the scalar loop (``takes_nn``)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, bias))
    if not (takes(x, w) or (grad and takes_nn(x, w))):
        return F.linear(x, w, bias)
    b = None if bias is None else bias.to(x.dtype)
    return _WideLinear.apply(x, w, b)

