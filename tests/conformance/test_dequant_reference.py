"""The conformance oracle's decoders (dequant_reference.py) checked on their own:
hand-computed examples from the format definitions, every fp8 code against torch's float8,
then agreement with kt_core's dequantizer and activation quantizer on random tensors."""
from __future__ import annotations

import math

import pytest
import torch

from kt_core.weights.quant import (ExpertWeights, Quant, QuantizedWeight, dequantize, fake_quant_activations,
                                   from_fp8_blocks, quantize)
from tests.conformance import dequant_reference as dr
from tests.conformance import reference as ref


def qw(fmt, qdata, scales, zeros=None, group_size=None, in_features=None):
    """A QuantizedWeight built by hand (no quantizer involved)."""
    n = in_features if in_features is not None else (qdata.shape[-1] * (2 if fmt == Quant.INT4 else 1))
    scales = torch.tensor(scales, dtype=torch.float32)
    zeros = None if zeros is None else torch.tensor(zeros, dtype=torch.float32)
    return QuantizedWeight(fmt, qdata, scales, zeros, group_size or n, n)


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed examples
def test_int8_per_row_by_hand():
    w = qw(Quant.INT8, torch.tensor([[-127, 0, 5, 127], [1, -2, 3, -4]], dtype=torch.int8), [[0.5], [0.25]])
    assert torch.equal(dr.dequantize(w), f64([[-63.5, 0.0, 2.5, 63.5], [0.25, -0.5, 0.75, -1.0]]))


def test_int8_grouped_scales_by_hand():
    # two groups of two inputs in one row: scales 0.5 then 2
    w = qw(Quant.INT8, torch.tensor([[2, -2, 3, 1]], dtype=torch.int8), [[0.5, 2.0]], group_size=2)
    assert torch.equal(dr.dequantize(w), f64([[1.0, -1.0, 6.0, 2.0]]))


def test_w8a8_weights_decode_like_int8_by_hand():
    w = qw(Quant.W8A8, torch.tensor([[10, -20]], dtype=torch.int8), [[0.125]])
    assert torch.equal(dr.dequantize(w), f64([[1.25, -2.5]]))


# codes of inputs 0..3 are 1, 15, 8, 0: byte 0 = 1 | 15 << 4 = 0xF1, byte 1 = 8 | 0 << 4 = 0x08
INT4_BYTES = torch.tensor([[0xF1, 0x08]], dtype=torch.uint8)


def test_int4_nibble_order_by_hand():
    assert dr.unpack_int4(INT4_BYTES, 4).tolist() == [[1, 15, 8, 0]]


def test_int4_symmetric_by_hand():
    # symmetric: value = (code - 8) * scale
    w = qw(Quant.INT4, INT4_BYTES, [[0.5]])
    assert torch.equal(dr.dequantize(w), f64([[-3.5, 3.5, 0.0, -4.0]]))
    # two groups of two: scale 0.5 for inputs 0, 1 and 2 for inputs 2, 3
    w = qw(Quant.INT4, INT4_BYTES, [[0.5, 2.0]], group_size=2)
    assert torch.equal(dr.dequantize(w), f64([[-3.5, 3.5, 0.0, -16.0]]))


def test_int4_asymmetric_by_hand():
    # asymmetric: value = (code - zero) * scale; zero 3, scale 0.25
    w = qw(Quant.INT4, INT4_BYTES, [[0.25]], zeros=[[3.0]])
    assert torch.equal(dr.dequantize(w), f64([[-0.5, 3.0, 1.25, -0.75]]))
    # per group: (zero 1, scale 1) then (zero 10, scale 0.5)
    w = qw(Quant.INT4, INT4_BYTES, [[1.0, 0.5]], zeros=[[1.0, 10.0]], group_size=2)
    assert torch.equal(dr.dequantize(w), f64([[0.0, 14.0, -1.0, -5.0]]))


