"""The decode step's native ops (kt_backends.cpu.native_ops: attention over the paged KV cache,
rmsnorm, rope) against their torch references (kt_core.backend.torch_ops), on every kernel variant
this CPU runs, and the CPU backend's routing to them. What the Python wrappers and the C ABI refuse
is in test_native_decode_refusals.py."""
import pytest
import torch

from kt_backends.cpu import native, native_ops
from kt_backends.cpu.backend import CpuBackend
from kt_core.backend.torch_ops import attention as torch_attention
from kt_core.backend.torch_ops import norm_rope as torch_norm_rope
from tests.unit.native_decode_cases import (BF16, F32, assert_close, assert_tile_close, paged, query,  # noqa: F401
                                            takes_tiles, variant)

pytestmark = pytest.mark.skipif(not native_ops.available(),
                                reason=f"native CPU kernels: {native_ops.why_unavailable()}")


class threads:
    """Run a block with n threads in pool 0, then restore."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = native.threads()
        native.set_threads(self.n)

    def __exit__(self, *exc):
        native.set_threads(self.before)


# ---------------------------------------------------------------- attention_decode
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
def test_attention_decode_large_head_groups(variant, dtype):
    """Groups of 16 and 24 query heads a kv head (a bf16 model's take the AMX tiles on AMX CPUs, 24: a
    padded second head tile), two kv heads, windows, chunks and sinks, runs split over three threads."""
    lens = [1, 37, 300, 1300]
    for Hkv, ratio, D in [(2, 16, 64), (1, 24, 128)]:
        k, v, table, sl = paged(lens, Hkv, D, 16, dtype, seed=ratio)
        q = query(len(lens), Hkv * ratio, D, dtype, seed=ratio + 1)
        sinks = torch.randn(Hkv * ratio, generator=torch.Generator().manual_seed(3))
        with threads(3):
            for window, chunk, with_sinks in MASKS:
                kw = dict(sliding_window=window, chunk=chunk, sinks=sinks if with_sinks else None)
                ref = torch_attention.attention_decode(q, k, v, table, sl, D ** -0.5, **kw)
                out = native_ops.attention_decode(q, k, v, table, sl, D ** -0.5, **kw)
                what = f"{variant} G={ratio} D={D} window={window} chunk={chunk} sinks={with_sinks}"
                if takes_tiles(variant, dtype, dtype, ratio, D, D):
                    assert_tile_close(out, ref, what)
                else:
                    assert_close(out, ref, what)


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
