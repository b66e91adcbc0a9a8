"""The native CPU expert kernels against the torch reference path, per format and variant."""
import math

import pytest
import torch

from kt_backends.cpu import native
from kt_core.backend.torch_ops.moe import moe_experts as torch_moe
from kt_core.weights.quant import ExpertWeights, quantize
from tests.conformance.tolerances import NATIVE_MOE, native_moe_path, native_moe_tolerance
from tests.unit.native_experts import int8_with_zeros

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels: {native.status()}")


def experts(fmt, E=6, H=96, I=40, group=32, symmetric=True, bias=False, seed=0):
    """int8 with symmetric=False: int8_with_zeros (GGUF's Q5_K form)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        t = (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)
        if fmt == "int8" and not symmetric:
            return int8_with_zeros(t, group)
        return t if fmt == "bf16" else quantize(t.float(), fmt, group_size=group, symmetric=symmetric,
                                                int8_group=group)
    kw = {}
    if bias:
        kw = {k: torch.randn(E, n, generator=g) * 0.1 for k, n in (("gate_bias", I), ("up_bias", I), ("down_bias", H))}
    ids = torch.randperm(20, generator=g)[:E]
    return ExpertWeights(ids, w(E, I, H), w(E, I, H), w(E, H, I), **kw)


def routes(T, ex, K=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    pool = torch.cat([ex.expert_ids, torch.tensor([19, 18])])  # some routes go to experts held elsewhere
    ids = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:K]] for _ in range(T)])
    return ids, torch.rand(T, K, generator=g)


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-9))


def tokens_per_expert(ids: torch.Tensor) -> int:
    """The most tokens one expert gets in a call: what decides the AMX / AVX512-BF16 tile path."""
    return int(torch.bincount(ids.flatten()).max())


def tol(fmt, ids, variant=None, x=None):
    """The bound of the path this call takes; x: the hidden states (bf16 ones may be rounded inside)."""
    bf16 = x is not None and x.dtype == torch.bfloat16
    return native_moe_tolerance(fmt, variant or native.variant(), tokens_per_expert(ids), bf16)


class forced:
    """Run a block on one kernel variant, then restore the default."""

    def __init__(self, variant):
        self.variant, self.best = variant, native.variant()

    def __enter__(self):
        native.set_variant(self.variant)

    def __exit__(self, *exc):
        native.set_variant(self.best)


CASES = [("bf16", 32, True), ("int8", 0, True), ("int8", 32, True), ("int8", 16, True), ("int8", 32, False),
         ("int4", 32, True), ("int4", 64, False), ("int4", 128, True), ("int4", 0, False), ("fp8", 32, True),
         ("fp8", 0, True), ("w8a8", 0, True)]  # group 0: one scale per row


@pytest.mark.parametrize("fmt,group,sym", CASES, ids=[f"{f}-g{g}-{'sym' if s else 'asym'}" for f, g, s in CASES])
@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("activation,bias", [("silu", False), ("gelu_tanh", False), ("swiglu_oai", True),
                                             ("silu_clamp10", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_native_matches_torch_path(fmt, group, sym, T, activation, bias, dtype):
    """Every variant this CPU has, forced in turn, against the torch path; the bound is the one of
    the path that runs (bf16 hidden states with T=37 give some experts enough tokens for the bf16
    tile kernels on AMX / AVX512-BF16 CPUs)."""
    grouped = fmt in ("int4", "fp8") or (fmt == "int8" and group)
    I = max(64, group) if grouped else 40  # 40: rows that do not fill a 16-row panel
    ex = experts(fmt, H=128, I=I, group=group, symmetric=sym, bias=bias)
    packed = native.pack(ex)
    assert packed is not None and packed.fmt == fmt
    # silu_clamp10: gate / up pre-activations of about N(0, 10^2), so many pass its clamp at 10
    scale = 10.0 if activation == "silu_clamp10" else 1.0
    x = (torch.randn(T, 128, generator=torch.Generator().manual_seed(2)) * scale).to(dtype)
    ids, w = routes(T, ex)
    ref = torch_moe(x.float(), ids, w, ex, activation)
    if activation == "silu_clamp10":  # the clamp bites: a kernel without it would fail
        assert rel(torch_moe(x.float(), ids, w, ex, "silu"), ref) > 0.1
    for variant in native.supported_variants():
        with forced(variant):
            out = native.moe_forward(packed, x, ids, w, activation)
        assert out.dtype == dtype
        path = native_moe_path(fmt, variant, tokens_per_expert(ids), dtype == torch.bfloat16)
        assert rel(out, ref) < tol(fmt, ids, variant, x), f"variant {variant}, path {path}"


@pytest.mark.parametrize("fmt,group", [("bf16", 0), ("fp8", 0), ("fp8", 32)])
@pytest.mark.parametrize("T", [6, 7, 13, 40])  # AVX2's decoded panels: passes 6, 4 + 3, 5 + 4 + 4, 6 x 5 + 5 x 2
def test_experts_against_many_tokens(fmt, group, T):
    """Every token on both experts: each panel meets 6+ tokens (AVX2 decodes its 320 inputs 128 at a
    time, the next chunk prefetched, the last chunk short; fp8 per row: one group over three chunks) in
    every variant, against the torch path."""
    ex = experts(fmt, E=2, H=320, I=64, group=group)
    packed = native.pack(ex)
    x = torch.randn(T, 320, generator=torch.Generator().manual_seed(T))
    ids = ex.expert_ids.repeat(T, 1).contiguous()
    w = torch.rand(T, 2, generator=torch.Generator().manual_seed(1))
    ref = torch_moe(x, ids, w, ex, "silu")
    for variant in native.supported_variants():
        with forced(variant):
            out = native.moe_forward(packed, x, ids, w)
        assert rel(out, ref) < tol(fmt, ids, variant, x), variant


@pytest.mark.parametrize("fmt,group", [("bf16", 0), ("fp8", 0), ("fp8", 32)])
def test_avx2_decoded_panels_keep_the_bits_of_one_token(fmt, group):
    """AVX2 takes 6+ tokens of an expert on decoded float32 panels, fewer on tile_rows / tile_f8_group:
    the same sums in the same order, so each token's output is bit-identical either way."""
    if "avx2" not in native.supported_variants():
        pytest.skip("this CPU has no AVX2")
    ex = experts(fmt, E=2, H=320, I=64, group=group)
    packed = native.pack(ex)
    x = torch.randn(7, 320, generator=torch.Generator().manual_seed(3))
    ids, w = ex.expert_ids[:1].repeat(7, 1).contiguous(), torch.ones(7, 1)
    with forced("avx2"):
        together = native.moe_forward(packed, x, ids, w)
        alone = torch.cat([native.moe_forward(packed, x[i:i + 1], ids[i:i + 1], w[i:i + 1]) for i in range(7)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_pack_release_lets_go_of_each_packed_projection(fmt):
    """pack(release=True) (a backend's prepare_experts at load time) gives what pack gives and drops
    the experts' own projections as it packs them; experts it does not pack stay whole."""
    ex, kept = experts(fmt, I=64, group=32), experts(fmt, I=64, group=32)
    packed, want = native.pack(ex, release=True), native.pack(kept)
    assert (ex.gate, ex.up, ex.down) == (None, None, None) and kept.gate is not None
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1))
    ids, w = routes(7, kept)
    assert torch.equal(native.moe_forward(packed, x, ids, w), native.moe_forward(want, x, ids, w))
    E = kept.expert_ids.numel()  # float32 experts: the torch path's, not packed, not let go of
    f32 = ExpertWeights(kept.expert_ids, torch.randn(E, 64, 96), torch.randn(E, 64, 96), torch.randn(E, 96, 64))
    assert native.pack_formats(f32) is None and native.pack(f32, release=True) is None
    assert f32.gate is not None and f32.up is not None and f32.down is not None


