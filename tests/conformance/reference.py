"""Float64 references for the contract's ops, written naively and independently of
kt_core's torch implementation (loops over tokens, heads and groups). Quantized weights are
decoded by tests/conformance/dequant_reference.py, from the format definitions."""
from __future__ import annotations

import math

import torch

from tests.conformance.dequant_reference import activations_for, dequantize


def _dyn(w):
    """w8a8 weights see their activations quantized per row (to int8, in float64)."""
    return activations_for(w)


def linear(x, w, b=None):
    y = _dyn(w)(x.double()) @ dequantize(w).T
    return y if b is None else y + b.double()


def act(g, u, kind):
    if kind == "silu":
        return g / (1 + torch.exp(-g)) * u
    if kind == "gelu_tanh":
        return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    if kind == "swiglu_oai":
        g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
        return (u + 1) * g / (1 + torch.exp(-1.702 * g))
    if kind == "silu_clamp10":  # DeepSeek-V4's clamped SwiGLU
        g, u = g.clamp(max=10.0), u.clamp(-10.0, 10.0)
        return g / (1 + torch.exp(-g)) * u
    raise ValueError(kind)


def moe(hidden, ids, weights, experts, kind="silu"):
    held = {int(e): i for i, e in enumerate(experts.expert_ids.tolist())}
    gate, up, down = (dequantize(w) for w in (experts.gate, experts.up, experts.down))
    dyn = _dyn(experts.gate)
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = dyn(hidden[t:t + 1].double())[0]
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in held:
                continue
            i = held[e]
            g, u = gate[i] @ x, up[i] @ x
            if experts.gate_bias is not None:
                g, u = g + experts.gate_bias[i].double(), u + experts.up_bias[i].double()
            y = down[i] @ dyn(act(g, u, kind)[None])[0]
            if experts.down_bias is not None:
                y = y + experts.down_bias[i].double()
            out[t] += float(weights[t, k]) * y
    return out


