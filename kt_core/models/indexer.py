"""DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): per query, which cached tokens its
MLA attends to.

Its own small projections: a query per indexer head from the MLA's normalised q_a (``wq_b``), one
LayerNorm'd key per token (``wk``, kept in the paged index cache beside the latent one) and per-head
weights (``weights_proj``); the first qk_rope_head_dim features of q and k take the rotary
embedding (rotate-half form, the MLA's frequencies; GLM-5: adjacent pairs). GLM-5's "shared" layers
have no indexer and reuse the choice of the last layer that ran one. The device contract's ``sparse_index`` scores
the cached keys and keeps the top ``index_topk``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_core.backend.contract import Backend
from kt_core.kvcache.paged import Batch
from kt_core.models.spec import ModelSpec


def load(r, a: str, spec: ModelSpec) -> dict:
    """The indexer's weights under ``a`` (the layer's ``self_attn.`` prefix)."""
    ix, H = spec.index, spec.hidden_size
    i = a + "indexer."
    return {"wq_b": r.dense(i + "wq_b.weight", (ix.n_heads * ix.head_dim, spec.mla.q_lora_rank)),
            "wk": r.dense(i + "wk.weight", (ix.head_dim, H)),
            "k_norm": r.t(i + "k_norm.weight", (ix.head_dim,)), "k_norm_bias": r.t(i + "k_norm.bias", (ix.head_dim,)),
            "weights_proj": r.dense(i + "weights_proj.weight", (ix.n_heads, H))}


def select(be: Backend, w: dict, spec: ModelSpec, x: torch.Tensor, q_a: torch.Tensor, batch: Batch,
           index_cache: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Store this step's indexer keys and return each query's chosen positions [T, index_topk]."""
    ix, T = spec.index, x.shape[0]
    q = be.linear(q_a, w["wq_b"]).view(T, ix.n_heads, ix.head_dim)
    k = be.linear(x, w["wk"])
    k = F.layer_norm(k.float(), (ix.head_dim,), w["k_norm"].float(), w["k_norm_bias"].float(), 1e-6).to(k.dtype)
    q, k = be.rope(q.contiguous(), k[:, None, :].contiguous(), batch.positions, cos_sin, ix.interleaved)
    be.write_kv(k, None, index_cache, None, batch.slot_mapping)
    weights = be.linear(x, w["weights_proj"]).float() * ix.n_heads ** -0.5
    return be.sparse_index(q, weights, index_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                           ix.head_dim ** -0.5, ix.topk)