def test_fp8_odd_input_count():
    """fp8 kernels take inputs two at a time; an odd K (per-row scales) ends on one."""
    ex = experts("fp8", H=33, I=40, group=0)
    packed = native.pack(ex)
    assert packed is not None and packed.fmt == "fp8"
    x = torch.randn(6, 33, generator=torch.Generator().manual_seed(3))
    ids, w = routes(6, ex)
    ref = torch_moe(x, ids, w, ex, "silu")
    for variant in native.supported_variants():
        with forced(variant):
            assert rel(native.moe_forward(packed, x, ids, w), ref) < tol("fp8", ids, variant), variant


@pytest.mark.parametrize("fmt,group,sym,T", [("int8", 0, True, 12), ("int8", 64, True, 37), ("int4", 128, True, 37),
                                             ("int4", 64, False, 37), ("int4", 0, True, 37)])
def test_amx_integer_tiles_keep_int16_accuracy(fmt, group, sym, T):
    """On AMX, int8 / int4 experts of groups of 64+ (and per-row int8 in one token tile: from 17 tokens
    an expert it takes bf16 tiles, its codes exact there) run TDPBSSD with each bf16 activation as two
    int8 codes (kernels_amx_int.hpp): the result must be as close to the float reference as the
    output's own bf16 rounding allows, not the 1e-2 a bf16-tile path may take (one int8 code per
    activation alone was ~1.4% off here)."""
    if "amx" not in native.supported_variants():
        pytest.skip("this CPU (or build) has no AMX")
    ex = experts(fmt, H=128, I=128, group=group, symmetric=sym)
    packed = native.pack(ex)
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ids, w = routes(T, ex)  # ~18 tokens an expert (T=12: ~6): every expert takes the tiles
    assert tokens_per_expert(ids) >= native.bf16_tile_tokens("amx", fmt) > 0
    assert fmt != "int8" or group or tokens_per_expert(ids) <= 16
    ref = torch_moe(x.float(), ids, w, ex)
    with forced("amx"):
        out = native.moe_forward(packed, x, ids, w)
    assert rel(out, ref) < NATIVE_MOE["bf16_output"][0]


