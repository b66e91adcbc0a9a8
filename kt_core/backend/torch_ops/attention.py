"""Paged attention on torch: varlen prefill and batched decode over a block table."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kt_core.backend.torch_ops import wide_mm


def gather_context(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_row[:n_blocks].long()].flatten(0, 1)[:length]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
             sliding_window: Optional[int], chunk: Optional[int] = None) -> torch.Tensor:
    mask = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    if chunk is not None:
        mask &= k_pos[None, :] // chunk == q_pos[:, None] // chunk
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [..., Hq, n, D], k/v [..., Hkv, L, D] (GQA by head groups: torch's kernels take them without
    repeating the kv heads), boolean mask broadcastable to [..., Hq, n, L], or None: plain causal
    attention of n == L tokens. ``sinks [Hq]``: a learned logit per head that joins the softmax
    denominator but attends to nothing (GPT-OSS)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and wide_mm.scalar_bf16(q):
        # torch's bf16 backward there runs its products on a scalar loop (Zen 3, 512 tokens, 32 heads:
        # 642 ms forward + backward, 107 in float32)
        return attend(q.float(), k.float(), v.float(), mask, scale, sinks).to(q.dtype)
    groups = q.shape[-3] // k.shape[-3]
    if mask is None and sinks is None:  # with a batch dim, as torch's fused CPU kernel wants (512 tokens,
        #                                 32 heads: ~10x the math path's speed forward, 2x backward)
        b = q.dim() == 3
        o = F.scaled_dot_product_attention(q[None] if b else q, k[None] if b else k, v[None] if b else v,
                                           is_causal=True, scale=scale, enable_gqa=groups > 1)
        return o[0] if b else o
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


def sequences(seq_lens: torch.Tensor, query_start_loc: torch.Tensor):
    """(b, first query row, end row, context length) of every sequence with new queries."""
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        qs, qe = starts[b], starts[b + 1]
        if qe == qs:
            continue
        if qe - qs > length:
            raise ValueError(f"sequence {b}: {qe - qs} new queries but seq_len {length}; "
                             "seq_lens must count the cached context plus the new tokens")
        yield b, qs, qe, length


def attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                      causal=True, sliding_window=None, sinks=None, chunk=None, attend_fn=None,
                      fresh_kv=None) -> torch.Tensor:
    """``attend_fn``: ``attend``'s stand-in (fine-tuning's backward: kt_core/train/native_attention.py).
    ``fresh_kv``: (k, v) [tokens, Hkv, D] just written to the caches for these tokens: a sequence with no
    context before them attends to those rows as they are (fine-tuning: no gather from the cache, and
    no gradient scattered back into it)."""
    attend_fn = attend_fn or attend
    out = torch.empty_like(q)
    for b, qs, qe, length in sequences(seq_lens, query_start_loc):
        n = qe - qs
        if fresh_kv is not None and n == length:
            k, v = fresh_kv[0][qs:qe], fresh_kv[1][qs:qe]
        else:
            k = gather_context(k_cache, block_tables[b], length)
            v = gather_context(v_cache, block_tables[b], length)
        q_pos = torch.arange(length - n, length, device=q.device)
        k_pos = torch.arange(length, device=q.device)
        plain = causal and sliding_window is None and chunk is None and n == length  # a whole sequence
        mask = None if plain else _visible(q_pos, k_pos, causal, sliding_window, chunk)
        o = attend_fn(q[qs:qe].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale, sinks)
        out[qs:qe] = o.transpose(0, 1)
    return out


def attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None,
                     sinks=None, chunk=None) -> torch.Tensor:
    B, Hq, D = q.shape
    if B == 0:
        return torch.empty_like(q)
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    n_blocks = (max_len + block_size - 1) // block_size
    blocks = block_tables[:, :n_blocks].long()
    k = k_cache[blocks].flatten(1, 2)[:, :max_len].float()  # [B, L, Hkv, D]
    v = v_cache[blocks].flatten(1, 2)[:, :max_len].float()
    pos = torch.arange(max_len, device=q.device)
    lens = seq_lens.to(q.device).long()
    mask = pos[None, :] < lens[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] >= lens[:, None] - sliding_window
    if chunk is not None:  # the query sits at position len - 1: its chunk starts at a multiple of chunk
        mask &= pos[None, :] >= (lens[:, None] - 1) // chunk * chunk
    # GQA without copying K/V per query head: group the query heads of each KV head
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, Hkv, Hq // Hkv, 1).expand(B, -1, -1, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(B, Hq, D).to(q.dtype)


def attention_mla(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, query_start_loc, scale,
                  causal=True, selected=None) -> torch.Tensor:
    """Multi-head latent attention in the absorbed form, over the latent cache.

    q_nope [T, H, dn], q_pe [T, H, dr]; latent_cache [nb, bs, 1, lora + dr] holds the
    normalised compressed KV and the roped key part; w_uk [H, dn, lora] and
    w_uv [H, dv, lora] are kv_b_proj's key and value halves. Returns [T, H, dv].
    """
    lora = w_uk.shape[-1]
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1])
    q_abs = torch.einsum("thn,hnl->thl", q_nope.float(), w_uk.float())
    for b, qs, qe, length in sequences(seq_lens, query_start_loc):
        n = qe - qs
        ctx = gather_context(latent_cache, block_tables[b], length)[:, 0].float()  # [L, lora + dr]
        c, k_pe = ctx[:, :lora], ctx[:, lora:]
        scores = (torch.einsum("thl,sl->hts", q_abs[qs:qe], c)
                  + torch.einsum("thr,sr->hts", q_pe[qs:qe].float(), k_pe)) * scale
        if causal:
            q_pos = torch.arange(length - n, length, device=c.device)
            visible = torch.arange(length, device=c.device)[None, :] <= q_pos[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        if selected is not None:  # DeepSeek sparse attention: only the indexer's picks
            sel = selected[qs:qe].long()
            keep = torch.zeros(n, length + 1, dtype=torch.bool, device=c.device)
            keep.scatter_(1, torch.where(sel < 0, length, sel), True)
            scores = scores.masked_fill(~keep[:, :length], float("-inf"))
        o_lat = torch.einsum("hts,sl->thl", torch.softmax(scores, dim=-1), c)
        out[qs:qe] = torch.einsum("thl,hvl->thv", o_lat, w_uv.float()).to(out.dtype)
    return out
