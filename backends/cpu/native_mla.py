"""DeepSeek's multi-head latent attention (MLA) on the native CPU kernels, the contract of the torch
reference (``kt_core.backend.torch_ops.attention.attention_mla``).

A decode step (``try_mla_decode``, ``native/mla_decode.inc``): the absorbed form in one call per
layer, the query's absorption through kv_b_proj's key half, attention over the latent cache read in
place through the block table, and the value half's product, float32 inside. A bf16 prefill on AMX
(``try_mla_prefill``): the latent rows expanded to per-head keys and values, attention on the tiles.
Each returns None for what it does not take (DeepSeek-V3.2's token selection, float16, another
device, ...), and the CPU backend then runs the reference.

Before it (torch, one intra-op thread in a decode step), a DeepSeek-V3-sized layer converted both
absorbed halves (2 x 16 MB of bf16) to float32 on every call: ~21 ms of a layer's step.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from kt_backends.cpu import native_attention, native_ops
from kt_backends.cpu.native_abi import MAX_DIM, MAX_HEAD_DIM, MAX_POOLS
from kt_backends.cpu.native_ops import _DTYPES, _INDEX_DTYPES, _fail, _invoke, _tables32, _unavailable, _what
from kt_core.backend.torch_ops.attention import gather_context, sequences

OP = "mla_decode"
KV_BYTES = 64 << 20  # a prefill's expanded keys and values held at once: heads are taken in groups to fit


def _why(q_nope, q_pe, latent, w_uk, w_uv, block_tables, seq_lens) -> str:
    """What keeps these tensors from the kernel, in words (after the fast check failed)."""
    named = (("q_nope", q_nope), ("q_pe", q_pe), ("latent_cache", latent), ("w_uk", w_uk), ("w_uv", w_uv),
             ("block_tables", block_tables), ("seq_lens", seq_lens))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.device.type != "cpu":
            return f"{name} is on {t.device}; the native kernels read host memory"
    for name, t in named[:5]:
        if t.dtype not in _DTYPES:
            return f"{name} must be float32 or bfloat16, got {t.dtype}"
    if q_nope.dim() != 3 or q_pe.dim() != 3 or q_pe.shape[:2] != q_nope.shape[:2] or q_pe.dtype != q_nope.dtype:
        return f"q_nope and q_pe must be [tokens, heads, dim] of one dtype, got {_what(q_nope)} and {_what(q_pe)}"
    if w_uk.dim() != 3 or w_uv.dim() != 3 or w_uv.dtype != w_uk.dtype:
        return f"w_uk / w_uv must be [heads, dim, kv_lora_rank] of one dtype, got {_what(w_uk)} and {_what(w_uv)}"
    T, H, dn = q_nope.shape
    lora = w_uk.shape[2]
    if w_uk.shape[:2] != (H, dn) or w_uv.shape[0] != H or w_uv.shape[2] != lora:
        return (f"w_uk must be [{H}, {dn}, lora] and w_uv [{H}, v_head_dim, lora] for q_nope {_what(q_nope)}, got "
                f"{_what(w_uk)} and {_what(w_uv)}")
    if latent.dim() != 4 or latent.shape[2] != 1 or latent.shape[3] != lora + q_pe.shape[2]:
        return (f"latent_cache must be [num_blocks, block_size, 1, {lora} + {q_pe.shape[2]}] (kv_lora_rank + "
                f"rope dim), got {_what(latent)}")
    if not latent.is_contiguous():
        return "latent_cache must be contiguous (the kernel reads it in place)"
    if max(dn, w_uv.shape[1], lora + q_pe.shape[2]) > MAX_HEAD_DIM:
        return f"a head dimension is above {MAX_HEAD_DIM}"
    if block_tables.dim() != 2 or block_tables.shape[0] != T or block_tables.dtype not in _INDEX_DTYPES:
        return f"block_tables must be integer [batch={T}, max_blocks], one query per sequence; got {_what(block_tables)}"
    if seq_lens.dim() != 1 or seq_lens.shape[0] != T or seq_lens.dtype not in _INDEX_DTYPES:
        return f"seq_lens must be integer [batch={T}], got {_what(seq_lens)}"
    if max(T, H, *latent.shape[:2], block_tables.shape[1]) > MAX_DIM:
        return f"a size is above {MAX_DIM}"
    return "unsupported inputs"


def _mla_decode(q_nope, q_pe, latent, w_uk, w_uv, block_tables, seq_lens, scale, pool, strict):
    lib = native_ops._ops or native_ops._lib()
    if lib is None:
        return _unavailable(strict)
    try:  # the usual case in one test; the diagnosis only when it fails
        B, H, dn = q_nope.shape
        dr = q_pe.shape[2]
        nb, bs, one, Dk = latent.shape
        _, dnk, lora = w_uk.shape
        dv = w_uv.shape[1]
        mb = block_tables.shape[1]
        qcode, wcode, kvcode = _DTYPES.get(q_nope.dtype), _DTYPES.get(w_uk.dtype), _DTYPES.get(latent.dtype)
        ok = (qcode is not None and wcode is not None and kvcode is not None and q_pe.dtype is q_nope.dtype
              and w_uv.dtype is w_uk.dtype and q_nope.is_cpu and q_pe.is_cpu and latent.is_cpu and w_uk.is_cpu
              and w_uv.is_cpu and block_tables.is_cpu and seq_lens.is_cpu and q_pe.shape[:2] == (B, H)
              and w_uk.shape[0] == H and dnk == dn and w_uv.shape[0] == H and w_uv.shape[2] == lora and one == 1
              and Dk == lora + dr and latent.is_contiguous() and block_tables.dim() == 2
              and block_tables.shape[0] == B and seq_lens.dim() == 1 and seq_lens.shape[0] == B
              and block_tables.dtype in _INDEX_DTYPES and seq_lens.dtype in _INDEX_DTYPES)
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        return _fail(strict, OP, _why(q_nope, q_pe, latent, w_uk, w_uv, block_tables, seq_lens))
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        return _fail(strict, OP, f"scale must be a number, got {scale!r}")
    if type(pool) is not int or not 0 <= pool < MAX_POOLS:
        pool = native_ops._pool(pool)
    out = q_nope.new_empty(B, H, dv)
    if B == 0:
        return out
    # q's halves are views of one projection (tiny); the weights are made contiguous once, at load
    q_nope, q_pe, w_uk, w_uv = (t if t.is_contiguous() else t.contiguous() for t in (q_nope, q_pe, w_uk, w_uv))
    block_tables, seq_lens = _tables32(block_tables, seq_lens, nb)
    ran = _invoke(lib.kt_mla_decode, native_ops._MLA,
                  (B, H, dn, dr, lora, dv, nb, bs, mb, scale, qcode, wcode, kvcode, pool, q_nope.data_ptr(),
                   q_pe.data_ptr(), w_uk.data_ptr(), w_uv.data_ptr(), latent.data_ptr(), block_tables.data_ptr(),
                   seq_lens.data_ptr(), out.data_ptr()), OP, strict)
    return out if ran else None


def mla_decode(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, scale, pool: int = 0) -> torch.Tensor:
    """One query per sequence: q_nope [B, H, dn], q_pe [B, H, dr] (roped), over the latent cache
    [num_blocks, block_size, 1, lora + dr]; w_uk [H, dn, lora], w_uv [H, dv, lora]. Returns [B, H, dv]
    in q's dtype. Raises ValueError naming what the kernel does not take."""
    return _mla_decode(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, scale, pool, True)


