"""Exact repacks of GGML block types into kt-core formats (:mod:`kt_core.weights.quant`), without going
through floats, from the block parts :mod:`kt_core.weights.gguf_blocks` decodes:

- Q4_0 as symmetric int4 group 32 with the same codes and scales (bit exact); Q4_1 and Q4_K
  asymmetric, exact up to float32 rounding of ``zero = -min / scale``;
- the int8-range types (Q8_0, Q5_0, IQ4_NL, IQ4_XS, MXFP4; Q6_K, Q3_K in groups of 16) as grouped
  int8, bit exact; those with a min per group (Q5_1, Q5_K; Q2_K in groups of 16) as grouped int8
  with zero points, exact up to float32 rounding of the zero point.

Other types give ``None``: the caller dequantizes them (:func:`kt_core.weights.gguf_blocks.dequantize`).
"""
from __future__ import annotations

from typing import Optional

import torch
from gguf.constants import GGMLQuantizationType as T

from kt_core.weights import gguf_blocks as gb
from kt_core.weights.gguf_blocks import (_check, _codebook, _f16, _iq4_xs_parts, _mxfp4_parts, _nibbles, _q2_k_parts,
                                         _q3_k_parts, _q4_k_parts, _q5_k_parts, _q6_k_parts, _qh32, _view)
from kt_core.weights.quant import Quant, QuantizedWeight

__all__ = ["REPACKABLE", "kept_as", "kept_bytes", "repack"]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [g, 32] in element order -> [g, 16] bytes, the even element in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _asymmetric(codes, scale, low):
    """Exact int4 / int8 for x = scale*q - low: zero = low/scale; where scale is 0, x = -low everywhere,
    which scale 1, codes 0, zero = low give exactly."""
    flat = scale == 0
    zero = torch.where(flat, low, low / torch.where(flat, torch.ones_like(scale), scale))
    codes = torch.where(flat.unsqueeze(-1), torch.zeros_like(codes), codes)
    return codes, torch.where(flat, torch.ones_like(scale), scale), zero


def _repack_q4_0(b):
    return _nibbles(b[:, 2:18]), _f16(b, 0).reshape(-1), None


def _repack_q4_1(b):
    return _asymmetric(_nibbles(b[:, 4:20]), _f16(b, 0).reshape(-1), -_f16(b, 2).reshape(-1))


def _repack_q4_k(b):
    q, scale, dmin = _q4_k_parts(b)
    return _asymmetric(q.reshape(-1, 32), scale.reshape(-1), dmin.reshape(-1))


_REPACKERS = {T.Q4_0: _repack_q4_0, T.Q4_1: _repack_q4_1, T.Q4_K: _repack_q4_k}

# exact int8 (codes, scale per group): (group, bytes [n, type_size] -> codes [n, ...], scales [n, ...])
_INT8_REPACKERS = {
    T.Q8_0: (32, lambda b: (_view(b[:, 2:34], torch.int8), _f16(b, 0))),
    T.Q5_0: (32, lambda b: (((_nibbles(b[:, 6:22]) | (_qh32(b, 2) << 4)).to(torch.int8) - 16), _f16(b, 0))),
    T.IQ4_NL: (32, lambda b: (_codebook(b.device)[_nibbles(b[:, 2:18]).long()].to(torch.int8), _f16(b, 0))),
    T.IQ4_XS: (32, _iq4_xs_parts),
    T.MXFP4: (32, _mxfp4_parts),
    T.Q6_K: (16, _q6_k_parts),
    T.Q3_K: (16, _q3_k_parts),
}
# exact int8 with zero points, x = scale*q - low per group: (group, bytes -> codes, scales, lows)
_INT8_ZERO_REPACKERS = {
    T.Q5_1: (32, lambda b: (_nibbles(b[:, 8:24]) | (_qh32(b, 4) << 4), _f16(b, 0), -_f16(b, 2))),
    T.Q5_K: (32, _q5_k_parts),
    T.Q2_K: (16, _q2_k_parts),
}
REPACKABLE = tuple(_REPACKERS) + tuple(_INT8_REPACKERS) + tuple(_INT8_ZERO_REPACKERS)


def kept_as(qtype: int) -> Optional[tuple[Quant, int, bool]]:
    """(format, group size, has zero points) that ``repack`` gives a type, or None (decoded)."""
    try:
        qt = T(int(qtype))
    except ValueError:
        return None
    if qt in _REPACKERS:
        return Quant.INT4, 32, qt is not T.Q4_0
    if qt in _INT8_REPACKERS:
        return Quant.INT8, _INT8_REPACKERS[qt][0], False
    if qt in _INT8_ZERO_REPACKERS:
        return Quant.INT8, _INT8_ZERO_REPACKERS[qt][0], True
    return None