def attention(q, ks, vs, scale, causal=True, window=None, sinks=None, chunk=None, selected=None):
    """q [n, Hq, D] for the last n positions of a context with keys ks/vs [L, Hkv, D]; ``chunk``:
    only keys of the query's own chunk of positions (0..c-1, c..2c-1, ...); ``selected``: per query,
    the only positions it may see."""
    n, Hq, _ = q.shape
    L, Hkv, _ = ks.shape
    out = torch.zeros(n, Hq, vs.shape[-1], dtype=torch.float64)
    for i in range(n):
        pos = L - n + i
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            s = []
            for j in range(L):
                ok = (not causal or j <= pos) and (window is None or j > pos - window) and \
                    (chunk is None or j // chunk == pos // chunk) and (selected is None or j in selected[i])
                s.append(float(q[i, h].double() @ ks[j, kh].double()) * scale if ok else -math.inf)
            if sinks is not None:
                s.append(float(sinks[h]))
            p = torch.softmax(torch.tensor(s, dtype=torch.float64), 0)[:L]
            out[i, h] = (p[:, None] * vs[:, kh].double()).sum(0)
    return out


def rmsnorm(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def rope(x, pos, theta, rot, interleaved):
    """Rotate pairs explicitly: angle pos * theta[i] for pair i."""
    x = x.double().clone()
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(rot // 2):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)
            ang = float(pos[t]) * float(theta[i])
            c, s = math.cos(ang), math.sin(ang)
            out[t, :, a] = x[t, :, a] * c - x[t, :, b] * s
            out[t, :, b] = x[t, :, b] * c + x[t, :, a] * s
    return out


def route(logits, top_k, scoring, renorm, n_group, topk_group, bias, scale):
    T, E = logits.shape
    ws, idss = [], []
    for t in range(T):
        lg = logits[t].double()
        if scoring == "softmax_topk":
            order = sorted(range(E), key=lambda e: -float(lg[e]))[:top_k]
            w = torch.softmax(lg[order], 0) * scale
            ws.append(w)
            idss.append(order)
            continue
        sc = torch.softmax(lg, 0) if scoring == "softmax" else 1 / (1 + torch.exp(-lg))
        ch = sc + (bias.double() if bias is not None else 0)
        allowed = set(range(E))
        if n_group > 1:
            size = E // n_group
            gscore = []
            for g in range(n_group):
                vals = sorted((float(v) for v in ch[g * size:(g + 1) * size]), reverse=True)
                gscore.append(sum(vals[:2]) if scoring == "sigmoid" else vals[0])
            best = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
            allowed = {e for g in best for e in range(g * size, (g + 1) * size)}
        order = sorted(allowed, key=lambda e: -float(ch[e]))[:top_k]
        w = sc[order]
        if renorm:
            w = w / w.sum()
        ws.append(w * scale)
        idss.append(order)
    return torch.stack(ws), torch.tensor(idss)


def sampling_probs(logits, temp, top_k, top_p, min_p):
    rows = []
    for b in range(logits.shape[0]):
        lg = logits[b].double()
        V = lg.numel()
        if float(temp[b]) <= 0:
            p = torch.zeros(V, dtype=torch.float64)
            p[int(lg.argmax())] = 1
            rows.append(p)
            continue
        x = lg / float(temp[b])
        keep = torch.ones(V, dtype=torch.bool)
        k = int(top_k[b])
        if 0 < k < V:
            kth = sorted(x.tolist(), reverse=True)[k - 1]
            keep &= x >= kth
        p = torch.softmax(x.masked_fill(~keep, -math.inf), 0)
        if float(top_p[b]) < 1:
            order = sorted(range(V), key=lambda i: -float(p[i]))
            mass = 0.0
            for j, i in enumerate(order):
                if j > 0 and mass >= float(top_p[b]):
                    keep[i] = False
                mass += float(p[i])
            p = torch.softmax(x.masked_fill(~keep, -math.inf), 0)
        if float(min_p[b]) > 0:
            keep &= p >= float(min_p[b]) * float(p.max())
            p = p * keep
        rows.append(p / p.sum())
    return torch.stack(rows)


def mla(q_nope, q_pe, c, k_pe, w_uk, w_uv, scale, selected=None):
    """Un-absorbed MLA: expand per-head keys/values from the latent and attend causally.
    q_* [n, H, *] are the last n positions of a context with latent c [L, lora], k_pe [L, dr]."""
    H = q_nope.shape[1]
    k_nope = torch.einsum("sl,hnl->shn", c.double(), w_uk.double())
    v = torch.einsum("sl,hvl->shv", c.double(), w_uv.double())
    k = torch.cat([k_nope, k_pe.double()[:, None, :].expand(-1, H, -1)], dim=-1)
    q = torch.cat([q_nope.double(), q_pe.double()], dim=-1)
    return attention(q, k, v, scale, causal=True, selected=selected)


def index_scores(q, weights, keys, scale):
    """DeepSeek sparse attention's index scores of the last n positions of a context: q [n, Hi, Di],
    weights [n, Hi], keys [L, Di] -> [n, L] (float64; -inf for positions after the query)."""
    n, Hi, _ = q.shape
    L = keys.shape[0]
    out = torch.full((n, L), -math.inf, dtype=torch.float64)
    for i in range(n):
        for t in range(L - n + i + 1):
            out[i, t] = sum(float(weights[i, h]) * max(float(q[i, h].double() @ keys[t].double()) * scale, 0.0)
                            for h in range(Hi))
    return out


def gated_delta_rule(q, k, v, g, beta, state):
    """One sequence, token by token in float64: q, k [n, Hk, dk], v [n, Hv, dv], g, beta [n, Hv],
    state [Hv, dk, dv] (returned updated, with the outputs [n, Hv, dv])."""
    n, Hk, dk = q.shape
    Hv, dv = v.shape[1], v.shape[2]
    S = state.double().clone()
    out = torch.zeros(n, Hv, dv, dtype=torch.float64)
    for t in range(n):
        for h in range(Hv):
            kh = h // (Hv // Hk)
            qv, kv = q[t, kh].double(), k[t, kh].double()
            qv = qv / math.sqrt(float((qv * qv).sum()) + 1e-6) / math.sqrt(dk)
            kv = kv / math.sqrt(float((kv * kv).sum()) + 1e-6)
            S[h] *= math.exp(float(g[t, h]))
            recalled = kv @ S[h]  # [dv]
            S[h] += torch.outer(kv, float(beta[t, h]) * (v[t, h].double() - recalled))
            out[t, h] = qv @ S[h]
    return out, S


def causal_conv1d(x, history, weight, silu=True):
    """x [n, C] after ``history [C, K-1]`` (the previous inputs, oldest first); weight [C, K]."""
    n, C = x.shape
    K = weight.shape[1]
    seq = torch.cat((history.double(), x.double().T), dim=1)
    out = torch.zeros(n, C, dtype=torch.float64)
    for t in range(n):
        for c in range(C):
            y = sum(float(weight[c, j]) * float(seq[c, t + j]) for j in range(K))
            out[t, c] = y / (1 + math.exp(-y)) if silu else y
    return out, seq[:, seq.shape[1] - (K - 1):]
