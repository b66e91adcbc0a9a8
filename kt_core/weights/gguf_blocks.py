"""Torch decoders of GGML's block quantization types.

A GGML tensor is a sequence of blocks along each row; every block holds ``block_size``
elements in ``type_size`` bytes (both from ``gguf.constants.GGML_QUANT_SIZES``). Rows are whole
blocks, so the tensor's bytes are one flat run of blocks and the flat float32 result is the
blocks' values one after the other: both entry points walk the blocks a chunk at a time, which
bounds the temporaries whatever the row length.

- :func:`dequantize` turns the bytes of a tensor into float32 of its logical shape (torch order:
  a GGUF tensor of gguf shape ``[ne0, ne1]`` is ``[ne1, ne0]`` here).
- :mod:`kt_core.weights.gguf_repack` re-encodes the types a kt-core format holds exactly, from the
  block parts decoded here (``_q4_k_parts`` and the like).

Byte layouts (little-endian; ``f16`` an IEEE half; "lo/hi" the low/high nibble):

- Q4_0 ``f16 d, u8 qs[16]``: element j is lo(qs[j]), element j+16 is hi(qs[j]); x = d*(q-8).
- Q4_1 ``f16 d, f16 m, u8 qs[16]``: as Q4_0 with x = d*q + m.
- Q5_0 / Q5_1: Q4_0 / Q4_1 with ``u32 qh`` after the scales: bit j is element j's 5th bit;
  x = d*(q-16) / d*q + m.
- Q8_0 ``f16 d, i8 qs[32]``: x = d*q.
- Super-blocks of 256 (K types, IQ4_XS) are in two halves of 128 for Q2_K/Q3_K/Q6_K, whose 2-bit
  fields take byte l, bit pair s to element 32*s + l of the half; see each decoder.
- IQ4_NL / IQ4_XS index a 16-entry non-linear codebook with their 4-bit codes.
"""
from __future__ import annotations

from typing import Callable

import torch
from gguf import quants as _gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

__all__ = ["CHUNK_ELEMENTS", "SUPPORTED", "dequantize"]

CHUNK_ELEMENTS = 1 << 21  # elements decoded at a time: ~8 MB of float32, the temporaries a few times that
_IQ4NL_VALUES = tuple(_gguf_quants.IQ4_NL.kvalues)  # kvalues_iq4nl, the format's codebook (gguf owns it)
_MXFP4_VALUES = tuple(_gguf_quants.MXFP4.kvalues)  # e2m1 values doubled (integers), gguf's table


# ---- small helpers over a chunk of blocks ``b``: uint8 [n_blocks, type_size] ----

def _view(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret contiguous bytes as ``dtype`` (copied first when the offset is misaligned)."""
    x = x.contiguous()
    if x.storage_offset() % torch.empty((), dtype=dtype).element_size():
        x = x.clone()
    return x.view(dtype)


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The half at byte ``off`` of every block, as float32 [n, 1]."""
    return _view(b[:, off:off + 2], torch.float16).float()


def _shifts(*s: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: the 16 low nibbles, then the 16 high ones."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8, k] bits: [.., i, j] is bit i of byte j."""
    return (x.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8, device=x.device).view(8, 1)) & 1


def _qh32(b: torch.Tensor, off: int) -> torch.Tensor:
    """The little-endian u32 at ``off`` as [n, 32] bits, bit j for element j."""
    return _bits(b[:, off:off + 4]).transpose(1, 2).reshape(-1, 32)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and mins. Bytes 0-3 hold scales 0-3 (low 6 bits),
    4-7 mins 0-3; bytes 8-11 hold the low nibbles of scales 4-7 (lo) and mins 4-7 (hi), whose top
    two bits are the spare top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    a, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 0x3F, (md & 0xF) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 6) << 4)), dim=-1)
    return sc.float(), mn.float()


def _codebook(device: torch.device) -> torch.Tensor:
    return torch.tensor(_IQ4NL_VALUES, dtype=torch.float32, device=device)


# ---- decoders: uint8 [n, type_size] -> float32 [n, block_size] ----

def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b):
    return _nibbles(b[:, 4:20]).float() * _f16(b, 0) + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_qh32(b, 2) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_qh32(b, 4) << 4)
    return q.float() * _f16(b, 0) + _f16(b, 2)


def _q8_0(b):
    return _f16(b, 0) * _view(b[:, 2:34], torch.int8).float()