@pytest.mark.parametrize("fmt", ["int4", "fp8", "w8a8", "bf16"])
def test_variants_and_thread_counts_agree(fmt):
    ex = experts(fmt, H=128, I=64, group=32)
    packed = native.pack(ex)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(3))
    ids, w = routes(9, ex)
    best = native.variant()
    base = native.moe_forward(packed, x, ids, w)
    bound = max(tol(fmt, ids, "generic"), tol(fmt, ids, best))
    try:
        native.set_variant("generic")
        assert rel(native.moe_forward(packed, x, ids, w), base) < bound
        native.set_threads(1)
        one = native.moe_forward(packed, x, ids, w)
    finally:
        native.set_variant(best)
        native.set_threads(2)
    assert rel(one, base) < bound
    assert torch.equal(native.moe_forward(packed, x, ids, w), base), "same variant, same result"
    with pytest.raises(ValueError, match="unknown"):
        native.set_variant("sse9")


def test_async_submit_and_bf16_io():
    ex = experts("bf16", H=128, I=48)
    packed = native.pack(ex)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ids, w = routes(4, ex)
    fut = native.submit(packed, x, ids, w)
    out = fut.result(timeout=60)
    assert out.dtype == torch.bfloat16 and torch.equal(out, native.moe_forward(packed, x, ids, w))


def test_formats_it_does_not_take_stay_on_torch():
    fp32 = experts("bf16")
    fp32 = ExpertWeights(fp32.expert_ids, fp32.gate.float(), fp32.up.float(), fp32.down.float())
    assert native.pack(fp32) is None


def test_memory_bandwidth_probe():
    gbps = native.memory_bandwidth_gbps(megabytes=64, iters=2)
    assert math.isfinite(gbps) and gbps > 0  # a rate, not a timing bound: machines are shared


