"""The decode step's native ops (kt_backends.cpu.native_ops: attention over the paged KV cache,
rmsnorm, rope) against their torch references (kt_core.backend.torch_ops), on every kernel variant
this CPU runs; the CPU backend's routing to them; and what the Python wrappers and the C ABI refuse."""
import ctypes
import math

import pytest
import torch

from kt_backends.cpu import native, native_ops
from kt_backends.cpu.backend import CpuBackend
from kt_backends.cpu.native_abi import _AttnDecodeArgs, _RmsNormArgs, _RopeArgs
from kt_core.backend.torch_ops import attention as torch_attention
from kt_core.backend.torch_ops import norm_rope as torch_norm_rope

pytestmark = pytest.mark.skipif(not native_ops.available(),
                                reason=f"native CPU kernels: {native_ops.why_unavailable()}")

VARIANTS = list(native.VARIANTS)
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Each kernel variant in turn (the ones this CPU lacks skip); the default restored after."""
    if request.param not in native.supported_variants():
        pytest.skip(f"this CPU (and build) cannot run the {request.param} kernels")
    best = native.variant()
    native.set_variant(request.param)
    yield request.param
    native.set_variant(best)


class threads:
    """Run a block with n threads in pool 0, then restore."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = native.threads()
        native.set_threads(self.n)

    def __exit__(self, *exc):
        native.set_threads(self.before)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at |x| (2^-7 of its power of two)."""
    x = x.float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, rel32: float = 2e-6):
    """float32: max error within rel32 of the output's magnitude; bf16: each element within one bf16
    ulp of the reference (both round a float32 result that differs only by summation order; near
    zero, cancellation makes that float32 difference count, hence the small absolute term)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    scale = r.abs().max().clamp_min(1e-30)
    if out.dtype == F32:
        err = float((o - r).abs().max() / scale)
        assert err <= rel32, f"{what}: relative error {err:.3g} > {rel32:.3g}"
    else:
        bound = bf16_ulp(r).double() + 1e-5 * scale
        bad = (o - r).abs() > bound
        assert not bad.any(), (f"{what}: {int(bad.sum())} bf16 elements more than one ulp off, e.g. "
                               f"{float(o[bad][0])} vs {float(r[bad][0])}")


# ---------------------------------------------------------------- attention_decode
def paged(lens, Hkv, D, bs, dtype, seed=0, pad_blocks=3, scale=1.0):
    """Caches [num_blocks, bs, Hkv, D] holding len tokens per sequence in shuffled blocks, and the
    block table (int32, unused entries 0) and seq_lens (int32)."""
    g = torch.Generator().manual_seed(seed)
    per = [(L + bs - 1) // bs for L in lens]
    nb = sum(per) + pad_blocks
    k = (torch.randn(nb, bs, Hkv, D, generator=g) * scale).to(dtype)
    v = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    order = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), max(per) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(per):
        table[b, :n] = order[used:used + n].to(torch.int32)
        used += n
    return k, v, table, torch.tensor(lens, dtype=torch.int32)


def query(B, Hq, D, dtype, seed=1, scale=1.0):
    return (torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


LENS = [1, 5, 37, 300]
MASKS = [(None, None, False), (7, None, False), (64, None, True), (None, 32, False), (None, 16, True),
         (300, 20, True)]  # (sliding_window, chunk, sinks)


@pytest.mark.parametrize("D", [64, 128, 96, 40, 36])
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_attention_decode_matches_reference(variant, dtype, ratio, D):
    """GQA groups of 1..8 query heads, head dims with a tail after the 16-wide blocks (40), not a
    multiple of 8 (36: the scalar path) and the usual ones; block sizes 16 and 32; sequences of
    1, 5, 37 and 300 tokens in one batch; windows, chunks and sinks."""
    Hkv = 2
    Hq = ratio * Hkv
    for bs in (16, 32):
        k, v, table, lens = paged(LENS, Hkv, D, bs, dtype, seed=D + bs)
        q = query(len(LENS), Hq, D, dtype, seed=ratio)
        sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(5)) * 2
        for window, chunk, with_sinks in MASKS:
            kw = dict(sliding_window=window, chunk=chunk, sinks=sinks if with_sinks else None)
            ref = torch_attention.attention_decode(q, k, v, table, lens, D ** -0.5, **kw)
            out = native_ops.attention_decode(q, k, v, table, lens, D ** -0.5, **kw)
            assert_close(out, ref, f"{variant} bs={bs} window={window} chunk={chunk} sinks={with_sinks}")


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_attention_decode_long_contexts_on_the_pool(variant, dtype):
    """Enough work for the thread pool, each context split into runs merged by log-sum-exp (three
    threads: runs that do not divide the contexts evenly), with a window longer than a run, chunks
    and sinks; peaked scores (a large q) so the per-run maxima differ."""
    lens = [1, 900, 2500, 4100]
    Hkv, Hq, D = 2, 8, 64
    k, v, table, sl = paged(lens, Hkv, D, 32, dtype, seed=11)
    q = query(len(lens), Hq, D, dtype, seed=12, scale=3.0)
    sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(13))
    with threads(3):
        for window, chunk, with_sinks in [(None, None, False), (1500, None, True), (None, 1024, True)]:
            kw = dict(sliding_window=window, chunk=chunk, sinks=sinks if with_sinks else None)
            ref = torch_attention.attention_decode(q, k, v, table, sl, D ** -0.5, **kw)
            out = native_ops.attention_decode(q, k, v, table, sl, D ** -0.5, **kw)
            assert_close(out, ref, f"{variant} window={window} chunk={chunk} sinks={with_sinks}")
        one = native_ops.attention_decode(q, k, v, table, sl, D ** -0.5)
        assert torch.equal(one, native_ops.attention_decode(q, k, v, table, sl, D ** -0.5)), "same call, same bits"


