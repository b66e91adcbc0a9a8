"""Causal attention in float32 query chunks, forward and backward, for CPUs whose torch multiplies bf16
matrices on its scalar loop (AVX2-only: kt_core/backend/torch_ops/wide_mm.py), where fine-tuning's
attention (kt_core/train/native_attention.py) ran torch's fused kernel on float32 copies: on 2 threads
of a Zen 3 EPYC, a 512-token layer of 32 query and 4 KV heads of 128 took 30 ms forward and 75-80 ms
backward (~72 GFLOPS, a third of the cores' float32 FMA rate).

Here, a chunk of at most CHUNK query positions at a time (a chunk's products stop at its last key, so
small chunks skip most of the causal mask's zeros), torch's float32 products (its BLAS) with one native
pass between them (``kt_attn_softmax_grad``'s float32 form, which writes P over S and dS over dP):

    forward   S = q k^T;  P = softmax(scale S);  o = P v
    backward  S = q k^T, dP = dO v^T;  P, dS = P (dP - <dO, O>) scale;  dV += P^T dO;  dK += dS^T q;  dQ = dS k

The backward makes S again (5 products) rather than keeping the forward's P (H n^2 / 2 floats a layer).
Each KV head's G query heads are stacked as [G x positions] rows, so GQA needs no repeated keys. Every
sum is float32, nothing is rounded to bf16 in between (torch's float32 SDPA's precision).
"""
from __future__ import annotations

from typing import Optional

import torch

from kt_backends.cpu.chunked_attention import _chunks, _ops, softmax, softmax_grad
from kt_core.backend.torch_ops import wide_mm
from kt_core.runtime.scratch import work

CHUNK = 64  # query positions a chunk (512 tokens on the Zen 3: products 46 ms at 64, 51 at 128, more at 256)


def takes() -> bool:
    """Whether these chunks are the causal attention to run here: torch's bf16 products are its scalar loop
    (no oneDNN bf16: AVX2-only CPUs, where they were measured) and the native ops are loaded with a vector
    variant (the pass between the products)."""
    native, _ = _ops()
    return native is not None and native.variant() != "generic" and not wide_mm.onednn_bf16()


def _stacked(x: torch.Tensor, H: int, c0: int, c1: int) -> torch.Tensor:
    """x [Hq, n, D] positions [c0, c1) as [H, G * m, D] (each KV head's query heads stacked; a copy)."""
    return x[:, c0:c1].reshape(H, -1, x.shape[-1])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal o = softmax(scale q k^T) v: q [Hq, n, D], k, v [Hkv, L, D] with L >= n (the queries are
    the last n positions), float32, any strides, GQA by head groups; ``out`` [Hq, n, D] to write."""
    Hq, n, D = q.shape
    H, L = k.shape[0], k.shape[1]
    G, off = Hq // H, L - n
    o = torch.empty(Hq, n, D, dtype=torch.float32) if out is None else out
    for c0, c1 in _chunks(n, G, L, CHUNK):
        m, keys = c1 - c0, off + c1
        S = work("attention_f32.S", H * G * m, keys).view(H, G * m, keys)
        torch.bmm(_stacked(q, H, c0, c1), k[:, :keys].transpose(1, 2), out=S)
        softmax(S.view(-1, keys), m, off + c0, scale, S.view(-1, keys))  # P over S
        o[:, c0:c1] = torch.bmm(S, v[:, :keys]).view(Hq, m, D)
    return o


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``forward`` with L == n: q, o, do [Hq, n, D], k, v [Hkv, n, D], float32."""
    Hq, n, D = q.shape
    H = k.shape[0]
    G = Hq // H
    o, do = o.contiguous(), do.contiguous()  # (an expanded gradient: the pass reads rows of O and dO in place)
    dq = torch.empty(Hq, n, D, dtype=torch.float32)
    dk = torch.zeros(H, n, D, dtype=torch.float32)
    dv = torch.zeros(H, n, D, dtype=torch.float32)
    for c0, c1 in _chunks(n, G, n, CHUNK):
        m = c1 - c0
        qc, doc, oc = (_stacked(t, H, c0, c1) for t in (q, do, o))
        S = work("attention_f32.S", H * G * m, c1).view(H, G * m, c1)
        dP = work("attention_f32.dP", H * G * m, c1).view(H, G * m, c1)
        torch.bmm(qc, k[:, :c1].transpose(1, 2), out=S)
        torch.bmm(doc, v[:, :c1].transpose(1, 2), out=dP)
        softmax_grad(S.view(-1, c1), dP.view(-1, c1), oc.reshape(-1, D), doc.reshape(-1, D), m, c0, scale,
                     S.view(-1, c1), dP.view(-1, c1))  # P over S, dS over dP
        dv[:, :c1].baddbmm_(S.transpose(1, 2), doc)
        dk[:, :c1].baddbmm_(dP.transpose(1, 2), qc)
        dq[:, c0:c1] = torch.bmm(dP, k[:, :c1]).view(Hq, m, D)
    return dq, dk, dv