def _q2_k(b):
    q, dl, ml = _q2_k_parts(b)
    return (dl.unsqueeze(-1) * q.float() - ml.unsqueeze(-1)).reshape(b.shape[0], 256)


def _q2_k_parts(b):
    """Q2_K codes 0..3 [n, 16, 16] (int8), each 16's scale and min [n, 16]: x = scale*q - min."""
    # scales[16] (lo: scale, hi: min of each 16), qs[64], f16 d, f16 dmin; x = d*sc*q - dmin*mn
    n, sc = b.shape[0], b[:, 0:16]
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(4, 1)) & 3
    return (q.reshape(n, 16, 16).to(torch.int8), _f16(b, 80) * (sc & 0xF).float(),
            _f16(b, 82) * (sc >> 4).float())


def _q3_k(b):
    q, d = _q3_k_parts(b)
    return (d.unsqueeze(-1) * q.float()).reshape(b.shape[0], 256)


def _q3_k_parts(b):
    """Q3_K codes -4..3 [n, 16, 16] (int8) and the scale of each 16 [n, 16]."""
    # hmask[32], qs[64] (2 low bits), scales[12] (16 x 6 bits, -32), f16 d; q = low - 4 when the
    # hmask bit is 0 (a set bit means no offset)
    n, s = b.shape[0], b[:, 96:108]
    low = torch.cat((s[:, 0:8] & 0xF, s[:, 0:8] >> 4), dim=-1)
    high = (s[:, 8:12].unsqueeze(1) >> _shifts(0, 2, 4, 6, device=b.device).view(4, 1)) & 3
    sc = (low | (high.reshape(n, 16) << 4)).float() - 32
    ql = (b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(4, 1)) & 3
    hm = _bits(b[:, 0:32])  # [n, 8, 32]: bit i of byte l is element 32*i + l
    q = ql.reshape(n, 256).to(torch.int8) - ((1 - hm.reshape(n, 256)) << 2).to(torch.int8)
    return q.reshape(n, 16, 16), _f16(b, 108) * sc


def _q4_k_parts(b):
    """Q4_K (also Q5_K's head): f16 d, f16 dmin, scales[12], then codes: the codes [n, 8, 32] of
    qs[128] (per 32 bytes: sub-block 2i in the low nibbles, 2i+1 in the high), scale and min [n, 8]."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, -128:].reshape(n, 4, 1, 32) >> _shifts(0, 4, device=b.device).view(2, 1)
    return (qs & 0xF).reshape(n, 8, 32), _f16(b, 0) * sc, _f16(b, 2) * mn


def _q4_k(b):
    q, scale, dmin = _q4_k_parts(b)
    return (scale.unsqueeze(-1) * q.float() - dmin.unsqueeze(-1)).reshape(b.shape[0], 256)


def _q5_k(b):
    q, scale, dmin = _q5_k_parts(b)
    return (scale.unsqueeze(-1) * q.float() - dmin.unsqueeze(-1)).reshape(b.shape[0], 256)


def _q5_k_parts(b):
    """Q5_K codes 0..31 [n, 8, 32] (uint8), each 32's scale and min [n, 8]: x = scale*q - min."""
    # Q4_K's head and codes with qh[32] (bytes 16..47) in between: bit i of byte l is the 5th bit
    # of element l of sub-block i
    q, scale, dmin = _q4_k_parts(b)
    return q | (_bits(b[:, 16:48]) << 4), scale, dmin


def _q6_k(b):
    q, d = _q6_k_parts(b)
    return (d.unsqueeze(-1) * q.float()).reshape(b.shape[0], 256)


def _q6_k_parts(b):
    """Q6_K codes -32..31 [n, 16, 16] (int8) and the scale of each 16 [n, 16]."""
    # ql[128] (per half: 64 bytes, low nibbles elements 0..63, high 64..127), qh[64] (per half: 32
    # bytes, bit pair s is element 32*s + l), int8 scales[16], f16 d; q = (lo | hi << 4) - 32
    n = b.shape[0]
    lo = (b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, device=b.device).view(2, 1)) & 0xF
    hi = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(4, 1)) & 3
    q = (lo.reshape(n, 256) | (hi.reshape(n, 256) << 4)).to(torch.int8) - 32
    return q.reshape(n, 16, 16), _f16(b, 208) * _view(b[:, 192:208], torch.int8).float()


def _iq4_nl(b):
    return _f16(b, 0) * _codebook(b.device)[_nibbles(b[:, 2:18]).long()]