def test_attention_decode_mixed_dtypes_and_index_types():
    """float32 q over a bf16 cache (and back), int64 block tables and seq_lens, a strided q."""
    k, v, table, lens = paged(LENS, 2, 64, 16, BF16, seed=3)
    q = query(len(LENS), 8, 64, F32, seed=4)
    ref = torch_attention.attention_decode(q, k, v, table, lens, 0.125)
    assert_close(native_ops.attention_decode(q, k, v, table.long(), lens.long(), 0.125), ref, "f32 q, bf16 cache")
    wide = torch.zeros(len(LENS), 8, 128)
    wide[..., ::2] = q
    assert_close(native_ops.attention_decode(wide[..., ::2], k, v, table, lens, 0.125), ref, "strided q")
    qb = q.bfloat16()
    ref = torch_attention.attention_decode(qb, k.float(), v.float(), table, lens, 0.125)
    assert_close(native_ops.attention_decode(qb, k.float(), v.float(), table, lens, 0.125), ref, "bf16 q, f32 cache")
    assert native_ops.attention_decode(q[:0], k, v, table[:0], lens[:0], 0.125).shape == (0, 8, 64)


def test_attention_decode_reads_the_cache_in_place():
    """A write to the cache after the call shows in the next call: nothing was copied or cached."""
    k, v, table, lens = paged([20], 1, 64, 16, F32, seed=8)
    q = query(1, 2, 64, F32, seed=9)
    before = native_ops.attention_decode(q, k, v, table, lens, 0.125)
    v[table[0, 1], 3] += 1.0  # position 19
    after = native_ops.attention_decode(q, k, v, table, lens, 0.125)
    assert not torch.equal(before, after)
    assert_close(after, torch_attention.attention_decode(q, k, v, table, lens, 0.125), "after the write")


def test_attention_decode_only_reads_the_visible_blocks():
    """Entries of the block table past a sequence's blocks (or before its window) are never read:
    padding may hold anything, -1 included."""
    k, v, table, lens = paged([40, 3], 2, 64, 16, BF16, seed=10)
    q = query(2, 4, 64, BF16, seed=11)
    ref = native_ops.attention_decode(q, k, v, table, lens, 0.125)
    padded = table.clone()
    padded[1, 1:] = -1
    padded[0, 3:] = 10 ** 6
    assert torch.equal(native_ops.attention_decode(q, k, v, padded, lens, 0.125), ref)
    windowed = table.clone()
    windowed[0, 0] = -1  # positions 0..15: outside a window of 8 at len 40
    ref = native_ops.attention_decode(q, k, v, table, lens, 0.125, sliding_window=8)
    assert torch.equal(native_ops.attention_decode(q, k, v, windowed, lens, 0.125, sliding_window=8), ref)
    with pytest.raises(ValueError, match="out of range"):
        native_ops.attention_decode(q, k, v, windowed, lens, 0.125)


# ---------------------------------------------------------------- rmsnorm
@pytest.mark.parametrize("shape", [(1, 256), (7, 96), (3, 4, 40), (5, 33), (2, 4096), (300, 1024)])
@pytest.mark.parametrize("xdt,wdt", [(BF16, BF16), (F32, F32), (F32, BF16), (BF16, F32)],
                         ids=["bf16", "f32", "f32-x-bf16-w", "bf16-x-f32-w"])
