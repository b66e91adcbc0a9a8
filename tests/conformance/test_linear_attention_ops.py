"""The linear-attention ops (gated delta rule, short causal convolution) of every backend against
float64 token-by-token references: mixed prefill / decode batches that continue per-slot states."""
from __future__ import annotations

import torch

from kt_core.backend.contract import Op
from tests.conformance import reference as ref
from tests.conformance.test_ops import check, dtype, need, on, rnd  # noqa: F401 (dtype: the fixture)


def _batch(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def test_gated_delta_rule(backend, dtype):
    need(backend, Op.GATED_DELTA_RULE, dtype)
    Hk, Hv, dk, dv = 2, 4, 16, 8
    lens, slots = [70, 1, 5, 1], [3, 0, 2, 1]  # a prefill over more than one 64-token chunk, decodes, a short one
    T = sum(lens)
    q, k = rnd(T, Hk, dk, seed=1).to(dtype), rnd(T, Hk, dk, seed=2).to(dtype)
    v = rnd(T, Hv, dv, seed=3).to(dtype)
    g = -torch.rand(T, Hv, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.3
    beta = torch.rand(T, Hv, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    state = rnd(5, Hv, dk, dv, scale=0.3, seed=6).float()  # every slot starts from some history
    qsl = _batch(lens)
    st = on(backend, state.clone())
    out = backend.gated_delta_rule(on(backend, q), on(backend, k), on(backend, v), on(backend, g.float()),
                                   on(backend, beta.float()), st, on(backend, torch.tensor(slots)), on(backend, qsl))
    want, want_state = [], state.double().clone()
    for b, slot in enumerate(slots):
        s, e = int(qsl[b]), int(qsl[b + 1])
        o, want_state[slot] = ref.gated_delta_rule(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], state[slot])
        want.append(o)
    check("gated_delta_rule", dtype, out, torch.cat(want))
    check("gated_delta_rule", torch.float32, st, want_state)  # the state is float32 whatever the inputs
    assert torch.equal(st[4].cpu(), state[4]), "a slot no sequence uses is left alone"


def test_causal_conv1d(backend, dtype):
    need(backend, Op.CAUSAL_CONV1D, dtype)
    C, K = 12, 4
    lens, slots = [9, 1, 2], [1, 2, 0]
    x = rnd(sum(lens), C, seed=10).to(dtype)
    w = rnd(C, K, scale=0.5, seed=11).to(dtype)
    conv = rnd(3, C, K - 1, seed=12).to(dtype)
    qsl = _batch(lens)
    cs = on(backend, conv.clone())
    out = backend.causal_conv1d(on(backend, x), cs, on(backend, w), on(backend, torch.tensor(slots)), on(backend, qsl))
    want, want_conv = [], conv.double().clone()
    for b, slot in enumerate(slots):
        s, e = int(qsl[b]), int(qsl[b + 1])
        o, want_conv[slot] = ref.causal_conv1d(x[s:e], conv[slot], w)
        want.append(o)
    check("causal_conv1d", dtype, out, torch.cat(want))
    assert torch.equal(cs.cpu().double(), want_conv.to(dtype).double()), "the window holds the last K-1 inputs exactly"