def _mxfp4_parts(b):
    """MXFP4: an E8M0 byte (2^(e-127)) then 16 bytes of e2m1 nibbles (element j low, j+16 high).
    Codes are the e2m1 values doubled (integers in -12..12), so the scale is 2^(e-128)."""
    table = torch.tensor(_MXFP4_VALUES, dtype=torch.int8, device=b.device)
    scale = torch.ldexp(torch.ones(b.shape[0], device=b.device), b[:, 0].to(torch.int32) - 128)
    return table[_nibbles(b[:, 1:17]).long()], scale


def _mxfp4(b):
    q, d = _mxfp4_parts(b)
    return d.unsqueeze(-1) * q.float()


def _iq4_xs(b):
    q, dl = _iq4_xs_parts(b)
    return (dl.unsqueeze(-1) * q.float()).reshape(b.shape[0], 256)


def _iq4_xs_parts(b):
    """IQ4_XS codebook values [n, 8, 32] (int8) and each sub-block's scale [n, 8]."""
    # f16 d, u16 scales_h (2 bits per sub-block), scales_l[4] (a nibble per sub-block), qs[128]
    # (16 bytes per sub-block of 32, as IQ4_NL); sub-block scale = d * (6-bit value - 32)
    n = b.shape[0]
    sl = torch.stack((b[:, 4:8] & 0xF, b[:, 4:8] >> 4), dim=-1).reshape(n, 8)
    sh = torch.cat((b[:, 2:3].expand(n, 4), b[:, 3:4].expand(n, 4)), dim=-1)  # byte of sub-block j
    sh = (sh >> _shifts(0, 2, 4, 6, 0, 2, 4, 6, device=b.device)) & 3
    dl = _f16(b, 0) * ((sl | (sh << 4)).float() - 32)
    q = _nibbles(b[:, 8:136].reshape(n * 8, 16)).long()
    return _codebook(b.device)[q].to(torch.int8).reshape(n, 8, 32), dl


def _plain(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: _view(b, dtype).float()


_DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _plain(torch.float32), T.F16: _plain(torch.float16), T.BF16: _plain(torch.bfloat16),
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
    T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs, T.MXFP4: _mxfp4,
}
SUPPORTED = tuple(_DECODERS)


def _check(raw: torch.Tensor, qtype: int, shape: tuple[int, ...]) -> tuple[T, torch.Tensor, int, int]:
    """Validate; the type, the flat bytes, block size and type size."""
    names = ", ".join(t.name for t in SUPPORTED)
    try:
        qt = T(int(qtype))
    except ValueError:
        raise ValueError(f"unknown GGML type id {int(qtype)}; supported: {names}") from None
    if qt not in _DECODERS:
        raise ValueError(f"GGML type {qt.name} is not supported; supported: {names}")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 0 for s in shape):
        raise ValueError(f"{qt.name} tensor needs a shape of one or more non-negative dims, got {shape}")
    if raw.dtype != torch.uint8:
        raise ValueError(f"{qt.name} tensor bytes must be a uint8 tensor, got {raw.dtype}")
    block, size = GGML_QUANT_SIZES[qt]
    if shape[-1] % block:
        raise ValueError(f"{qt.name} tensor of shape {shape}: the last dim {shape[-1]} is not a multiple "
                         f"of the {qt.name} block size {block}")
    numel = 1
    for s in shape:
        numel *= s
    need = numel // block * size
    if raw.numel() != need:
        raise ValueError(f"{qt.name} tensor of shape {shape} needs {need} bytes, got {raw.numel()}")
    return qt, raw.reshape(-1), block, size


def _chunks(flat: torch.Tensor, block: int, size: int):
    """(first block, bytes [n, size]) for runs of blocks of about CHUNK_ELEMENTS elements."""
    n_blocks = flat.numel() // size
    step = max(1, CHUNK_ELEMENTS // block)
    for b0 in range(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        yield b0, flat[b0 * size:b1 * size].view(b1 - b0, size)


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of ``shape`` (torch order) that the GGML bytes ``raw`` of type ``qtype`` hold: float32
    values, rounded to ``dtype`` chunk by chunk when another is asked (no whole float32 copy)."""
    qt, flat, block, size = _check(raw, qtype, shape)
    decode = _DECODERS[qt]
    out = torch.empty(flat.numel() // size * block, dtype=dtype, device=flat.device)
    for b0, b in _chunks(flat, block, size):
        out[b0 * block:(b0 + b.shape[0]) * block] = decode(b).reshape(-1)
    return out.reshape(tuple(shape))
