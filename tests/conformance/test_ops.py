"""Every op of the device contract against a float64 reference, for every backend
(``--backend NAME`` to pick) x dtype (fp32, bf16, fp16 where ``supports`` says so)."""
from __future__ import annotations

import pytest
import torch

from kt_core.backend.contract import Op, Quant
from kt_core.backend.torch_ops.norm_rope import rope_cos_sin
from kt_core.weights.quant import ExpertWeights, quantize
from tests.conformance import reference as ref
from tests.conformance.tolerances import TOLERANCE
from tests.unit.native_experts import int8_with_zeros

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.detach().cpu().double(), expected.detach().cpu().double()
    assert out.shape == expected.shape, (out.shape, expected.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def check(op: str, dtype, out, expected):
    err = rel_err(out, expected)
    tol = TOLERANCE[op][dtype]
    assert err <= tol, f"{op} {dtype}: relative error {err:.3g} > tolerance {tol:.3g}"


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request, backend):
    return request.param


def need(backend, op, dtype, quant=Quant.NONE):
    if not backend.supports(op, dtype, quant):
        pytest.skip(f"{backend.name} does not support {Op(op).value} in {dtype} with {Quant(quant).value}")


def on(backend, t):
    return t.to(backend.torch_device(0))


def rnd(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ---------------------------------------------------------------- dense / experts
def split_quant(quant: str) -> tuple[str, int]:
    """"int8g32" -> ("int8", 32): int8 with a scale per 32 inputs (else one per row)."""
    return ("int8", int(quant[5:])) if quant.startswith("int8g") else (quant, 0)


@pytest.mark.parametrize("quant", ["none", "int8", "int8g32", "int4", "fp8", "w8a8"])
def test_linear(backend, dtype, quant):
    quant, int8_group = split_quant(quant)
    need(backend, Op.LINEAR, dtype, quant)
    x = rnd(7, 64).to(dtype)
    w = quantize(rnd(48, 64, scale=0.1, seed=1).to(dtype).float(), quant, group_size=32, int8_group=int8_group)
    w = w.to(dtype) if isinstance(w, torch.Tensor) else w
    b = rnd(48, seed=2).to(dtype)
    dev_w = on(backend, w) if isinstance(w, torch.Tensor) else w.to(backend.torch_device(0))
    out = backend.linear(on(backend, x), dev_w, on(backend, b))
    assert out.dtype == dtype
    check("linear_w8a8" if quant == "w8a8" else "linear", dtype, out, ref.linear(x, w, b))


def make_experts(E_held, H, I, quant, dtype, ids, bias=False, symmetric=True):
    def w(shape, seed):
        t = rnd(*shape, scale=0.2, seed=seed).to(dtype).float()
        fmt, int8_group = split_quant(quant)
        if fmt == "int8" and not symmetric:  # zero points: GGUF's Q5_1 / Q5_K / Q2_K kept exactly
            return int8_with_zeros(t, int8_group)
        q = quantize(t, fmt, group_size=32, symmetric=symmetric, int8_group=int8_group)
        return q.to(dtype) if isinstance(q, torch.Tensor) else q
    kw = {}
    if bias:
        kw = dict(gate_bias=rnd(E_held, I, scale=0.1, seed=7).to(dtype), up_bias=rnd(E_held, I, scale=0.1, seed=8).to(dtype),
                  down_bias=rnd(E_held, H, scale=0.1, seed=9).to(dtype))
    return ExpertWeights(torch.tensor(ids), w((E_held, I, H), 3), w((E_held, I, H), 4), w((E_held, H, I), 5), **kw)


def experts_on(backend, ex: ExpertWeights):
    """Move to the device and let the backend repack them, as the model loader does."""
    dev = backend.torch_device(0)
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return backend.prepare_experts(ExpertWeights(ex.expert_ids.to(dev), mv(ex.gate), mv(ex.up), mv(ex.down),
                                                 mv(ex.gate_bias), mv(ex.up_bias), mv(ex.down_bias)))


@pytest.mark.parametrize("quant,symmetric", [("none", True), ("int8", True), ("int8g16", True), ("int8g32", False),
                                             ("int4", True), ("int4", False), ("fp8", True), ("w8a8", True)],
                         ids=["none", "int8", "int8g16", "int8g32zeros", "int4sym", "int4asym", "fp8", "w8a8"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_moe_experts(backend, dtype, quant, symmetric, tokens):
    need(backend, Op.MOE_EXPERTS, dtype, split_quant(quant)[0])
    E, K, H, I = 8, 3, 64, 32
    held = [6, 1, 3, 0]  # a device holds half of the experts, in any order
    ex = make_experts(len(held), H, I, quant, dtype, held, symmetric=symmetric)
    x = rnd(tokens, H, seed=11).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:K] for t in range(tokens)])
    wts = torch.rand(tokens, K, generator=torch.Generator().manual_seed(12))
    out = backend.moe_experts(on(backend, x), on(backend, ids), on(backend, wts), experts_on(backend, ex))
    assert out.dtype == dtype
    op = {"w8a8": "moe_experts_w8a8", "int8": "moe_experts_intq", "int4": "moe_experts_intq"}.get(split_quant(quant)[0],
                                                                                               "moe_experts")
    check(op, dtype, out, ref.moe(x, ids, wts, ex))


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu_oai", "silu_clamp10"])
def test_moe_experts_activations_and_bias(backend, dtype, activation):
    need(backend, Op.MOE_EXPERTS, dtype)
    E, K, H, I = 4, 2, 32, 16
    ex = make_experts(E, H, I, "none", dtype, [0, 1, 2, 3], bias=activation == "swiglu_oai")
    # large enough to hit the SwiGLU clamps (gate / up pre-activations past 7; past 10 for silu_clamp10)
    x = rnd(5, H, scale=6.0 if activation == "silu_clamp10" else 3.0, seed=13).to(dtype)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0]])
    wts = torch.rand(5, K, generator=torch.Generator().manual_seed(14))
    expected = ref.moe(x, ids, wts, ex, activation)
    if activation == "silu_clamp10":  # the clamp bites: a kernel without it would fail
        assert rel_err(ref.moe(x, ids, wts, ex, "silu"), expected) > 0.1
    out = backend.moe_experts(on(backend, x), on(backend, ids), on(backend, wts), experts_on(backend, ex), activation)
    check("moe_experts", dtype, out, expected)