FP8_BY_HAND = {  # byte: value worked out from S.EEEE.MMM, bias 7
    0x00: 0.0,                  # 0.0000.000
    0x38: 1.0,                  # 0.0111.000: 2^0
    0x40: 2.0,                  # 0.1000.000: 2^1
    0x3C: 1.5,                  # 0.0111.100: 1.5 x 2^0
    0xB4: -0.75,                # 1.0110.100: -(1.5 x 2^-1)
    0x7E: 448.0,                # 0.1111.110: 1.75 x 2^8, the largest finite
    0xFE: -448.0,
    0x77: 240.0,                # 0.1110.111: 1.875 x 2^7
    0x08: 2.0 ** -6,            # 0.0001.000: smallest normal
    0x07: 0.875 * 2.0 ** -6,    # 0.0000.111: largest subnormal
    0x01: 2.0 ** -9,            # 0.0000.001: smallest subnormal, 1/8 x 2^-6
    0x81: -(2.0 ** -9),
}


def test_fp8_codes_by_hand():
    for byte, value in FP8_BY_HAND.items():
        assert dr.fp8_e4m3_value(byte) == value, hex(byte)
    assert math.copysign(1.0, dr.fp8_e4m3_value(0x80)) == -1.0 and dr.fp8_e4m3_value(0x80) == 0.0
    assert math.isnan(dr.fp8_e4m3_value(0x7F)) and math.isnan(dr.fp8_e4m3_value(0xFF))
    # 0x78 (0.1111.000) is 256, not infinity: E4M3fn has no infinities
    assert dr.fp8_e4m3_value(0x78) == 256.0
    assert sum(math.isnan(dr.fp8_e4m3_value(b)) for b in range(256)) == 2


def test_fp8_weight_with_group_scales_by_hand():
    codes = torch.tensor([[0x38, 0xB4, 0x40, 0x01]], dtype=torch.uint8)  # 1, -0.75, 2, 2^-9
    w = qw(Quant.FP8, codes, [[4.0, 0.5]], group_size=2)
    assert torch.equal(dr.dequantize(w), f64([[4.0, -3.0, 1.0, 2.0 ** -10]]))


def test_w8a8_activations_by_hand():
    # row 0: amax 127 -> scale 1, so the codes are x rounded, halves to even
    # row 1: amax 254 -> scale 2; row 2: all zero stays zero
    x = f64([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0, 3.49],
             [254.0, 1.0, 3.0, 5.0, -1.0, -3.0, 0.9, -254.0],
             [0.0] * 8])
    want = f64([[127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -127.0, 3.0],
                [254.0, 0.0, 4.0, 4.0, -0.0, -4.0, 0.0, -254.0],
                [0.0] * 8])
    assert torch.equal(dr.w8a8_activations(x), want)


def test_round_half_to_even_by_hand():
    y = f64([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 2.4999, 2.5001, -3.7])
    assert dr.round_half_to_even(y).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0, 2.0, 3.0, -4.0]