def kept_bytes(qtype: int, numel: int) -> Optional[int]:
    """Bytes a tensor of ``numel`` weights takes once kept (codes, float32 scales and zeros)."""
    kind = kept_as(qtype)
    if kind is None:
        return None
    fmt, group, zeros = kind
    return (numel // 2 if fmt is Quant.INT4 else numel) + numel // group * 4 * (2 if zeros else 1)


def repack(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> Optional[QuantizedWeight]:
    """The bytes as a :class:`QuantizedWeight` of ``shape`` (torch order, ``[..., out, in]``) in the
    kt-core format that holds the blocks exactly: Q4_0 / Q4_1 / Q4_K as int4 groups of 32 (Q4_0
    symmetric and bit exact, the others with zero points); Q8_0, Q5_0, IQ4_NL, IQ4_XS as int8
    groups of 32 and Q6_K, Q3_K as int8 groups of 16 (bit exact); Q5_1, Q5_K (groups of 32) and Q2_K
    (16) as int8 with zero points (exact up to float32 rounding of ``zero = low / scale``). ``None``
    for any other type (dequantize those)."""
    try:
        qt = T(int(qtype))
    except ValueError:
        return None
    if qt not in REPACKABLE:
        return None
    qt, flat, block, size = _check(raw, qt, shape)
    shape = tuple(int(s) for s in shape)
    numel = flat.numel() // size * block
    if qt in _INT8_REPACKERS or qt in _INT8_ZERO_REPACKERS:
        return _repack_int8(qt, flat, block, size, shape, numel)
    groups = numel // 32
    qdata = torch.empty(numel // 2, dtype=torch.uint8, device=flat.device)
    scales = torch.empty(groups, dtype=torch.float32, device=flat.device)
    zeros = None if qt is T.Q4_0 else torch.empty(groups, dtype=torch.float32, device=flat.device)
    per_block = block // 32
    for b0, b in gb._chunks(flat, block, size):
        codes, scale, zero = _REPACKERS[qt](b)
        g0, g1 = b0 * per_block, (b0 + b.shape[0]) * per_block
        qdata[g0 * 16:g1 * 16] = _pack(codes).reshape(-1)
        scales[g0:g1] = scale
        if zeros is not None:
            zeros[g0:g1] = zero
    lead = shape[:-1]
    return QuantizedWeight(Quant.INT4, qdata.reshape(*lead, shape[-1] // 2), scales.reshape(*lead, shape[-1] // 32),
                           None if zeros is None else zeros.reshape(*lead, shape[-1] // 32), 32, shape[-1])


def _repack_int8(qt, flat, block, size, shape, numel) -> QuantizedWeight:
    """Types whose blocks are int8 codes times a scale per group of 16 or 32 (Q8_0, Q5_0, IQ4_NL,
    IQ4_XS, Q6_K, Q3_K), as grouped int8: exact; those with a min per group too (Q5_1, Q5_K, Q2_K),
    as grouped int8 with zero points."""
    with_zeros = qt in _INT8_ZERO_REPACKERS
    group, parts = (_INT8_ZERO_REPACKERS if with_zeros else _INT8_REPACKERS)[qt]
    qdata = torch.empty(numel, dtype=torch.int8, device=flat.device)
    scales = torch.empty(numel // group, dtype=torch.float32, device=flat.device)
    zeros = torch.empty(numel // group, dtype=torch.float32, device=flat.device) if with_zeros else None
    for b0, b in gb._chunks(flat, block, size):
        e0, e1 = b0 * block, (b0 + b.shape[0]) * block
        if with_zeros:
            codes, scale, low = parts(b)
            codes, scale, zero = _asymmetric(codes.reshape(-1, group).to(torch.int8), scale.reshape(-1),
                                             low.reshape(-1))
            zeros[e0 // group:e1 // group] = zero
        else:
            codes, scale = parts(b)
        qdata[e0:e1] = codes.reshape(-1)
        scales[e0 // group:e1 // group] = scale.reshape(-1)
    lead, K = shape[:-1], shape[-1]
    return QuantizedWeight(Quant.INT8, qdata.reshape(*lead, K), scales.reshape(*lead, K // group),
                           None if zeros is None else zeros.reshape(*lead, K // group), group, K)
