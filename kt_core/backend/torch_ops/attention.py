"""Paged attention on torch: varlen prefill and batched decode over a block table."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gather_context(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_row[:n_blocks].long()].flatten(0, 1)[:length]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
             sliding_window: Optional[int]) -> torch.Tensor:
    mask = torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Hq, n, D], k/v [Hkv, L, D] (GQA by head groups), mask [n, L] or [Hq, n, L]."""
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                      causal=True, sliding_window=None) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        qs, qe = starts[b], starts[b + 1]
        n = qe - qs
        if n == 0:
            continue
        if n > length:
            raise ValueError(f"sequence {b}: {n} new queries but seq_len {length}; "
                             "seq_lens must count the cached context plus the new tokens")
        k = gather_context(k_cache, block_tables[b], length)
        v = gather_context(v_cache, block_tables[b], length)
        q_pos = torch.arange(length - n, length, device=q.device)
        k_pos = torch.arange(length, device=q.device)
        mask = _visible(q_pos, k_pos, causal, sliding_window)
        o = _sdpa(q[qs:qe].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


def attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None) -> torch.Tensor:
    B = q.shape[0]
    if B == 0:
        return torch.empty_like(q)
    block_size = k_cache.shape[1]
    max_len = int(seq_lens.max())
    n_blocks = (max_len + block_size - 1) // block_size
    blocks = block_tables[:, :n_blocks].long()
    k = k_cache[blocks].flatten(1, 2)[:, :max_len]  # [B, L, Hkv, D]
    v = v_cache[blocks].flatten(1, 2)[:, :max_len]
    pos = torch.arange(max_len, device=q.device)
    lens = seq_lens.to(q.device).long()
    mask = pos[None, :] < lens[:, None]
    if sliding_window is not None:
        mask &= pos[None, :] >= lens[:, None] - sliding_window
    groups = q.shape[1] // k.shape[2]
    k = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, Hq, L, D]
    v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return o[:, :, 0, :]