def try_mla_decode(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, query_start_loc, scale,
                   causal=True, selected=None, pool: int = 0) -> Optional[torch.Tensor]:
    """``attention_mla``'s arguments: the native result when the call is a decode step's (one query
    per sequence, no token selection) and the kernel takes the tensors, else None (always with
    ``KT_NATIVE_MLA=0``: benchmarks, bisecting)."""
    if os.environ.get("KT_NATIVE_MLA", "1") == "0":
        return None
    if selected is not None or not isinstance(query_start_loc, torch.Tensor) or query_start_loc.dim() != 1:
        return None
    try:
        T = q_nope.shape[0]
        if block_tables.shape[0] != T or query_start_loc.shape[0] != T + 1:
            return None
    except (AttributeError, IndexError, TypeError):
        return None
    if T > 1 and not bool(torch.all(query_start_loc[1:] - query_start_loc[:-1] == 1)):
        return None  # some sequence brings more than one token: a prefill
    return _mla_decode(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, scale, pool, False)


def try_mla_prefill(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, query_start_loc, scale,
                    causal=True, selected=None, any_variant=False) -> Optional[torch.Tensor]:
    """``attention_mla`` for a prefill, in the form DeepSeek prefills in: each sequence's latent rows
    expanded to per-head keys (kv_b's key half, plus the shared roped part) and values (its value
    half) by GEMMs in the model's dtype (oneDNN), then multi-head attention: a bf16 model's on AMX on
    the panel kernels (native_attention.attend: float32 scores, bf16 probabilities), else torch's
    SDPA (float32 models, CPUs without AMX unless ``any_variant``, ``KT_NATIVE_PREFILL_ATTENTION=0``).
    Heads go in groups that bound the expansion's memory (KV_BYTES). 512 tokens: (n + L) x 192 +
    n x 128 products a head instead of the absorbed form's (n x L) x 1088, and no float32 copy of the
    absorbed weights. None for DeepSeek-V3.2's token selection, mixed or other dtypes, or
    ``KT_NATIVE_MLA=0``; the CPU backend then runs the torch reference."""
    if os.environ.get("KT_NATIVE_MLA", "1") == "0" or selected is not None:
        return None
    try:
        T, H, dn = q_nope.shape
        dr, lora, dv = q_pe.shape[2], w_uk.shape[2], w_uv.shape[1]
        dt = q_nope.dtype
        ok = (dt in (torch.bfloat16, torch.float32) and all(t.dtype == dt and t.device.type == "cpu" for t in
                                                           (q_pe, latent_cache, w_uk, w_uv))
              and latent_cache.dim() == 4 and latent_cache.shape[2] == 1 and latent_cache.shape[3] == lora + dr
              and w_uk.shape[:2] == (H, dn) and w_uv.shape[0] == H and w_uv.shape[2] == lora)
    except (AttributeError, IndexError, TypeError, ValueError):
        ok = False
    if not ok:
        return None
    tiles = native_attention._takes(q_nope, latent_cache, w_uk, None, any_variant)
    out = q_nope.new_empty(T, H, dv)
    q = torch.cat((q_nope, q_pe), dim=-1)  # [T, H, dn + dr]
    wk, wv = w_uk.reshape(H * dn, lora), w_uv.reshape(H * dv, lora)
    for b, qs, qe, L in sequences(seq_lens, query_start_loc):
        ctx = gather_context(latent_cache, block_tables[b], L)[:, 0]  # [L, lora + dr]
        c, k_pe = ctx[:, :lora], ctx[:, lora:]
        hidden = native_attention.hidden_keys(qe - qs, L, causal)
        per = max(1, KV_BYTES // (q.element_size() * L * (dn + dr + dv)))
        for h0 in range(0, H, per):
            h1 = min(H, h0 + per)
            k_nope = torch.nn.functional.linear(c, wk[h0 * dn:h1 * dn]).view(L, h1 - h0, dn)
            k = torch.cat((k_nope, k_pe[:, None, :].expand(L, h1 - h0, dr)), dim=-1)
            v = torch.nn.functional.linear(c, wv[h0 * dv:h1 * dv]).view(L, h1 - h0, dv)
            if tiles:
                native_attention.attend(q[qs:qe, h0:h1], k, v, hidden, scale, out[qs:qe, h0:h1])
            else:
                o = torch.nn.functional.scaled_dot_product_attention(
                    q[qs:qe, h0:h1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                    attn_mask=~hidden[:, :L], scale=scale)
                out[qs:qe, h0:h1] = o.transpose(0, 1)
    return out
