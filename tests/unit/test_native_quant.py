"""Load-time quantization on the native kernels (backends/cpu/native_quant.py, native/quantize_load.inc):
the int4 fits agree with kt_core.weights.quant's torch reference (the oracle: same codes but where a
group sits at a near-tie of two candidate fits, which its own summation order decides; the same weight
error), int8 equals it exactly, the generic and AVX2 builds agree bit for bit, the panel packing equals
the torch formulation of the kernels' layout, and the library refuses sizes it does not take."""
import ctypes

import pytest
import torch

from kt_backends.cpu import native, native_quant
from kt_backends.cpu.native_abi import _PackInt4Args, _QuantInt4Args, _QuantInt8Args
from kt_core.weights import quant

pytestmark = pytest.mark.skipif(not native.available(), reason="native CPU kernels not built")


def _weights(kind: str, rows: int, K: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(rows, K, generator=g)
    elif kind == "t3":  # heavy tails: groups dominated by one weight
        w = torch.randn(rows, K, generator=g) / torch.rand(rows, K, generator=g).clamp_min(0.05) ** 0.5
    else:  # edge groups: zeros, constants, one nonzero, fp16 underflow and overflow, mixed
        w = torch.randn(rows, K, generator=g)
        w[0] = 0.0
        w[1] = 0.37
        w[2] = -2.5
        w[3, :] = 0.0
        w[3, 5] = 1.0
        w[4] *= 1e-9  # scales under fp16's smallest subnormal: kept in float32
        w[5] *= 1e8   # scales past fp16's range: kept in float32
        w[6, ::2] = 0.0
    return (w * 0.02 if kind != "edge" else w).to(dtype)


def _torch_ref(w, group, symmetric, monkeypatch, fmt="int4", int8_group=0):
    """quantize()'s torch path (its native dispatch cut off, whatever KT_NATIVE_QUANT says)."""
    with monkeypatch.context() as m:
        m.setattr(quant, "_native", lambda *a, **k: None)
        return quant.quantize(w, fmt, group, symmetric, int8_group)


def test_kt_native_quant_0_runs_the_torch_path(monkeypatch):
    w = _weights("normal", 8, 64, torch.float32)
    monkeypatch.setenv("KT_NATIVE_QUANT", "0")
    assert native_quant.try_int4(w, 32, True, True, (0.0,), 1) is None and native_quant.try_int8(w, 32, True) is None


@pytest.mark.parametrize("kind", ["normal", "t3", "edge"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype,group", [(torch.bfloat16, 32), (torch.float32, 64), (torch.bfloat16, 128)])
def test_native_fits_agree_with_the_torch_reference(kind, symmetric, dtype, group, monkeypatch):
    w = _weights(kind, 96, 512, dtype)
    ours = quant.quantize(w, "int4", group, symmetric)
    assert native_quant.try_int4(w.reshape(-1, 512), group, symmetric, True, quant.INT4_ASYM_SHRINKS,
                                 quant.INT4_ASYM_REFITS) is not None, native_quant.why_unavailable()
    ref = _torch_ref(w, group, symmetric, monkeypatch)
    assert ours.qdata.shape == ref.qdata.shape and ours.scales.shape == ref.scales.shape
    assert (ours.zeros is None) == symmetric and (ref.zeros is None) == symmetric
    same = (ours.qdata == ref.qdata).float().mean().item()
    assert same >= 0.998, f"codes agree on {same:.4f} of bytes"
    groups_same = torch.isclose(ours.scales, ref.scales, rtol=1e-5, atol=0).float().mean().item()
    assert groups_same >= 0.99, f"scales agree on {groups_same:.4f} of groups"
    wf = w.float()
    err_ours = (wf - quant.dequantize(ours)).square().sum().item()
    err_ref = (wf - quant.dequantize(ref)).square().sum().item()
    assert err_ours <= err_ref * 1.001 + 1e-30, (err_ours, err_ref)
    # fp16 scales where they survive fp16, float32 where they do not (rows 4 and 5 of "edge")
    f16 = ours.scales.half().float() == ours.scales
    assert torch.equal(f16, ref.scales.half().float() == ref.scales)
    if kind == "edge":
        assert torch.equal(ours.qdata[:4], ref.qdata[:4]) and torch.equal(ours.scales[:4], ref.scales[:4])
        assert not bool(f16[5].any()), "scales past fp16's range stay float32"


@pytest.mark.parametrize("kind", ["normal", "edge"])
@pytest.mark.parametrize("dtype,int8_group", [(torch.bfloat16, 0), (torch.float32, 32), (torch.bfloat16, 64)])
def test_native_int8_equals_the_torch_form(kind, dtype, int8_group, monkeypatch):
    w = _weights(kind, 40, 256, dtype)
    ours = quant.quantize(w, "int8", int8_group=int8_group)
    assert native_quant.try_int8(w, int8_group or 256, bool(int8_group)) is not None
    ref = _torch_ref(w, 128, True, monkeypatch, "int8", int8_group)
    assert ours.group_size == ref.group_size == (int8_group or 256)
    assert torch.equal(ours.qdata, ref.qdata) and torch.equal(ours.scales, ref.scales)
    if int8_group and kind == "edge":  # past fp16's range: that group's scale stays float32, the rest fp16
        assert not bool((ours.scales[5].half().float() == ours.scales[5]).any())
        assert bool((ours.scales[7].half().float() == ours.scales[7]).all())


@pytest.mark.parametrize("symmetric", [True, False, "int8"])
@pytest.mark.parametrize("kind,rows,K,dtype", [("t3", 64, 768, torch.bfloat16), ("edge", 8, 96, torch.float32),
                                               ("normal", 3, 32, torch.bfloat16)])  # 3 groups: a partial block
def test_generic_and_avx2_builds_give_the_same_bits(symmetric, kind, rows, K, dtype):
    if "avx2" not in native.supported_variants():
        pytest.skip("this CPU cannot run the avx2 build")
    w = _weights(kind, rows, K, dtype, seed=3)
    best = native.variant()
    outs = []
    try:
        for v in ("generic", "avx2"):
            native.set_variant(v)
            outs.append(native_quant.try_int8(w, 32, True) if symmetric == "int8" else
                        native_quant.try_int4(w, 32, symmetric, True, quant.INT4_ASYM_SHRINKS, quant.INT4_ASYM_REFITS))
    finally:
        native.set_variant(best)
    assert outs[0] is not None
    for a, b in zip(outs[0], outs[1]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_partial_blocks_of_groups_match_whole_tensors(fmt):
    """Groups quantized 8 at a time: a tensor of 13 groups equals the same rows quantized among others."""
    w = _weights("t3", 40, 64, torch.bfloat16, seed=5)  # 80 groups of 32
    fn = (lambda t: native_quant.try_int8(t, 32, True)) if fmt == "int8" else \
        (lambda t: native_quant.try_int4(t, 32, False, True, quant.INT4_ASYM_SHRINKS, quant.INT4_ASYM_REFITS))
    whole = fn(w)
    part = fn(w[10:17].contiguous())  # 14 groups, starting mid-block
    for a, b in zip(whole, part):
        assert (a is None and b is None) or torch.equal(a[10:17], b)


def test_groups_the_kernel_does_not_take_run_the_torch_path(monkeypatch):
    w = _weights("normal", 8, 48, torch.float32)
    assert native_quant.try_int4(w, 12, True, True, (0.0,), 1) is None  # 12: not a multiple of 8
    q = quant.quantize(w, "int4", 12)
    ref = _torch_ref(w, 12, True, monkeypatch)
    assert torch.equal(q.qdata, ref.qdata) and torch.equal(q.scales, ref.scales)


@pytest.mark.parametrize("M", [768, 37, 5])
def test_native_panel_packing_equals_the_torch_layout(M):
    from kt_backends.cpu import native_pack

    codes = torch.randint(0, 256, (3, M, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(M))
    ours = native_quant.try_pack_int4(codes)
    saved = native_quant.try_pack_int4
    native_quant.try_pack_int4 = lambda *a, **k: None  # the torch formulation
    try:
        ref = native_pack._int4_quads(codes)
    finally:
        native_quant.try_pack_int4 = saved
    assert ours is not None and ours.shape == ref.shape == (3, -(-M // 16), 32, 32)
    assert torch.equal(ours, ref)
    # the layout's definition, for one byte: row l, input 4q + 2s + e in nibble e of byte 4l + 2e + s
    p, q, l, e, s = 0, 3, 2, 1, 1
    byte = int(ours[1, p, q, 4 * l + 2 * e + s])
    top, bottom = int(codes[1, 16 * p + l, 2 * q + s]), int(codes[1, 16 * p + l + 8, 2 * q + s]) if M > 8 + l else 0
    assert byte == ((top >> 4 * e) & 15) | (((bottom >> 4 * e) & 15) << 4)


def test_the_library_refuses_what_it_cannot_take():
    lib = native._need()
    lib.kt_quantize_int4.argtypes = [ctypes.POINTER(_QuantInt4Args)]
    lib.kt_pack_int4.argtypes = [ctypes.POINTER(_PackInt4Args)]
    src, codes, scale = torch.zeros(4, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2)
    lo = torch.zeros(3)

    def q(**over):
        f = dict(rows=4, K=64, group=32, src_dtype=0, symmetric=1, fp16=1, n_starts=3, refits=3, pool=0,
                 start_lo=lo.data_ptr(), start_width=lo.data_ptr(), src=src.data_ptr(), codes=codes.data_ptr(),
                 scale=scale.data_ptr(), zero=None)
        f.update(over)
        return lib.kt_quantize_int4(ctypes.byref(_QuantInt4Args(**f)))

    assert q() == 0
    assert q(group=12) == -7 and q(group=48) == -7 and q(group=0) == -7  # not a multiple of 8 dividing K
    assert q(K=0) == -5 and q(rows=-1) == -5
    assert q(src_dtype=7) == -3 and q(symmetric=2) == -3
    assert q(symmetric=0) == -6  # asymmetric needs the zero points
    assert q(symmetric=0, zero=scale.data_ptr(), n_starts=0) == -5
    assert q(src=None) == -6 and q(pool=64) == -2
    lib.kt_quantize_int8.argtypes = [ctypes.POINTER(_QuantInt8Args)]
    codes8 = torch.zeros(4, 64, dtype=torch.int8)

    def q8(**over):
        f = dict(rows=4, K=64, group=32, src_dtype=0, fp16=1, pool=0, src=src.data_ptr(), codes=codes8.data_ptr(),
                 scale=scale.data_ptr())
        f.update(over)
        return lib.kt_quantize_int8(ctypes.byref(_QuantInt8Args(**f)))

    assert q8() == 0
    assert q8(group=12) == -7 and q8(group=128) == -7 and q8(K=-4) == -5 and q8(fp16=2) == -3 and q8(codes=None) == -6
    out = torch.zeros(1, 1, 16, 32, dtype=torch.uint8)
    src8 = torch.zeros(1, 16, 32, dtype=torch.uint8)

    def p(**over):
        f = dict(E=1, M=16, K=64, pool=0, codes=src8.data_ptr(), out=out.data_ptr())
        f.update(over)
        return lib.kt_pack_int4(ctypes.byref(_PackInt4Args(**f)))

    assert p() == 0
    assert p(K=62) == -7 and p(M=0) == -5 and p(E=-1) == -5 and p(out=None) == -6