# ---------------------------------------------------------------- fp8 against torch's float8
def test_fp8_bit_decoder_matches_torch_float8_on_all_256_codes():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    theirs = codes.view(torch.float8_e4m3fn).double()
    torch.testing.assert_close(dr.decode_fp8_e4m3(codes), theirs, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- against kt_core, random tensors
def rnd(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


CASES = {  # id: (format, group size, symmetric)
    "int8": ("int8", 128, True),
    "w8a8": ("w8a8", 128, True),
    "int4sym-g32": ("int4", 32, True),
    "int4sym-g64": ("int4", 64, True),
    "int4asym-g32": ("int4", 32, False),
    "int4asym-g128": ("int4", 128, False),
    "int4sym-per-row": ("int4", 0, True),
    "fp8-g32": ("fp8", 32, True),
    "fp8-per-row": ("fp8", 0, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_kt_core_dequantize(case):
    """Every decoded product is exact in float64 (codes of <= 8 bits times a float32 scale), and
    kt_core multiplies in float32, which rounds that exact product once: the oracle rounded to
    float32 must equal kt_core's float32 bit for bit."""
    fmt, group, sym = CASES[case]
    w = quantize(rnd(3, 48, 128, seed=1, scale=0.3), fmt, group_size=group, symmetric=sym)  # 3 experts
    mine = dr.dequantize(w)
    assert mine.dtype == torch.float64 and mine.shape == (3, 48, 128)
    if w.zeros is not None:  # float zero points (least-squares fits): code - zero rounds once more in
        # float32, so the bound is two roundings of a value of at most 16 steps, not bit equality
        step = w.scales.double().abs().repeat_interleave(w.group_size, dim=-1)
        assert bool(((mine - dequantize(w, torch.float32).double()).abs() <= 16 * step * 2.0**-23).all())
    else:
        assert torch.equal(mine.float(), dequantize(w, torch.float32))
    for e in range(3):
        assert torch.equal(dr.dequantize(w.select(e)), mine[e])


def test_agrees_with_kt_core_on_deepseek_fp8_blocks():
    # a [200, 256] e4m3 weight with 128x128 block scales (the last row block is partial)
    codes = torch.randint(0, 256, (200, 256), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    codes = codes.to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x00  # no NaN codes in a checkpoint
    scale_inv = torch.rand(2, 2, generator=torch.Generator().manual_seed(3)) + 0.01
    w = from_fp8_blocks(codes.view(torch.float8_e4m3fn), scale_inv)
    mine = dr.dequantize(w)
    assert torch.equal(mine.float(), dequantize(w, torch.float32))
    # from the definition directly: value of byte (r, c) times the scale of block (r // 128, c // 128)
    for r, c in [(0, 0), (127, 255), (128, 0), (199, 129), (150, 77)]:
        want = dr.fp8_e4m3_value(int(codes[r, c])) * float(scale_inv[r // 128, c // 128])
        assert float(mine[r, c]) == want


def test_w8a8_activations_agree_with_kt_core():
    """kt_core quantizes activations in float32 arithmetic, the oracle in float64: a code may differ
    only where x / scale sits on a rounding boundary (a half) within float32 precision."""
    x = rnd(64, 256, seed=4, scale=2.0)
    x[3] = 0.0  # an all-zero row
    mine = dr.w8a8_activations(x)
    theirs = fake_quant_activations(x).double()
    scale = x.double().abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    y = x.double() / scale
    on_boundary = ((y - torch.floor(y)) - 0.5).abs() < 1e-5
    diff = (mine - theirs).abs()
    # same code: only float32's rounding of the scale and of code * scale (2^-24 each)
    assert bool((diff[~on_boundary] <= 2.5e-7 * mine.abs()[~on_boundary]).all())
    # neighbouring codes: one step
    assert bool((diff[on_boundary] <= 1.000001 * scale.expand_as(diff)[on_boundary]).all())
    assert int(on_boundary.sum()) < 10
    # exact halves where both arithmetics are exact (scale 1): both must round half to even
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5]])
    assert torch.equal(dr.w8a8_activations(ties), fake_quant_activations(ties).double())


def test_reference_linear_and_moe_use_the_oracle():
    """reference.py decodes through the oracle: a weight whose codes mean something else under
    a wrong nibble order or offset gives the definition's answer."""
    w = qw(Quant.INT4, INT4_BYTES, [[0.5]])  # decodes to [-3.5, 3.5, 0, -4]
    x = f64([[1.0, 2.0, 3.0, 4.0]])
    assert ref.linear(x, w).tolist() == [[-3.5 + 7.0 + 0.0 - 16.0]]
    ex = ExpertWeights(torch.tensor([0]), qw(Quant.INT8, torch.tensor([[[1, 0]]], dtype=torch.int8), [[[1.0]]]),
                       qw(Quant.INT8, torch.tensor([[[0, 1]]], dtype=torch.int8), [[[1.0]]]),
                       qw(Quant.INT8, torch.tensor([[[2], [1]]], dtype=torch.int8), [[[0.5], [1.0]]]))
    # gate = x0, up = x1, act = silu(x0) * x1, down rows scale it by 1 and 1
    x = f64([[1.0, 2.0]])
    h = 1.0 / (1 + math.exp(-1.0)) * 2.0
    out = ref.moe(x, torch.tensor([[0]]), torch.tensor([[1.0]]), ex)
    torch.testing.assert_close(out, f64([[h, h]]), rtol=1e-15, atol=0)