@pytest.mark.parametrize("variant", ["default", "avx2", "avx512"])  # the dense GEMV's AVX2 / AVX-512 forms
@pytest.mark.parametrize("T", [1, 3, 4, 17])
@pytest.mark.parametrize("M,K", [(33, 64), (64, 100), (7, 8), (9, 40)])
@pytest.mark.parametrize("bf16_x", [False, True])  # a bf16 model's activations (one token: AVX512-BF16's GEMV)
def test_dense_linear_matches_torch(T, M, K, variant, bf16_x):
    if variant != "default":
        if variant not in native.supported_variants():
            pytest.skip(f"this CPU has no {variant} (its kernels run under tests/native's emulation)")
        before = native.variant()
        native.set_variant(variant)
        try:
            return test_dense_linear_matches_torch(T, M, K, "default", bf16_x)
        finally:
            native.set_variant(before)
    g = torch.Generator().manual_seed(T * M)
    w = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(M, generator=g)
    B = 1 if T == 1 else 2  # T == 1: one row, the decode GEMV's case
    x = torch.randn(B, T, K, generator=g)
    if bf16_x:
        x = x.bfloat16().float()
    assert native.takes_linear(x, w)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    out = native.linear(x, w, b)
    assert out.shape == (B, T, M) and out.dtype == torch.float32
    assert rel(out, ref) < 1e-5
    assert not native.takes_linear(x, w.float())


VARIANTS = list(native.VARIANTS)


def supported_variants():
    return native.supported_variants()


def test_variant_support_is_consistent():
    supported = native.supported_variants()
    assert supported[0] == "generic" and native.variant() == supported[-1]
    if native.variant() != "generic":
        assert "avx2" in supported  # every SIMD variant builds on AVX2
    with pytest.raises(ValueError, match="unknown"):
        native.set_variant("sse9")


@pytest.mark.parametrize("fmt", ["bf16", "int8", "w8a8", "int4", "fp8"])
@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_every_simd_variant_matches_generic(fmt, variant):
    """Runs on CPUs that have the variant (vendor CI); elsewhere it checks the variant is refused."""
    best = native.variant()
    if variant not in supported_variants():
        with pytest.raises(ValueError, match="not supported by this CPU"):
            native.set_variant(variant)
        assert native.variant() == best
        pytest.skip(f"this CPU's best kernel variant is {best}; {variant} cannot run here")
    ex = experts(fmt, H=128, I=64, group=32)
    packed = native.pack(ex)
    T = 80 if variant in ("avx512", "amx") else 7  # AMX and AVX512-BF16 tiles want several tokens per expert
    # bf16 hidden states, as a bf16 model feeds its MoE (the tile kernels take only those)
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(8)).bfloat16()
    ids, w = routes(T, ex)
    with forced("generic"):
        ref = native.moe_forward(packed, x, ids, w)
    with forced(variant):
        out = native.moe_forward(packed, x, ids, w)
    assert rel(out, ref) < max(tol(fmt, ids, variant, x), tol(fmt, ids, "generic", x))


MIXED = [(("int4", 32, False), ("int8", 16, True)), (("int8", 32, True), ("int4", 32, True)),
         (("bf16", 0, True), ("int8", 0, True)), (("int8", 32, False), ("int8", 16, True)),
         (("int8", 32, True), ("int8", 16, False))]


@pytest.mark.parametrize("first,down", MIXED, ids=["int4asym+int8g16", "int8g32+int4", "bf16+int8",
                                                   "int8g32zeros+int8g16", "int8g32+int8g16zeros"])
@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_down_in_its_own_format(first, down, T, dtype):
    """Gate and up in one format, down in another (a GGUF Q4_K_M layer: Q4_K gate / up, Q6_K down):
    one native call, every variant, against the torch path; the bound is the looser path's."""
    (fmt, group, sym), (dfmt, dgroup, dsym) = first, down
    a = experts(fmt, H=128, I=64, group=group, symmetric=sym)
    b = experts(dfmt, H=128, I=64, group=dgroup, symmetric=dsym)
    ex = ExpertWeights(a.expert_ids, a.gate, a.up, b.down)
    packed = native.pack(ex)
    assert packed is not None and (packed.fmt, packed.down_fmt) == (fmt, dfmt)
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    ids, w = routes(T, ex)
    ref = torch_moe(x.float(), ids, w, ex, "silu")
    for variant in native.supported_variants():
        with forced(variant):
            out = native.moe_forward(packed, x, ids, w, "silu")
        bound = max(tol(fmt, ids, variant, x), tol(dfmt, ids, variant, x))
        assert rel(out, ref) < bound, f"variant {variant}"
