"""Gated delta-rule linear attention (Qwen3-Next's Gated DeltaNet) on torch, over varlen batches.

Each sequence carries a recurrent state ``S [Hv, dk, dv]`` (float32) and the last ``K - 1`` inputs
of its short causal convolution, in pools indexed by the sequence's state slot. Per token t:

    S = exp(g_t) * S;  S = S + k_t (beta_t (v_t - k_t^T S))^T;  o_t = q_t^T S / sqrt(dk)

with q and k L2-normalised. A prefill of n tokens runs the chunked (WY) form of that recurrence
(``CHUNK`` tokens at a time, a triangular solve per chunk), a decode token the step itself;
both continue from the slot's state, so chunked prefill and decode are the same call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _step(q, k, v, g, beta, state):
    """Token by token: q, k [n, H, dk], v [n, H, dv], g, beta [n, H]; state [H, dk, dv] updated."""
    out = torch.empty_like(v)
    for t in range(q.shape[0]):
        state.mul_(g[t].exp()[:, None, None])
        delta = (v[t] - torch.einsum("hk,hkv->hv", k[t], state)) * beta[t][:, None]
        state.add_(k[t][:, :, None] * delta[:, None, :])
        out[t] = torch.einsum("hk,hkv->hv", q[t], state)
    return out


def _chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence a chunk at a time (WY representation): per chunk, the intra-chunk part by
    a unit-triangular solve and the inter-chunk part through the state. Shapes as in ``_step``."""
    n, H, dk = q.shape
    pad = (-n) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    c = q.shape[0] // chunk
    # [H, c, chunk, d]
    q, k, v = (x.view(c, chunk, H, -1).permute(2, 0, 1, 3) for x in (q, k, v))
    g, beta = (x.view(c, chunk, H).permute(2, 0, 1) for x in (g, beta))
    cum = g.cumsum(-1)  # [H, c, chunk]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()
    kb, vb = k * beta[..., None], v * beta[..., None]
    # (I + strictly lower part of this) maps the chunk's corrected values to beta * v: one solve each
    system = (kb @ k.transpose(-1, -2)) * decay
    new_v = torch.linalg.solve_triangular(system, vb, upper=False, unitriangular=True)
    k_cum = torch.linalg.solve_triangular(system, kb * cum.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q_dec = q * cum.exp()[..., None]
    k_dec = k * (cum[..., -1:] - cum).exp()[..., None]
    out = torch.empty_like(v)
    for i in range(c):
        v_i = new_v[:, i] - k_cum[:, i] @ state
        out[:, i] = q_dec[:, i] @ state + intra[:, i] @ v_i
        state.mul_(cum[:, i, -1].exp()[:, None, None]).add_(k_dec[:, i].transpose(-1, -2) @ v_i)
    return out.permute(1, 2, 0, 3).reshape(c * chunk, H, -1)[:n]


def gated_delta_rule(q, k, v, g, beta, state, slots, query_start_loc) -> torch.Tensor:
    """q, k [T, Hk, dk]; v [T, Hv, dv]; g (log decay, <= 0) and beta [T, Hv]; ``state [S, Hv, dk, dv]``
    float32, the rows ``slots[b]`` updated in place. Key heads are shared by Hv / Hk value heads.
    Returns [T, Hv, dv] in v's dtype."""
    Hv = v.shape[1]
    rep = Hv // q.shape[1]
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    starts = query_start_loc.tolist()
    for b, slot in enumerate(slots.tolist()):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        qb, kb = (_l2(x[s:e].float()).repeat_interleave(rep, dim=1) for x in (q, k))
        qb = qb * qb.shape[-1] ** -0.5
        st = state[slot]
        args = (qb, kb, v[s:e].float(), g[s:e].float(), beta[s:e].float(), st)
        out[s:e] = _step(*args) if e - s == 1 else _chunked(*args)
    return out.to(v.dtype)


def causal_conv1d(x, conv_state, weight, slots, query_start_loc, activation: str = "silu") -> torch.Tensor:
    """Depthwise causal convolution over each sequence's new rows ``x [T, C]`` continuing from its
    last K - 1 inputs in ``conv_state [S, C, K - 1]`` (updated in place); ``weight [C, K]``."""
    K = weight.shape[1]
    out = torch.empty_like(x)
    starts = query_start_loc.tolist()
    w = weight.float()
    for b, slot in enumerate(slots.tolist()):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        seq = torch.cat((conv_state[slot].float(), x[s:e].float().T), dim=1)  # [C, K - 1 + n]
        y = F.conv1d(seq[None], w[:, None, :], groups=w.shape[0])[0]  # [C, n]
        conv_state[slot].copy_(seq[:, -(K - 1):] if K > 1 else seq[:, :0])
        out[s:e] = (F.silu(y) if activation == "silu" else y).T.to(x.dtype)
    return out