def test_moe_partials_add_up(backend):
    """Two disjoint expert sets give partial sums that add to the full result."""
    E, K, H, I = 6, 2, 32, 16
    full = make_experts(E, H, I, "none", torch.float32, list(range(E)))
    a = ExpertWeights(torch.tensor([0, 2, 4]), full.gate[[0, 2, 4]], full.up[[0, 2, 4]], full.down[[0, 2, 4]])
    b = ExpertWeights(torch.tensor([1, 3, 5]), full.gate[[1, 3, 5]], full.up[[1, 3, 5]], full.down[[1, 3, 5]])
    x = rnd(4, H, seed=15).float()
    ids = torch.tensor([[0, 1], [2, 5], [4, 3], [1, 0]])
    wts = torch.rand(4, K, generator=torch.Generator().manual_seed(16))
    args = [on(backend, t) for t in (x, ids, wts)]
    whole = backend.moe_experts(*args, experts_on(backend, full))
    parts = backend.moe_experts(*args, experts_on(backend, a)) + backend.moe_experts(*args, experts_on(backend, b))
    assert rel_err(parts, whole) <= 1e-6


# ---------------------------------------------------------------- paged attention
def paged(backend, dtype, lens, Hkv, D, block_size=4, seed=20):
    """Random per-sequence K/V written into a shuffled paged cache by plain indexing."""
    n_blocks = sum((L + block_size - 1) // block_size for L in lens) + 3
    k_cache = torch.zeros(n_blocks, block_size, Hkv, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    max_blocks = max((L + block_size - 1) // block_size for L in lens)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    ks, vs = [], []
    for b, L in enumerate(lens):
        k = rnd(L, Hkv, D, seed=seed + 2 * b + 1).to(dtype)
        v = rnd(L, Hkv, D, seed=seed + 2 * b + 2).to(dtype)
        for j in range((L + block_size - 1) // block_size):
            blk = perm.pop()
            tables[b, j] = blk
            chunk = slice(j * block_size, min((j + 1) * block_size, L))
            k_cache[blk, : chunk.stop - chunk.start] = k[chunk]
            v_cache[blk, : chunk.stop - chunk.start] = v[chunk]
        ks.append(k)
        vs.append(v)
    return on(backend, k_cache), on(backend, v_cache), on(backend, tables), ks, vs


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("window,chunk", [(None, None), (5, None), (None, 8)], ids=["causal", "window", "chunk"])
def test_attention_prefill(backend, dtype, Hq, Hkv, window, chunk):
    need(backend, Op.ATTENTION_PREFILL, dtype)
    D, lens, new = 16, [13, 7, 20], [13, 3, 6]  # seq 0 fresh, 1 and 2 continue a cached prefix
    kc, vc, tables, ks, vs = paged(backend, dtype, lens, Hkv, D)
    q = rnd(sum(new), Hq, D, seed=30).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    scale = D ** -0.5
    out = backend.attention_prefill(on(backend, q), kc, vc, tables, on(backend, torch.tensor(lens, dtype=torch.int32)),
                                    on(backend, qsl), scale, causal=True, sliding_window=window, chunk=chunk)
    expected = torch.cat([ref.attention(q[qsl[b]:qsl[b + 1]], ks[b], vs[b], scale, True, window, chunk=chunk)
                          for b in range(len(lens))])
    check("attention_prefill", dtype, out, expected)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("window,chunk", [(None, None), (6, None), (None, 5)], ids=["causal", "window", "chunk"])
def test_attention_decode(backend, dtype, Hq, Hkv, window, chunk):
    need(backend, Op.ATTENTION_DECODE, dtype)
    D, lens = 16, [1, 9, 17]
    kc, vc, tables, ks, vs = paged(backend, dtype, lens, Hkv, D, seed=40)
    q = rnd(len(lens), Hq, D, seed=41).to(dtype)
    scale = D ** -0.5
    out = backend.attention_decode(on(backend, q), kc, vc, tables, on(backend, torch.tensor(lens, dtype=torch.int32)),
                                   scale, sliding_window=window, chunk=chunk)
    expected = torch.cat([ref.attention(q[b:b + 1], ks[b], vs[b], scale, True, window, chunk=chunk)
                          for b in range(len(lens))])
    check("attention_decode", dtype, out, expected)


# ---------------------------------------------------------------- cache ops (exact)
def test_write_kv(backend, dtype):
    need(backend, Op.WRITE_KV, dtype)
    nb, bs, H, D = 6, 4, 2, 8
    kc = on(backend, torch.zeros(nb, bs, H, D, dtype=dtype))
    vc = on(backend, torch.zeros(nb, bs, H, D, dtype=dtype))
    k, v = rnd(5, H, D, seed=50).to(dtype), rnd(5, H, D, seed=51).to(dtype)
    slots = torch.tensor([3, 17, -1, 8, 22])  # -1 is padding: skipped
    backend.write_kv(on(backend, k), on(backend, v), kc, vc, on(backend, slots))
    kc, vc = kc.cpu(), vc.cpu()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kc[s // bs, s % bs], k[t]) and torch.equal(vc[s // bs, s % bs], v[t])
    assert int((kc != 0).any(-1).any(-1).sum()) == 4  # nothing else written


def test_copy_blocks(backend, dtype):
    need(backend, Op.COPY_BLOCKS, dtype)
    a = rnd(6, 4, 2, 8, seed=52).to(dtype)
    b = rnd(6, 4, 2, 8, seed=53).to(dtype)
    da, db = on(backend, a.clone()), on(backend, b.clone())
    backend.copy_blocks([da, db], on(backend, torch.tensor([[0, 3], [5, 1]])))
    for src, dst in ((a, da), (b, db)):
        want = src.clone()
        want[3], want[1] = src[0], src[5]
        assert torch.equal(dst.cpu(), want)


def test_swap_blocks(backend, dtype):
    need(backend, Op.SWAP_BLOCKS, dtype)
    dev = on(backend, rnd(5, 4, 2, 8, seed=54).to(dtype))
    host = backend.host_buffer((3, 4, 2, 8), dtype)
    host.zero_()
    backend.swap_blocks(dev, host, torch.tensor([[4, 0], [1, 2]]))  # device -> host
    backend.synchronize(0)
    assert torch.equal(host[0], dev[4].cpu()) and torch.equal(host[2], dev[1].cpu()) and not host[1].any()
    back = on(backend, torch.zeros(5, 4, 2, 8, dtype=dtype))
    backend.swap_blocks(host, back, torch.tensor([[2, 3]]))  # host -> device
    backend.synchronize(0)
    assert torch.equal(back[3].cpu(), dev[1].cpu())


# ---------------------------------------------------------------- small ops
def test_rmsnorm(backend, dtype):
    need(backend, Op.RMSNORM, dtype)
    x, w = rnd(6, 96, scale=3, seed=60).to(dtype), rnd(96, seed=61).to(dtype)
    out = backend.rmsnorm(on(backend, x), on(backend, w), 1e-6)
    assert out.dtype == dtype
    check("rmsnorm", dtype, out, ref.rmsnorm(x, w, 1e-6))


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rot", [32, 16], ids=["full", "partial"])
def test_rope(backend, dtype, interleaved, rot):
    need(backend, Op.ROPE, dtype)
    D, base = 32, 10000.0
    q, k = rnd(5, 4, D, seed=62).to(dtype), rnd(5, 2, D, seed=63).to(dtype)
    pos = torch.tensor([0, 1, 7, 100, 511])
    table = rope_cos_sin(rot, 512, base)
    oq, ok = backend.rope(on(backend, q), on(backend, k), on(backend, pos), on(backend, table), interleaved)
    theta = [base ** (-2 * i / rot) for i in range(rot // 2)]
    check("rope", dtype, oq, ref.rope(q, pos, theta, rot, interleaved))
    check("rope", dtype, ok, ref.rope(k, pos, theta, rot, interleaved))


ROUTERS = {
    "mixtral": dict(top_k=2, scoring="softmax", renorm=True, n_group=1, topk_group=1, bias=False, scale=1.0),
    "qwen2moe": dict(top_k=4, scoring="softmax", renorm=False, n_group=1, topk_group=1, bias=False, scale=1.0),
    "deepseek_v2": dict(top_k=6, scoring="softmax", renorm=False, n_group=4, topk_group=2, bias=False, scale=16.0),
    "deepseek_v3": dict(top_k=8, scoring="sigmoid", renorm=True, n_group=8, topk_group=4, bias=True, scale=2.5),
    "gpt_oss": dict(top_k=4, scoring="softmax_topk", renorm=True, n_group=1, topk_group=1, bias=False, scale=1.0),
}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_route(backend, dtype, router):
    need(backend, Op.ROUTE, dtype)
    c = ROUTERS[router]
    E = 32
    logits = rnd(9, E, scale=2, seed=70).to(dtype)
    bias = rnd(E, scale=0.1, seed=71).float() if c["bias"] else None
    w, ids = backend.route(on(backend, logits), c["top_k"], c["scoring"], c["renorm"], c["n_group"],
                           c["topk_group"], None if bias is None else on(backend, bias), c["scale"])
    ew, eids = ref.route(logits, c["top_k"], c["scoring"], c["renorm"], c["n_group"], c["topk_group"],
                         bias, c["scale"])
    assert w.dtype == torch.float32 and ids.shape == eids.shape
    order = ids.cpu().argsort(-1)  # same set of experts, compare in expert order
    eorder = eids.argsort(-1)
    assert torch.equal(ids.cpu().gather(1, order), eids.gather(1, eorder))
    check("route", dtype, w.cpu().gather(1, order), ew.gather(1, eorder))


SAMPLING = [  # temperature, top_k, top_p, min_p per row
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
    (0.9, 10, 0.9, 0.05), (0.0, 0, 1.0, 0.0),
]


def _sampling_args(backend, dtype, rows=SAMPLING):
    cols = list(zip(*rows))
    t = [on(backend, torch.tensor(c, dtype=dt)) for c, dt in
         zip(cols, (torch.float32, torch.long, torch.float32, torch.float32))]
    return t


def test_sampling_probs(backend, dtype):
    need(backend, Op.SAMPLE, dtype)
    logits = rnd(len(SAMPLING), 50, scale=2, seed=80).to(dtype)
    args = _sampling_args(backend, dtype)
    probs = backend.sampling_probs(on(backend, logits), *args)
    expected = ref.sampling_probs(logits, *[a.cpu() for a in args])
    err = float((probs.cpu().double() - expected).abs().max())
    assert err <= TOLERANCE["sampling_probs"][dtype], f"sampling_probs max abs error {err:.3g}"


def test_sample_greedy_seeded_and_distribution(backend):
    need(backend, Op.SAMPLE, torch.float32)
    V = 12
    logits = on(backend, rnd(1, V, seed=81).float().repeat(4000, 1))
    rows = [(1.0, 0, 0.9, 0.0)] * 4000
    args = _sampling_args(backend, torch.float32, rows)
    gen = lambda: torch.Generator(device=backend.torch_device(0)).manual_seed(5)  # noqa: E731
    a = backend.sample(logits, *args, generator=gen())
    b = backend.sample(logits, *args, generator=gen())
    assert torch.equal(a, b), "same seed must give the same tokens"
    probs = backend.sampling_probs(logits[:1], *[x[:1] for x in args])[0].cpu().double()
    freq = torch.bincount(a.cpu(), minlength=V).double() / a.numel()
    tv = 0.5 * float((freq - probs).abs().sum())
    assert tv < 0.05, f"empirical distribution is {tv:.3f} (total variation) away from sampling_probs"
    assert not bool(freq[probs == 0].any()), "sampled a token that top-p removed"
    greedy = _sampling_args(backend, torch.float32, [(0.0, 0, 1.0, 0.0)] * 3)
    lg = on(backend, rnd(3, V, seed=82).float())
    assert torch.equal(backend.sample(lg, *greedy).cpu(), lg.argmax(-1).cpu())


def test_attention_with_sinks(backend, dtype):
    need(backend, Op.ATTENTION_PREFILL, dtype)
    Hq, Hkv, D, lens, new = 4, 2, 16, [9, 12], [9, 1]
    kc, vc, tables, ks, vs = paged(backend, dtype, lens, Hkv, D, seed=90)
    sinks = rnd(Hq, seed=91).float()
    q = rnd(sum(new), Hq, D, seed=92).to(dtype)
    qsl = torch.tensor([0, 9, 10], dtype=torch.int32)
    sl = on(backend, torch.tensor(lens, dtype=torch.int32))
    out = backend.attention_prefill(on(backend, q), kc, vc, tables, sl, on(backend, qsl), D ** -0.5,
                                    sliding_window=4, sinks=on(backend, sinks))
    expected = torch.cat([ref.attention(q[qsl[b]:qsl[b + 1]], ks[b], vs[b], D ** -0.5, True, 4, sinks)
                          for b in range(2)])
    check("attention_prefill", dtype, out, expected)
    dec = backend.attention_decode(on(backend, q[9:10].repeat(2, 1, 1)), kc, vc, tables, sl, D ** -0.5,
                                   sinks=on(backend, sinks))
    expected = torch.cat([ref.attention(q[9:10], ks[b], vs[b], D ** -0.5, True, None, sinks) for b in range(2)])
    check("attention_decode", dtype, dec, expected)


def test_attention_mla(backend, dtype):
    need(backend, Op.ATTENTION_MLA, dtype)
    H, dn, dr, dv, lora, bs = 4, 16, 8, 12, 24, 4
    lens, new = [11, 6], [11, 2]
    nb = 8
    cache = torch.zeros(nb, bs, 1, lora + dr, dtype=dtype)
    tables = torch.tensor([[5, 2, 7], [0, 3, 0]], dtype=torch.int32)
    lat = [rnd(L, lora + dr, seed=100 + b).to(dtype) for b, L in enumerate(lens)]
    for b, L in enumerate(lens):
        for p in range(L):
            cache[tables[b, p // bs], p % bs, 0] = lat[b][p]
    w_uk, w_uv = rnd(H, dn, lora, scale=0.2, seed=110).to(dtype), rnd(H, dv, lora, scale=0.2, seed=111).to(dtype)
    q_nope, q_pe = rnd(sum(new), H, dn, seed=112).to(dtype), rnd(sum(new), H, dr, seed=113).to(dtype)
    qsl = torch.tensor([0, 11, 13], dtype=torch.int32)
    scale = (dn + dr) ** -0.5
    out = backend.attention_mla(on(backend, q_nope), on(backend, q_pe), on(backend, cache), on(backend, w_uk),
                                on(backend, w_uv), on(backend, tables), on(backend, torch.tensor(lens, dtype=torch.int32)),
                                on(backend, qsl), scale)
    expected = torch.cat([ref.mla(q_nope[qsl[b]:qsl[b + 1]], q_pe[qsl[b]:qsl[b + 1]], lat[b][:, :lora],
                                  lat[b][:, lora:], w_uk, w_uv, scale) for b in range(2)])
    check("attention_mla", dtype, out, expected)


def test_write_latent(backend, dtype):
    need(backend, Op.WRITE_KV, dtype)
    cache = on(backend, torch.zeros(3, 4, 1, 10, dtype=dtype))
    lat = rnd(2, 1, 10, seed=120).to(dtype)
    backend.write_kv(on(backend, lat), None, cache, None, on(backend, torch.tensor([5, 0])))
    assert torch.equal(cache[1, 1].cpu(), lat[0]) and torch.equal(cache[0, 0].cpu(), lat[1])
