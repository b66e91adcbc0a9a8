"""Float64 decoders of kt-core's weight formats, written from the format definitions.

The conformance oracle must not share code with the implementation it judges, so nothing
here comes from ``kt_core.weights.quant``: only the *storage layout* of a
``QuantizedWeight`` is taken from there (it is the contract between the quantizer and every
kernel), and each value is decoded from the definition of its format:

- storage: ``format`` (a ``Quant`` string enum: "int8", "int4", "fp8", "w8a8"), ``qdata``
  (the codes, ``[..., out, in]``; int4 packs two codes a byte, ``[..., out, in / 2]``),
  ``scales`` ``[..., out, n_groups]`` (float32), ``zeros`` ``[..., out, n_groups]`` or None,
  ``group_size`` (inputs per scale, along the last dim), ``in_features``.
- int8 (and the weights of w8a8): signed codes q in [-127, 127], symmetric:
  ``w = q * scale`` with the scale of the input's (row, group): one group per row
  (``group_size == in_features``) or groups of ``quant.int8_group_size`` inputs.
- int4: unsigned 4-bit codes c in [0, 15], two a byte, the even input in the low nibble
  (bits 0-3) and the odd input in the high nibble (bits 4-7). Asymmetric:
  ``w = (c - zero) * scale``; symmetric (``zeros is None``): the code is the signed value
  biased by 8 (q = c - 8 in [-8, 7]), ``w = (c - 8) * scale``.
- fp8: the OCP 8-bit float E4M3 (the "fn" variant: finite only) bytes, decoded bit by bit
  (sign bit 7, exponent bits 6-3 with bias 7, mantissa bits 2-0; exponent 0 is subnormal,
  ``0.mmm * 2^-6``; S.1111.111 is NaN; there are no infinities), times the (row, group) scale.
  DeepSeek-V3 block scales arrive as this layout with each block's scale repeated over its rows.
- w8a8 activations: each row (token) quantized on the fly, symmetric int8:
  ``scale = amax(|x_row|) / 127`` (amax floored at 1e-30 so an all-zero row stays zero),
  ``q = clamp(round_half_to_even(x / scale), -127, 127)``, used as ``q * scale``; computed
  here in float64.
"""
from __future__ import annotations

import math

import torch

NONE, INT8, INT4, FP8, W8A8 = "none", "int8", "int4", "fp8", "w8a8"

INT4_SYMMETRIC_OFFSET = 8  # symmetric int4 codes are the signed value + 8
W8A8_QMAX = 127
W8A8_AMAX_FLOOR = 1e-30


def format_of(weight) -> str:
    """The format name of a weight: "none" for a plain tensor."""
    if isinstance(weight, torch.Tensor):
        return NONE
    fmt = weight.format
    return str(getattr(fmt, "value", fmt))


# ---------------------------------------------------------------- fp8 e4m3 from its bits
def fp8_e4m3_value(byte: int) -> float:
    """The value of one OCP E4M3 (fn) byte: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    if not 0 <= byte <= 0xFF:
        raise ValueError(f"not a byte: {byte}")
    sign = -1.0 if byte & 0x80 else 1.0
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan  # S.1111.111: the only NaNs; E4M3fn has no infinities
    if exponent == 0:
        return sign * (mantissa / 8.0) * 2.0 ** (1 - 7)  # subnormal: 0.mmm x 2^-6
    return sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7)


FP8_E4M3_VALUES = torch.tensor([fp8_e4m3_value(b) for b in range(256)], dtype=torch.float64)


def decode_fp8_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """float64 values of a tensor of E4M3 bytes (uint8)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"fp8 codes must be stored as uint8 bytes, got {codes.dtype}")
    return FP8_E4M3_VALUES[codes.cpu().long()]


# ---------------------------------------------------------------- int4 nibbles
def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Codes 0..15 [..., in_features] from bytes [..., in_features / 2]: input 2j in the low
    nibble of byte j, input 2j + 1 in its high nibble."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"int4 codes must be packed in uint8, got {packed.dtype}")
    if packed.shape[-1] * 2 != in_features:
        raise ValueError(f"int4 bytes {tuple(packed.shape)} cannot hold {in_features} inputs")
    b = packed.cpu().long()
    codes = torch.empty(*b.shape[:-1], in_features, dtype=torch.long)
    codes[..., 0::2] = b % 16
    codes[..., 1::2] = b // 16
    return codes


# ---------------------------------------------------------------- weights
def _per_input(values: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Spread one value per (row, group) [..., out, n_groups] to every input [..., out, in]."""
    values = values.cpu().double()
    n_groups = values.shape[-1]
    if group_size <= 0 or n_groups * group_size != in_features:
        raise ValueError(f"{n_groups} groups of {group_size} inputs do not cover {in_features} inputs")
    group_of_input = torch.arange(in_features) // group_size
    return values.index_select(-1, group_of_input)


def dequantize(weight) -> torch.Tensor:
    """The float64 weight [..., out, in] (on the CPU) that a weight of any format stands for."""
    fmt = format_of(weight)
    if fmt == NONE:
        return weight.detach().cpu().double()
    n, g = int(weight.in_features), int(weight.group_size)
    scale = _per_input(weight.scales, g, n)
    if fmt in (INT8, W8A8):
        if weight.qdata.dtype != torch.int8:
            raise TypeError(f"{fmt} codes must be int8, got {weight.qdata.dtype}")
        codes = weight.qdata.cpu().double()  # int8 with zero points (GGUF Q5_1 / Q5_K / Q2_K): code - zero
        zeros = getattr(weight, "zeros", None)
        return (codes if zeros is None else codes - _per_input(zeros, g, n)) * scale
    if fmt == INT4:
        codes = unpack_int4(weight.qdata, n).double()
        zero = INT4_SYMMETRIC_OFFSET if weight.zeros is None else _per_input(weight.zeros, g, n)
        return (codes - zero) * scale
    if fmt == FP8:
        return decode_fp8_e4m3(weight.qdata) * scale
    raise ValueError(f"unknown weight format {fmt!r}")


# ---------------------------------------------------------------- w8a8 activations
def round_half_to_even(y: torch.Tensor) -> torch.Tensor:
    """Nearest integer; exact halves go to the even neighbour."""
    floor = torch.floor(y)
    frac = y - floor
    odd = torch.remainder(floor, 2) == 1
    return floor + ((frac > 0.5) | ((frac == 0.5) & odd)).to(y.dtype)


def w8a8_activations(x: torch.Tensor) -> torch.Tensor:
    """What a w8a8 kernel multiplies the weights with: every row of x quantized to symmetric int8
    with scale amax/127 and dequantized, in float64."""
    x = x.detach().cpu().double()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(W8A8_AMAX_FLOOR) / W8A8_QMAX
    q = round_half_to_even(x / scale).clamp(-W8A8_QMAX, W8A8_QMAX)
    return q * scale


def activations_for(weight):
    """The activation transform a weight's format implies: w8a8 quantizes per token, others none."""
    if format_of(weight) == W8A8:
        return w8a8_activations
    return lambda t: t.double()
