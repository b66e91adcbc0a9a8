"""Prefill attention of a bf16 model on the CPU's matrix units: the two products (Q.K^T and P.V) as
bf16 GEMMs on the native panel kernels (AMX tiles, float32 sums), the masked softmax in float32 by torch.

torch's SDPA runs a 512-token, 32-head layer in ~60 ms on 2 threads of an AMX Xeon, bf16 or float32
alike (no tile units); this takes ~20 ms with the same inputs and a comparable error (the scores are
exact float32 sums of bf16 products; the probabilities are rounded to bf16 for P.V, as the tiles take
bf16 operands). Each KV head's keys and values are packed into the kernels' panels once per call (a
copy of L x D); the queries of its head group go through together, in row chunks that bound the
scores' memory. Plain causal attention takes a chunked forward instead where that is faster (``_chunked``:
AVX512-BF16 without AMX, and CPUs where torch's bf16 products are its scalar loop, bf16 or float32 models).
Layers with attention sinks, float32 models elsewhere and other CPUs keep torch's path (try_attention_prefill
returns None); so does ``KT_NATIVE_PREFILL_ATTENTION=0`` (benchmarks, bisecting)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from kt_backends.cpu import native, native_linear
from kt_backends.cpu.native_abi import NR
from kt_core.backend.torch_ops.attention import _visible, gather_context, sequences

SCORE_BYTES = 32 << 20  # float32 scores held at once per KV head: query rows are chunked to fit
PAD = 32  # context length padded to this (zero keys, masked): whole K blocks for the tiles
ROW_CHUNK = 128  # query rows a chunk at most: a causal chunk's scores stop at its last visible key


def _takes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks, any_variant: bool) -> bool:
    if os.environ.get("KT_NATIVE_PREFILL_ATTENTION", "1") == "0" or sinks is not None:
        return False
    bf16 = all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (q, k_cache, v_cache))
    return (bf16 and q.dim() == 3 and k_cache.dim() == 4 and native.available()
            and (any_variant or native.variant() == "amx") and native_linear._lib() is not None)


def _gemm(x: torch.Tensor, w: native.PackedProj, M: int, K: int) -> torch.Tensor:
    """x [T, K] float32 holding bf16 values (rounded to bf16 by the kernels where not) times the packed
    bf16 weight [M, K]^T: float32 [T, M]."""
    return native_linear.linear(x, native_linear.PackedLinear("bf16", 0, w, M, K), round_bf16=True)


def hidden_keys(n: int, L: int, causal: bool, sliding_window=None, chunk=None) -> torch.Tensor:
    """[n, Lp] True where query row i (at position L - n + i) must not see key j; the padding past L
    hidden too (Lp: L rounded up to PAD)."""
    Lp = -(-L // PAD) * PAD
    hidden = ~_visible(torch.arange(L - n, L), torch.arange(L), causal, sliding_window, chunk)
    if Lp > L:
        hidden = torch.cat([hidden, hidden.new_ones(n, Lp - L)], dim=1)
    return hidden


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, scale: float,
           out: torch.Tensor) -> None:
    """One sequence's attention on the panel kernels: q [n, Hq, D], k [L, Hkv, D], v [L, Hkv, Dv]
    (bf16; Dv may differ from D), hidden [n, Lp] (hidden_keys); writes out [n, Hq, Dv] (a view may
    be passed). Per KV head, its keys and values are packed once and its query heads go through
    together in row chunks of at most SCORE_BYTES of scores."""
    n, Hq, D = q.shape
    L, Hkv, Dv = k.shape[0], k.shape[1], v.shape[2]
    G, Lp = Hq // Hkv, hidden.shape[1]
    rows = max(1, min(ROW_CHUNK, SCORE_BYTES // (4 * G * Lp)))
    chunks = []  # (r0, r1, keys): each row chunk's scores stop after its last visible key (causal masks)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        seen = (~hidden[r0:r1]).any(dim=0).nonzero()
        last = int(seen[-1]) + 1 if seen.numel() else 1
        chunks.append((r0, r1, min(Lp, -(-last // NR) * NR)))
    for h in range(Hkv):
        kh = k.new_zeros(1, Lp, D)
        kh[0, :L] = k[:, h]
        vh = v.new_zeros(1, Dv, Lp)
        vh[0, :, :L] = v[:, h].t()
        kp, vp = native._pack_proj(kh, None), native._pack_proj(vh, None)
        for r0, r1, keys in chunks:
            qg = q[r0:r1, h * G:(h + 1) * G].transpose(0, 1).reshape(-1, D).float()
            kpre = kp if keys == Lp else native.PackedProj(kp.data[:, :keys // NR], None, None, None)
            s = _gemm(qg, kpre, keys, D).view(G, r1 - r0, keys)
            s.mul_(scale).masked_fill_(hidden[r0:r1, :keys], float("-inf"))
            if keys == Lp:
                p = torch.softmax(s, dim=-1).view(-1, Lp)
            else:  # the keys past the chunk's last visible one weigh 0 in P.V
                p = s.new_zeros(G * (r1 - r0), Lp)
                p[:, :keys] = torch.softmax(s, dim=-1).view(-1, keys)
            o = _gemm(p, vp, Dv, Lp).view(G, r1 - r0, Dv)
            out[r0:r1, h * G:(h + 1) * G] = o.transpose(0, 1).to(out.dtype)


def _chunked(q, causal, sliding_window, sinks, chunk, any_variant, chunked) -> Optional[str]:
    """Whether plain causal attention takes a chunked forward instead, and which: "bf16", fine-tuning's
    (S in float32 sums, the native softmax, P v in bf16: chunked_attention.py), which beats both torch's
    and the panel path where the kernels multiply bf16 pairs without AMX (Zen 5 EPYC, 2 threads, 512
    tokens, 32 heads: ~5 against 25 / 26 ms); "float32" (chunked_attention_f32.py) where torch's bf16
    products are its scalar loop (AVX2-only: Zen 3 EPYC, the same layer 19 ms against torch's 34 in bf16,
    30 in float32); None: neither. ``chunked``: force one ("bf16" or True, "float32"), or the panel path
    (False); None: decide."""
    if not (causal and sliding_window is None and chunk is None and sinks is None
            and os.environ.get("KT_NATIVE_PREFILL_ATTENTION", "1") != "0"):
        return None
    from kt_backends.cpu import chunked_attention, chunked_attention_f32

    if chunked is None:
        if any_variant:
            return None
        if chunked_attention.takes_forward():
            return "bf16"
        return "float32" if chunked_attention_f32.takes() else None
    if chunked == "float32":
        return chunked if chunked_attention._ops()[0] is not None else None
    ok = chunked and chunked_attention._ops()[0] is not None and chunked_attention._precision_switch()
    return "bf16" if ok else None


def try_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, causal=True,
                          sliding_window=None, sinks=None, chunk=None, any_variant=False,
                          chunked=None) -> Optional[torch.Tensor]:
    """The torch reference's (kt_core.backend.torch_ops.attention.attention_prefill) result, or None
    when this path does not take the inputs. ``any_variant``: on every kernel variant, not only AMX
    (the vector kernels give the same products; the tests run the glue on every CPU this way);
    ``chunked``: see ``_chunked``."""
    path = _chunked(q, causal, sliding_window, sinks, chunk, any_variant, chunked)
    dtypes = (torch.bfloat16,) if path == "bf16" else (torch.bfloat16, torch.float32)
    if path and q.dim() == 3 and k_cache.dim() == 4 and q.shape[1] % k_cache.shape[2] == 0 \
            and v_cache.shape[-1] == q.shape[2] \
            and all(t.dtype in dtypes and t.dtype == q.dtype and t.device.type == "cpu" for t in (q, k_cache, v_cache)):
        from kt_backends.cpu import chunked_attention_f32
        from kt_backends.cpu.chunked_attention import attention_forward

        out = torch.empty_like(q)
        for b, qs, qe, length in sequences(seq_lens, query_start_loc):
            k = gather_context(k_cache, block_tables[b], length).transpose(0, 1)  # [Hkv, L, D]
            v = gather_context(v_cache, block_tables[b], length).transpose(0, 1)
            if path == "bf16":
                attention_forward(q[qs:qe].transpose(0, 1), k, v, scale, out=out[qs:qe].transpose(0, 1))
            else:
                o = chunked_attention_f32.forward(q[qs:qe].transpose(0, 1).float(), k.float(), v.float(), scale)
                out[qs:qe] = o.transpose(0, 1)
        return out
    if not _takes(q, k_cache, v_cache, sinks, any_variant):
        return None
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    if Hq % Hkv or v_cache.shape[-1] != D:
        return None
    out = torch.empty_like(q)
    for b, qs, qe, length in sequences(seq_lens, query_start_loc):
        k = gather_context(k_cache, block_tables[b], length)  # [L, Hkv, D]
        v = gather_context(v_cache, block_tables[b], length)
        hidden = hidden_keys(qe - qs, length, causal, sliding_window, chunk)
        attend(q[qs:qe], k, v, hidden, scale, out[qs:qe])
    return out