def test_rmsnorm_matches_reference(variant, shape, xdt, wdt):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(xdt)
    w = torch.randn(shape[-1], generator=g).to(wdt)
    for eps in (1e-6, 0.5):
        ref = torch_norm_rope.rmsnorm(x, w, eps)
        assert_close(native_ops.rmsnorm(x, w, eps), ref, f"{variant} {shape} eps={eps}", rel32=2e-6)
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # a non-contiguous view of the same values
    assert_close(native_ops.rmsnorm(xt, w, 1e-6), torch_norm_rope.rmsnorm(x, w, 1e-6), "strided x", rel32=2e-6)


def test_rmsnorm_and_rope_on_the_pool(variant):
    """Prefill-sized calls go to the thread pool (three threads): the same results."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(700, 512, generator=g).bfloat16(), torch.randn(512, generator=g).bfloat16()
    q, k = torch.randn(600, 8, 64, generator=g).bfloat16(), torch.randn(600, 2, 64, generator=g).bfloat16()
    pos, table = torch.randint(0, 4096, (600,), generator=g), torch_norm_rope.rope_cos_sin(64, 4096)
    with threads(3):
        assert_close(native_ops.rmsnorm(x, w, 1e-6), torch_norm_rope.rmsnorm(x, w, 1e-6), variant)
        for a, b in zip(native_ops.rope(q, k, pos, table, True), torch_norm_rope.rope(q, k, pos, table, True)):
            assert torch.equal(a, b)


def test_rmsnorm_of_no_rows():
    assert native_ops.rmsnorm(torch.zeros(0, 64), torch.ones(64), 1e-6).shape == (0, 64)


# ---------------------------------------------------------------- rope
@pytest.mark.parametrize("D,rot", [(64, 64), (128, 64), (36, 36), (36, 20), (96, 32), (40, 40)])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_rope_matches_reference_exactly(variant, dtype, interleaved, D, rot):
    """The reference's own float32 operations, each product rounded (no fused multiply-add): the
    same bits, full and partial rotary, head dims with scalar tails."""
    g = torch.Generator().manual_seed(D + rot)
    table = torch_norm_rope.rope_cos_sin(rot, 600, base=10000.0)
    for T in (1, 9):
        q = torch.randn(T, 4, D, generator=g).to(dtype)
        k = torch.randn(T, 2, D, generator=g).to(dtype)
        pos = torch.randint(0, 600, (T,), generator=g)
        rq, rk = torch_norm_rope.rope(q, k, pos, table, interleaved)
        oq, ok = native_ops.rope(q, k, pos, table, interleaved)
        assert oq.dtype == dtype and ok.dtype == dtype
        assert torch.equal(oq, rq) and torch.equal(ok, rk), f"{variant} T={T}"


def test_rope_strided_views_and_int32_positions():
    """q and k as views of a fused projection (token stride past the heads), positions int32."""
    g = torch.Generator().manual_seed(3)
    T, Hq, Hk, D = 5, 4, 2, 64
    fused = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).bfloat16()
    q = fused[:, : Hq * D].view(T, Hq, D)
    k = fused[:, Hq * D: (Hq + Hk) * D].view(T, Hk, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    table = torch_norm_rope.rope_cos_sin(64, 100)
    pos = torch.tensor([0, 3, 99, 50, 7], dtype=torch.int32)
    rq, rk = torch_norm_rope.rope(q, k, pos, table, False)
    oq, ok = native_ops.rope(q, k, pos, table, False)
    assert torch.equal(oq, rq) and torch.equal(ok, rk) and oq.is_contiguous()
    assert native_ops.rope(q[:0], k[:0], pos[:0], table)[0].shape == (0, Hq, D)


# ---------------------------------------------------------------- the CPU backend's routing
def test_cpu_backend_uses_the_native_ops_and_falls_back():
    be = CpuBackend()
    k, v, table, lens = paged([9, 33], 2, 64, 16, BF16, seed=20)
    q = query(2, 4, 64, BF16, seed=21)
    sinks = torch.randn(4)
    assert torch.equal(be.attention_decode(q, k, v, table, lens, 0.125, 8, sinks, None),
                       native_ops.attention_decode(q, k, v, table, lens, 0.125, 8, sinks, None))
    # float16 is not the kernels': the torch reference answers
    q16, k16, v16 = q.half(), k.half(), v.half()
    assert native_ops.try_attention_decode(q16, k16, v16, table, lens, 0.125) is None
    assert torch.equal(be.attention_decode(q16, k16, v16, table, lens, 0.125),
                       torch_attention.attention_decode(q16, k16, v16, table, lens, 0.125))
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(64).bfloat16()
    assert torch.equal(be.rmsnorm(x, w, 1e-6), native_ops.rmsnorm(x, w, 1e-6))
    assert torch.equal(be.rmsnorm(x.half(), w.half(), 1e-6), torch_norm_rope.rmsnorm(x.half(), w.half(), 1e-6))
    table64 = torch_norm_rope.rope_cos_sin(64, 50)
    pos = torch.tensor([1, 2, 3])
    qq, kk = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    for a, b in zip(be.rope(qq, kk, pos, table64), native_ops.rope(qq, kk, pos, table64)):
        assert torch.equal(a, b)
    for a, b in zip(be.rope(qq, kk, pos, table64.double()), torch_norm_rope.rope(qq, kk, pos, table64.double())):
        assert torch.equal(a, b)  # a float64 table: the reference's
    # a degenerate window is the reference's business (it gives NaN); the kernels refuse it
    assert native_ops.try_attention_decode(q, k, v, table, lens, 0.125, sliding_window=0) is None


# ---------------------------------------------------------------- what the wrappers refuse
def test_wrappers_refuse_what_the_kernels_do_not_take():
    k, v, table, lens = paged([9, 33], 2, 64, 16, BF16, seed=30)
    q = query(2, 4, 64, BF16, seed=31)
    ad = native_ops.attention_decode
    with pytest.raises(ValueError, match="q is on meta"):
        ad(q.to("meta"), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ad(q.half(), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="both be float32 or both bfloat16"):
        ad(q, k.half(), v.half(), table, lens, 0.125)
    with pytest.raises(ValueError, match="both be"):
        ad(q, k, v[:, :, :1], table, lens, 0.125)
    with pytest.raises(ValueError, match="contiguous"):
        ad(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, table, lens, 0.125)
    with pytest.raises(ValueError, match="not a multiple of the caches' 2 kv heads"):
        ad(query(2, 3, 64, BF16), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="head_dim 32, the caches 64"):
        ad(query(2, 4, 32, BF16), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="block_tables must be integer"):
        ad(q, k, v, table.float(), lens, 0.125)
    with pytest.raises(ValueError, match="seq_lens must be integer"):
        ad(q, k, v, table, lens[:1], 0.125)
    with pytest.raises(ValueError, match="sinks must be"):
        ad(q, k, v, table, lens, 0.125, sinks=torch.zeros(3))
    for bad in (0, -4, 2.5, "8", True):
        with pytest.raises(ValueError, match="sliding_window must be None or a positive integer"):
            ad(q, k, v, table, lens, 0.125, sliding_window=bad)
        with pytest.raises(ValueError, match="chunk must be None or a positive integer"):
            ad(q, k, v, table, lens, 0.125, chunk=bad)
        assert native_ops.try_attention_decode(q, k, v, table, lens, 0.125, chunk=bad) is None
    with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
        ad(q, k, v, table, lens, 0.125, pool=64)
    # what only the library can see: the values in the index tensors
    for t, sl, what in [(table.masked_fill(table == table[1, 2], k.shape[0]), lens, "block id = num_blocks"),
                        (table.masked_fill(table == table[0, 0], -1), lens, "block id -1"),
                        (table, torch.tensor([9, 0], dtype=torch.int32), "seq_len 0"),
                        (table, torch.tensor([9, table.shape[1] * 16 + 1], dtype=torch.int32), "seq_len > table"),
                        (table.long() + 2 ** 32, lens, "int64 block ids past int32"),
                        (table, lens.long() - 2 ** 32, "int64 seq_len wrapping to valid")]:
        with pytest.raises(ValueError, match="native attention_decode: a value read from an index tensor is out of range"):
            ad(q, k, v, t, sl, 0.125)
        with pytest.raises(ValueError, match="out of range"):
            native_ops.try_attention_decode(q, k, v, t, sl, 0.125)

    x, w = torch.randn(3, 64), torch.randn(64)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native_ops.rmsnorm(x.half(), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        native_ops.rmsnorm(x, w[:32], 1e-6)
    with pytest.raises(ValueError, match="is on meta"):
        native_ops.rmsnorm(x.to("meta"), w, 1e-6)
    assert native_ops.try_rmsnorm(x.double(), w, 1e-6) is None

    table64 = torch_norm_rope.rope_cos_sin(64, 50)
    qq, kk = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    pos = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="rot_dim 66 must be even and in 2..head_dim"):
        native_ops.rope(qq, kk, pos, torch_norm_rope.rope_cos_sin(66, 50))
    with pytest.raises(ValueError, match="positions must be integer"):
        native_ops.rope(qq, kk, pos.float(), table64)
    with pytest.raises(ValueError, match="same tokens and head_dim"):
        native_ops.rope(qq, kk[:2], pos, table64)
    with pytest.raises(ValueError, match="cos_sin must be a float32 table"):
        native_ops.rope(qq, kk, pos, table64.double())
    for bad in (torch.tensor([1, 50, 3]), torch.tensor([0, -1, 3])):
        with pytest.raises(ValueError, match="native rope: a value read from an index tensor is out of range"):
            native_ops.rope(qq, kk, bad, table64)


def test_huge_windows_and_a_missing_library(monkeypatch):
    k, v, table, lens = paged([9, 33], 2, 64, 16, F32, seed=32)
    q = query(2, 4, 64, F32, seed=33)
    ref = native_ops.attention_decode(q, k, v, table, lens, 0.125)
    # a window or chunk past any context is none
    assert torch.equal(native_ops.attention_decode(q, k, v, table, lens, 0.125, sliding_window=2 ** 70, chunk=2 ** 64), ref)
    monkeypatch.setattr(native_ops, "_ops", None)
    monkeypatch.setattr(native_ops, "_ops_why", "native CPU kernels unavailable: disabled by the test")
    assert native_ops.try_attention_decode(q, k, v, table, lens, 0.125) is None
    assert native_ops.try_rope(q[None, 0], q[None, 0], torch.tensor([0]), torch.ones(4, 64)) is None
    with pytest.raises(RuntimeError, match="disabled by the test"):
        native_ops.rmsnorm(torch.ones(2, 8), torch.ones(8), 1e-6)
    be = CpuBackend()  # the torch reference answers
    assert_close(be.attention_decode(q, k, v, table, lens, 0.125),
                 torch_attention.attention_decode(q, k, v, table, lens, 0.125), "fallback")


# ---------------------------------------------------------------- the C ABI checks its arguments
def lib():
    return native_ops._need()


def raw_attention(**override):
    """A valid kt_attention_decode argument block (and the tensors it points to), fields overridden."""
    k, v, table, lens = paged([9, 33], 2, 64, 16, BF16, seed=40)
    q, out = query(2, 4, 64, BF16, seed=41), torch.empty(2, 4, 64, dtype=BF16)
    keep = [k, v, table, lens, q, out]
    fields = dict(B=2, Hq=4, Hkv=2, D=64, num_blocks=k.shape[0], block_size=16, max_blocks=table.shape[1], window=0,
                  chunk=0, scale=0.125, q_dtype=1, kv_dtype=1, pool=0, q=q.data_ptr(), k_cache=k.data_ptr(),
                  v_cache=v.data_ptr(), block_tables=table.data_ptr(), seq_lens=lens.data_ptr(), sinks=None,
                  out=out.data_ptr())
    for name, value in override.items():
        if isinstance(value, torch.Tensor):
            keep.append(value)
            value = value.data_ptr()
        fields[name] = value
    return _AttnDecodeArgs(**fields), keep, table


@pytest.mark.parametrize("override,code", [
    (dict(q_dtype=2), -3), (dict(kv_dtype=-1), -3), (dict(pool=64), -2), (dict(pool=-1), -2),
    (dict(B=-1), -5), (dict(Hq=0), -5), (dict(Hkv=3), -5), (dict(Hkv=8), -5), (dict(D=0), -5), (dict(D=4097), -5),
    (dict(num_blocks=0), -5), (dict(block_size=-16), -5), (dict(max_blocks=0), -5), (dict(window=-1), -5),
    (dict(chunk=-2), -5), (dict(max_blocks=1 << 20, block_size=1 << 10), -5), (dict(num_blocks=1 << 25), -5),
    (dict(q=None), -6), (dict(k_cache=None), -6), (dict(v_cache=None), -6), (dict(block_tables=None), -6),
    (dict(seq_lens=None), -6), (dict(out=None), -6),
    (dict(seq_lens=torch.tensor([9, 0], dtype=torch.int32)), -13),
    (dict(seq_lens=torch.tensor([-5, 9], dtype=torch.int32)), -13),
    (dict(seq_lens=torch.tensor([9, 4 * 16 + 1], dtype=torch.int32)), -13),  # max_blocks = 4 blocks of 16
    (dict(num_blocks=2), -13),  # the table names blocks past the first two
])
def test_attention_decode_abi_rejects_what_it_cannot_trust(override, code):
    args, keep, table = raw_attention(**override)
    assert table.shape[1] == 4
    assert lib().kt_attention_decode(ctypes.byref(args)) == code


def test_attention_decode_abi_checks_every_block_id_it_reads():
    for bad in (-1, 2 ** 31 - 1):
        args, keep, table = raw_attention()
        table[1, 2] = bad  # sequence 1 (33 tokens) reads blocks 0, 1, 2
        assert lib().kt_attention_decode(ctypes.byref(args)) == -13
        table[1, 2] = 0
        assert lib().kt_attention_decode(ctypes.byref(args)) == 0
    args, keep, table = raw_attention(B=0, q=None, out=None, seq_lens=None)
    assert lib().kt_attention_decode(ctypes.byref(args)) == 0  # nothing to do, nothing read
    assert lib().kt_attention_decode(None) == -6


def test_rmsnorm_and_rope_abi_reject_what_they_cannot_trust():
    x, w, out = torch.randn(3, 64), torch.randn(64), torch.empty(3, 64)
    ok = dict(rows=3, D=64, eps=1e-6, x_dtype=0, w_dtype=0, pool=0, x=x.data_ptr(), w=w.data_ptr(), out=out.data_ptr())
    assert lib().kt_rmsnorm(ctypes.byref(_RmsNormArgs(**ok))) == 0
    for override, code in [(dict(D=0), -5), (dict(rows=-1), -5), (dict(D=1 << 25), -5), (dict(rows=1 << 40), -5),
                           (dict(x_dtype=2), -3), (dict(w_dtype=7), -3), (dict(pool=99), -2), (dict(x=None), -6),
                           (dict(w=None), -6), (dict(out=None), -6)]:
        assert lib().kt_rmsnorm(ctypes.byref(_RmsNormArgs(**{**ok, **override}))) == code, override
    assert lib().kt_rmsnorm(None) == -6

    q, k, qo, ko = torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.empty(2, 4, 64), torch.empty(2, 2, 64)
    pos, table = torch.tensor([0, 9]), torch_norm_rope.rope_cos_sin(64, 10)
    ok = dict(T=2, Hq=4, Hk=2, D=64, rot=64, table_rows=10, q_stride_t=256, q_stride_h=64, k_stride_t=128,
              k_stride_h=64, q_dtype=0, k_dtype=0, interleaved=0, pool=0, q=q.data_ptr(), k=k.data_ptr(),
              positions=pos.data_ptr(), cos_sin=table.data_ptr(), q_out=qo.data_ptr(), k_out=ko.data_ptr())
    assert lib().kt_rope(ctypes.byref(_RopeArgs(**ok))) == 0
    bad_pos, neg_pos = torch.tensor([0, 10]), torch.tensor([-1, 0])
    for override, code in [(dict(rot=65), -5), (dict(rot=0), -5), (dict(rot=66), -5), (dict(D=4097, rot=64), -5),
                           (dict(T=-1), -5), (dict(table_rows=0), -5), (dict(q_stride_t=-1), -5),
                           (dict(k_stride_h=1 << 40), -5), (dict(q_dtype=3), -3), (dict(pool=-2), -2),
                           (dict(positions=None), -6), (dict(cos_sin=None), -6), (dict(q_out=None), -6),
                           (dict(positions=bad_pos.data_ptr()), -13), (dict(positions=neg_pos.data_ptr()), -13),
                           (dict(table_rows=9), -13)]:
        assert lib().kt_rope(ctypes.byref(_RopeArgs(**{**ok, **override}))) == code, override
    assert lib().kt_rope(None) == -6


def test_the_packed_argument_blocks_are_the_abi_structs():
    """native_ops packs its argument blocks with struct (faster than building the ctypes
    Structures); the bytes must be the Structures' own, and the library's sizes agree."""
    for name, (packer, struct_type) in native_ops._PACKERS.items():
        assert getattr(lib(), name + "_args_size")() == ctypes.sizeof(struct_type) == packer.size, name
        values = [math.pi if t is ctypes.c_float else 3 * i + 1 for i, (_, t) in enumerate(struct_type._fields_)]
        assert packer.pack(*values) == bytes(struct_type(*values)), name
