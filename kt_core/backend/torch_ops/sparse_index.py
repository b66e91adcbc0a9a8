"""DeepSeek Sparse Attention's lightning indexer on torch: which cached tokens each query attends to.

Per query and cached token t the index score is ``sum_h w[h] * relu(scale * q[h] . k[t])`` over the
indexer's heads (its own small key per token, kept in a paged cache like the latent one); the query
then attends to the ``topk`` visible tokens of highest score (all of them when fewer are visible).
"""
from __future__ import annotations

import torch

from kt_core.backend.torch_ops.attention import gather_context, sequences


def sparse_index(q, weights, index_cache, block_tables, seq_lens, query_start_loc, scale: float,
                 topk: int) -> torch.Tensor:
    """q [T, Hi, Di], weights [T, Hi] float32, index_cache [nb, bs, 1, Di]. Returns [T, topk] int64
    key positions, -1 where a query sees fewer than topk tokens (causal: a query sees its own
    position and those before it)."""
    out = torch.full((q.shape[0], topk), -1, dtype=torch.long, device=q.device)
    for b, qs, qe, length in sequences(seq_lens, query_start_loc):
        n = qe - qs
        k = gather_context(index_cache, block_tables[b], length)[:, 0].float()  # [L, Di]
        scores = torch.relu(torch.einsum("thd,ld->thl", q[qs:qe].float(), k) * scale)
        index = torch.einsum("th,thl->tl", weights[qs:qe].float(), scores)
        q_pos = torch.arange(length - n, length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        index = index.masked_fill(~visible, float("-inf"))
        kk = min(topk, length)
        top = index.topk(kk, dim=-1).indices
        top = top.masked_fill(~visible.gather(1, top), -1)  # early queries see fewer than topk tokens
        out[qs:qe, :kk] = top
    return out
