"""Grouped int8 and int4 weights keep fp16 scales (and int4 zero points; 2 bytes each, as GGUF's Q8_0 and
Q4_0) when their values are fp16's: the same results as float32 of the same values, bit for bit, in every
kernel variant."""
import dataclasses

import pytest
import torch

from kt_backends.cpu import native, native_linear
from kt_backends.cpu.native_pack import PackedProj
from kt_core.weights.quant import (ExpertWeights, Quant, _int4_asymmetric, _int4_symmetric, dequantize, fp16_exact,
                                   fp16_scales, quantize)

pytestmark = pytest.mark.skipif(not native.available(), reason="native CPU kernels not built")

E, H, I = 4, 256, 96


def _widen(t):
    return None if t is None else t.float()


def _f32(packed):
    """The same packed experts with their scales (and zero points) widened to float32 (the kernels' float path)."""
    widen = lambda p: PackedProj(p.data, _widen(p.scale), _widen(p.zero), p.bias)  # noqa: E731
    return dataclasses.replace(packed, gate=widen(packed.gate), up=widen(packed.up), down=widen(packed.down))


def test_quantize_rounds_int8_group_scales_to_fp16_and_keeps_the_error():
    w = torch.randn(64, 256) * 0.02
    q = quantize(w, "int8", int8_group=32)
    assert fp16_exact(q.scales) and q.qdata.abs().max() <= 127
    err = float((dequantize(q) - w).pow(2).sum() / w.pow(2).sum())
    s = w.reshape(64, 8, 32).abs().amax(-1, keepdim=True) / 127  # the float32 scales' own error
    ref = float(((torch.round(w.reshape(64, 8, 32) / s) * s).reshape(64, 256) - w).pow(2).sum() / w.pow(2).sum())
    assert err <= ref * 1.01
    assert not fp16_exact(quantize(w, "int8").scales)  # one scale per row stays float32
    assert torch.equal(fp16_scales(torch.tensor([1e6])), torch.tensor([1e6]))  # past fp16: as it is


# the formats that keep fp16 parameters, as quantize's arguments
F16_FORMATS = {"int8 g32": dict(fmt="int8", int8_group=32), "int4 sym": dict(fmt="int4", group_size=32),
               "int4 asym": dict(fmt="int4", group_size=32, symmetric=False)}


@pytest.mark.parametrize("kind", list(F16_FORMATS))
@pytest.mark.parametrize("T", [1, 5, 40])
def test_fp16_and_float32_params_give_the_same_bits_in_every_variant(T, kind):
    g = torch.Generator().manual_seed(T)
    q = lambda *shape: quantize(torch.randn(*shape, generator=g) * 0.02, **F16_FORMATS[kind])  # noqa: E731
    packed = native.pack(ExpertWeights(torch.arange(E), q(E, I, H), q(E, I, H), q(E, H, I)))
    assert packed.gate.scale.dtype == torch.float16 and packed.down.scale.element_size() == 2
    assert (packed.up.zero is not None) == (kind == "int4 asym")
    assert packed.up.zero is None or packed.up.zero.dtype == torch.float16
    wide = _f32(packed)
    assert wide.nbytes() > packed.nbytes()
    x = torch.randn(T, H, generator=g).bfloat16()
    ids, w = torch.randint(0, E, (T, 2), generator=g), torch.rand(T, 2, generator=g)
    try:
        for v in native.supported_variants():
            native.set_variant(v)
            assert torch.equal(native.moe_forward(packed, x, ids, w), native.moe_forward(wide, x, ids, w)), v
    finally:
        native.set_variant(native.supported_variants()[-1])


@pytest.mark.parametrize("kind", list(F16_FORMATS))
def test_packed_dense_weights_take_fp16_params(kind):
    w = quantize(torch.randn(80, 256) * 0.02, **F16_FORMATS[kind])
    packed = native_linear.pack_linear(w)
    assert packed.proj.scale.dtype == torch.float16
    assert packed.proj.zero is None or packed.proj.zero.dtype == torch.float16
    wide = dataclasses.replace(packed, proj=PackedProj(packed.proj.data, _widen(packed.proj.scale),
                                                       _widen(packed.proj.zero), None))
    x = torch.randn(3, 256)
    assert torch.equal(native_linear.linear(x, packed), native_linear.linear(x, wide))
    ref = x @ dequantize(w).T
    assert float((native_linear.linear(x, packed) - ref).abs().max() / ref.abs().max()) < 1e-3


def test_fp16_scales_on_other_formats_are_refused():
    w = quantize(torch.randn(32, 64) * 0.02, "int8")  # one scale per row
    packed = native_linear.pack_linear(w)
    assert packed.proj.scale.dtype == torch.float32 and Quant(packed.fmt) is Quant.INT8
    lib = native_linear._lib()
    x, out = torch.zeros(64), torch.zeros(32)
    args = native_linear._LinearArgs(1, 64, 32, native.FORMATS["int8"], 0, x.data_ptr(), packed.proj.data.data_ptr(),
                                     packed.proj.scale.data_ptr(), None, None, packed.proj.data.numel(),
                                     out.data_ptr(), 0, 0, 1)
    assert lib.kt_linear_packed(args) == -3  # a per-row scale is float32: the flag is refused, not misread


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_rounds_int4_scales_and_zero_points_to_fp16_and_keeps_the_error(symmetric):
    w = torch.randn(64, 256) * 0.02
    q = quantize(w, "int4", group_size=32, symmetric=symmetric)
    assert fp16_exact(q.scales) and (q.zeros is None if symmetric else fp16_exact(q.zeros))
    err = float((dequantize(q) - w).pow(2).sum() / w.pow(2).sum())
    g = w.reshape(64, 8, 32)  # the float32 fit before rounding, reconstructed here
    if symmetric:
        c, s = _int4_symmetric(g)
        ref = (c - 8) * s
    else:
        c, s, z = _int4_asymmetric(g)
        ref = (c - z) * s
    ref_err = float((ref.reshape(64, 256) - w).pow(2).sum() / w.pow(2).sum())
    assert 0 < err <= ref_err * 1.01
    codes = torch.stack((q.qdata & 0xF, q.qdata >> 4), dim=-1).reshape(64, 8, 32).float()
    zero = 8.0 if symmetric else q.zeros.unsqueeze(-1)
    nearest = torch.round(w.reshape(64, 8, 32) / q.scales.unsqueeze(-1) + zero).clamp(0, 15)
    assert torch.equal(codes, nearest)  # the codes are the nearest ones for the rounded parameters


def test_int4_groups_fp16_cannot_hold_keep_float32():
    w = torch.randn(16, 64) * 0.02
    w[3, :32] = 0.0  # an all-zero group: scale 1, zero point 0 (fp16 holds them)
    w[5, 32:] = 0.125  # a constant group: its value exactly
    q = quantize(w, "int4", group_size=32, symmetric=False)
    assert fp16_exact(q.scales) and fp16_exact(q.zeros)
    assert torch.equal(dequantize(q)[3, :32], w[3, :32]) and torch.equal(dequantize(q)[5, 32:], w[5, 32:])
    tiny = quantize(torch.randn(16, 64) * 1e-9, "int4", group_size=32)  # scales under fp16's smallest
    assert not fp16_exact(tiny.scales)
    packed = native_linear.pack_linear(tiny)
    assert packed.proj.scale.dtype == torch.float32  # kept float32, not flushed to zero
    x = torch.randn(2, 64)
    ref = x @ dequantize(tiny).T
    assert float((native_linear.linear(x, packed) - ref).abs().max() / ref.abs().max()) < 1e-3
