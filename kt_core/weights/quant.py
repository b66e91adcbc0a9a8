"""Weight quantization formats and the expert-weight container.

Formats (all quantize along the *input* dim, the last dim of a weight):

- ``int8``: symmetric, one float scale per output row (per channel), or per ``int8_group``
  inputs of a row (``group_size`` < ``in_features``; llama.cpp's Q8_0 is groups of 32).
- ``int4``: group-wise, ``group_size`` inputs share a scale (and, when
  asymmetric, a zero point); ``group_size`` 0: one group a row (kt-kernel's AMXInt4
  layout). Two 4-bit codes pack into one byte, the even
  input index in the low nibble. Symmetric codes are -8..7 (stored +8) and the
  scale may be negative, so all 16 levels are used (``_int4_symmetric``).
- ``fp8``: float8 e4m3 codes (stored as their bytes) with a float scale per
  (row, group of ``group_size`` inputs); DeepSeek-V3's 128x128 block scales are
  this with each block's scale repeated over its 128 rows (``from_fp8_blocks``).
  ``group_size`` 0 means one scale per row (per channel).
- ``w8a8``: the int8 weights above, and activations quantized to int8 per token
  (per row) on the fly: ``fake_quant_activations`` is the exact reference.

These are the reference encodings: native kernels may repack them into their
own layouts at load time, but they must dequantize to the same values.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

import torch

from kt_core.config.limits import INT8_MAX_GROUP, int8_group_ok  # noqa: F401 (the quantizer's limits)


class Quant(str, Enum):
    """Weight formats. ``NONE`` means the weights are in the activation dtype."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    FP8 = "fp8"
    W8A8 = "w8a8"


FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclass
class QuantizedWeight:
    """A quantized weight ``[..., out, in]``; leading dims (e.g. experts) are allowed."""

    format: Quant
    qdata: torch.Tensor  # int8 [..., out, in]; uint8 [..., out, in // 2] for int4; uint8 e4m3 bytes for fp8
    scales: torch.Tensor  # float32 [..., out, n_groups]
    zeros: Optional[torch.Tensor]  # float32 [..., out, n_groups]: asymmetric int4, and grouped int8
    #                                 kept from GGUF Q5_1 / Q5_K / Q2_K blocks (value = (code - zero) * scale)
    group_size: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.qdata.shape[:-1], self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def select(self, index: int) -> "QuantizedWeight":
        """The weight of one entry along the first leading dim (one expert)."""
        return QuantizedWeight(self.format, self.qdata[index], self.scales[index],
                               None if self.zeros is None else self.zeros[index],
                               self.group_size, self.in_features)

    def to(self, device: Union[str, torch.device]) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.qdata.to(device), self.scales.to(device),
                               None if self.zeros is None else self.zeros.to(device),
                               self.group_size, self.in_features)

    def nbytes(self) -> int:
        n = self.qdata.numel() * self.qdata.element_size() + self.scales.numel() * 4
        return n + (0 if self.zeros is None else self.zeros.numel() * 4)


Weight = Union[torch.Tensor, QuantizedWeight]


def _check_groups(in_features: int, group_size: int, key: str = "quant.group_size") -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{key}={group_size} must divide the input dim {in_features}; "
                         f"pick one of 32, 64, 128 that divides it")


CHUNK_ELEMENTS = 1 << 22  # weights converted to float32 at a time while quantizing (16 MB)
# int4's fits make tens of passes over a chunk: in 1 MB chunks they stay in L2 (a 4M-weight
# tensor, 2 threads: asymmetric 0.19 -> 0.07 s, symmetric 0.041 -> 0.022 s)
INT4_CHUNK_ELEMENTS = 1 << 18
# asymmetric int4's fit: it starts from the group's range shrunk by these fractions (the extremes then
# clip) and refits the least-squares line through the codes this many times from each (one source for
# this path and the native one, backends/cpu/native/quantize_load.inc, which takes them as arguments)
INT4_ASYM_SHRINKS = (0.0, 0.05, 0.1)
INT4_ASYM_REFITS = 3


def _int4_symmetric(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes -8..7 and a scale per group of ``g [rows, groups, group]`` using all 16 levels.

    Two starting scales, the group's largest-magnitude value over -8 (it lands on code -8, so the
    scale may be negative: a positive maximum then takes the -8 end) and its magnitude over 7, each
    refined once to the least-squares scale for the codes it gave; the group keeps whichever
    reconstructs it with less squared error. Against amax/7 alone this cuts the weight error's
    energy by about a quarter on Gaussian and heavy-tailed weights."""
    peak = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True))
    best_q = best_d = best_err = None
    for start in (peak / -8.0, peak.abs() / 7.0):
        d = torch.where(start == 0, torch.ones_like(start), start)
        q = torch.round(g / d).clamp_(-8, 7)
        qq = (q * q).sum(dim=-1, keepdim=True)
        ls = (g * q).sum(dim=-1, keepdim=True) / qq.clamp_min(1.0)
        d = torch.where((qq > 0) & (ls != 0), ls, d)
        q = torch.round(g / d).clamp_(-8, 7)
        err = (g - q * d).square_().sum(dim=-1, keepdim=True)
        if best_err is None:
            best_q, best_d, best_err = q, d, err
        else:
            better = err < best_err
            best_q, best_d = torch.where(better, q, best_q), torch.where(better, d, best_d)
            best_err = torch.minimum(err, best_err)
    return best_q + 8, best_d  # codes stored biased to 0..15


def _int4_asymmetric(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..15, a scale and a zero point per group of ``g [rows, groups, group]``:
    value = (code - zero) * scale, the zero point a float (as GGUF Q4_K's mins are), not a code.

    From the group's range and from that range shrunk by 5% and 10% (the extremes then clip), the
    codes are refitted three times to the least-squares line through them (scale and offset);
    the group keeps whichever reconstructs it with less squared error. Against min / max with an
    integer zero point this cuts the weight error's energy by a fifth (Gaussian weights) to a
    quarter (Student-t, 3 degrees of freedom)."""
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    gm = g.mean(dim=-1, keepdim=True)
    flat = hi - lo < 1e-12  # a constant group: scale |value| or 1 (zero point -1, 0 or 1, not -value / 1e-12)
    best = None
    for shrink in INT4_ASYM_SHRINKS:
        b = lo + (hi - lo) * (shrink / 2)
        s = torch.where(flat, lo.abs() + (lo == 0).float(), (hi - lo) * (1 - shrink) / 15.0).clamp_min(1e-12)
        for _ in range(INT4_ASYM_REFITS):
            q = torch.round((g - b) / s).clamp_(0, 15)
            qm = q.mean(dim=-1, keepdim=True)
            var = (q - qm).square().sum(dim=-1, keepdim=True)
            fit = ((q - qm) * (g - gm)).sum(dim=-1, keepdim=True) / var.clamp_min(1e-12)
            ok = (var > 0) & (fit > 1e-12)
            s, b = torch.where(ok, fit, s), torch.where(ok, gm - fit * qm, b)
        q = torch.round((g - b) / s).clamp_(0, 15)
        err = (g - (q * s + b)).square_().sum(dim=-1, keepdim=True)
        if best is None:
            best = [q, s, b, err]
        else:
            better = err < best[3]
            best = [torch.where(better, new, old) for new, old in zip((q, s, b), best[:3])] + [torch.minimum(err, best[3])]
    q, s, b = best[:3]
    return q, s, -b / s


def fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """Group scales rounded to the nearest fp16 values (the packed weights then keep them in 2 bytes
    instead of 4, as GGUF's Q8_0 does), each kept as it is where its fp16 value would be past fp16's range or
    vanish. The codes are computed from the rounded scale, so its own precision adds almost no
    error: a scale rounded down by at most half an fp16 step clips the group's largest weight by
    under 0.07 of a code step. Rounding up instead measured a worse KL on the 8-layer benchmark model
    (0.0068 vs 0.0058, same weight error energy), so nearest it is."""
    near = scale.half().float()
    return torch.where(torch.isfinite(near) & (near > 0), near, scale)


def _int4_fp16(g: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> tuple:
    """int4 codes, scale and zero point (None: symmetric, zero 8) of ``g [rows, groups, group]`` with
    the scale and zero point rounded to the nearest fp16 values and the codes taken anew for them, so
    the packed weights keep them in 2 bytes each (GGUF's 16-bit block scales; int4 g32's scale and zero
    point otherwise cost 8 bytes a 16-byte group). Rounding moves a scale by at most 2^-11 of itself and
    a zero point by at most 2^-8 of a code: a twentieth of the half code step the codes already round.
    A group whose values would not survive fp16 (past its range, or a nonzero scale that would vanish)
    keeps ``codes`` and its float32 values (the weight then packs with float32 scales)."""
    s = scale.half().float()
    z = None if zero is None else zero.half().float()
    ok = torch.isfinite(s) & ((s != 0) | (scale == 0))
    if z is not None:
        ok &= torch.isfinite(z)
    d = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(g / d + (8.0 if z is None else torch.where(ok, z, 0.0))).clamp_(0, 15)
    return (torch.where(ok, q, codes), torch.where(ok, s, scale),
            None if z is None else torch.where(ok, z, zero))


def fp16_exact(t: Optional[torch.Tensor]) -> bool:
    """Whether every value of t is a finite fp16 value (so a 2-byte copy loses nothing)."""
    if t is None or not t.dtype.is_floating_point:
        return False
    if t.dtype == torch.float16:
        return bool(torch.isfinite(t).all())
    h = t.half()
    return bool(torch.isfinite(h).all()) and bool((h.float() == t.float()).all())


def codes_empty(shape, dtype: torch.dtype, alloc=None) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor for a weight's codes: from ``alloc(shape, dtype)`` (a backend's
    ``dense_empty``: the CPU's huge pages, where its packer may then lay the panels out in place) when it
    gives one, else torch's."""
    out = None if alloc is None else alloc(tuple(shape), dtype)
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype)
    if not (out.is_contiguous() and tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.device.type == "cpu"):
        raise ValueError(f"the codes' allocator gave a {out.dtype} tensor of shape {tuple(out.shape)}; it must give "
                         f"a contiguous {dtype} CPU tensor of shape {tuple(shape)}, or None")
    return out


def rows_into(out: Optional["QuantizedWeight"], q: "QuantizedWeight", lo: int, total: int,
              alloc=None) -> "QuantizedWeight":
    """A weight of ``total`` rows quantized a block of rows at a time: ``q`` (its rows [lo, lo + len)) written
    into ``out``, which the first block makes (None: from q's formats and widths; codes from ``alloc``,
    ``codes_empty``). Each row's codes and scales depend on that row alone: the whole weight's result."""
    if out is None:
        def like(t):
            return torch.empty((total, *t.shape[1:]), dtype=t.dtype)

        out = QuantizedWeight(q.format, codes_empty((total, *q.qdata.shape[1:]), q.qdata.dtype, alloc), like(q.scales),
                              None if q.zeros is None else like(q.zeros), q.group_size, q.in_features)
    n = q.qdata.shape[0]
    out.qdata[lo:lo + n] = q.qdata
    out.scales[lo:lo + n] = q.scales
    if q.zeros is not None:
        out.zeros[lo:lo + n] = q.zeros
    return out


def _native(fmt: Quant, rows: torch.Tensor, group: int, symmetric: bool, alloc=None) -> Optional[tuple]:
    """The same int4 fits (scales rounded to fp16 values) or int8 (fp16 scales when grouped) on the
    native CPU kernels, one pass per group: (codes, scales, zero points or None), or None where they
    do not run (then the torch path)."""
    try:
        from kt_backends.cpu import native_quant
    except ImportError:  # kt-core installed without its CPU backend
        return None
    if fmt is Quant.INT8:
        out = native_quant.try_int8(rows, group, group < rows.shape[-1], alloc)
        return None if out is None else (*out, None)
    return native_quant.try_int4(rows, group, symmetric, True, INT4_ASYM_SHRINKS, INT4_ASYM_REFITS, alloc)


def quantize(weight: torch.Tensor, fmt: Union[Quant, str], group_size: int = 128,
             symmetric: bool = True, int8_group: int = 0, alloc=None) -> Weight:
    """Quantize a float weight ``[..., out, in]`` into ``fmt`` (``none`` returns it unchanged).
    ``group_size`` is int4's and fp8's group, ``int8_group`` int8's (0: one scale per row, for each).
    Rows are converted to float32 a chunk at a time, so the peak beyond the result is bounded.
    ``alloc``: the codes' memory (``codes_empty``)."""
    fmt = Quant(fmt)
    if fmt is Quant.NONE:
        return weight
    in_features = weight.shape[-1]
    if fmt is Quant.INT8:
        group = int8_group if 0 < int8_group < in_features else in_features
    elif fmt is Quant.W8A8 or (fmt in (Quant.FP8, Quant.INT4) and group_size <= 0):
        group = in_features
    else:
        group = group_size
    _check_groups(in_features, group, "quant.int8_group_size" if fmt is Quant.INT8 else "quant.group_size")
    if fmt is Quant.INT4 and in_features % 2:
        raise ValueError(f"int4 needs an even input dim, got {in_features}")
    lead, G = weight.shape[:-1], in_features // group
    rows = weight.reshape(-1, in_features)
    native = _native(fmt, rows, group, symmetric, alloc) if fmt in (Quant.INT8, Quant.INT4) else None
    if native is not None:
        codes, scales, zeros = native
        return QuantizedWeight(fmt, codes.reshape(*lead, -1), scales.reshape(*lead, G),
                               None if zeros is None else zeros.reshape(*lead, G), group, in_features)
    n = rows.shape[0]
    width = in_features // 2 if fmt is Quant.INT4 else in_features
    qdata = codes_empty((n, width), torch.int8 if fmt in (Quant.INT8, Quant.W8A8) else torch.uint8, alloc)
    scales = torch.empty(n, G, dtype=torch.float32)
    zeros = torch.empty(n, G, dtype=torch.float32) if fmt is Quant.INT4 and not symmetric else None
    step = max(1, (INT4_CHUNK_ELEMENTS if fmt is Quant.INT4 else CHUNK_ELEMENTS) // in_features)
    for r0 in range(0, n, step):
        g = rows[r0:r0 + step].float().reshape(-1, G, group)
        if fmt is Quant.FP8:
            scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
            q = (g / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        elif fmt in (Quant.INT8, Quant.W8A8):
            scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
            if fmt is Quant.INT8 and group < in_features:
                scale = fp16_scales(scale)
            q = torch.round(g / scale).clamp_(-127, 127).to(torch.int8)
        else:
            codes, scale, zero = (*_int4_symmetric(g), None) if symmetric else _int4_asymmetric(g)
            codes, scale, zero = _int4_fp16(g, codes, scale, zero)
            if zero is not None:
                zeros[r0:r0 + step] = zero.squeeze(-1)
            codes = codes.to(torch.uint8).reshape(g.shape[0], in_features)
            q = codes[:, 0::2] | (codes[:, 1::2] << 4)
        qdata[r0:r0 + step] = q.reshape(g.shape[0], width)
        scales[r0:r0 + step] = scale.squeeze(-1)
    return QuantizedWeight(fmt, qdata.reshape(*lead, width), scales.reshape(*lead, G),
                           None if zeros is None else zeros.reshape(*lead, G), group, in_features)


def dequantize(weight: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight a quantized weight stands for (identity on plain tensors)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    if weight.format in (Quant.INT8, Quant.W8A8, Quant.FP8):
        v = weight.qdata.view(torch.float8_e4m3fn).float() if weight.format is Quant.FP8 else weight.qdata.float()
        g = v.reshape(*v.shape[:-1], weight.in_features // weight.group_size, weight.group_size)
        if weight.zeros is not None:
            g = g - weight.zeros.unsqueeze(-1)
        return (g * weight.scales.unsqueeze(-1)).reshape(v.shape).to(dtype)
    packed = weight.qdata
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], weight.in_features)
    n_groups = weight.in_features // weight.group_size
    g = codes.float().reshape(*codes.shape[:-1], n_groups, weight.group_size)
    zero = (torch.full_like(weight.scales, 8.0) if weight.zeros is None else weight.zeros).unsqueeze(-1)
    return ((g - zero) * weight.scales.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def from_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> QuantizedWeight:
    """A float8 e4m3 checkpoint weight ``[out, in]`` with per-block scales ``[ceil(out/b), ceil(in/b)]``
    (DeepSeek-V3's ``weight_scale_inv``: the float value is ``code * scale``), kept as fp8."""
    out_f, in_f = weight.shape[-2:]
    if in_f % block:
        raise ValueError(f"fp8 block scales need the input dim {in_f} to be a multiple of {block}")
    want = ((out_f + block - 1) // block, in_f // block)
    if tuple(scale_inv.shape[-2:]) != want:
        raise ValueError(f"fp8 weight {tuple(weight.shape)} needs block scales of shape {want}, "
                         f"got {tuple(scale_inv.shape)}")
    rows = scale_inv.float().repeat_interleave(block, dim=-2)[..., :out_f, :]
    return QuantizedWeight(Quant.FP8, weight.contiguous().view(torch.uint8), rows.contiguous(), None, block, in_f)


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """What w8a8 kernels compute with: each row quantized to int8 with scale amax/127, dequantized."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127.0
    return (torch.round(xf / scale).clamp_(-127, 127) * scale).to(x.dtype)


def weight_format(weight: Weight) -> Quant:
    return Quant.NONE if isinstance(weight, torch.Tensor) else weight.format


@dataclass
class ExpertWeights:
    """The experts one device holds for one MoE layer.

    gate, up: ``[E_local, I, H]``; down: ``[E_local, H, I]``; each a tensor or a
    :class:`QuantizedWeight` with the expert as leading dim. ``expert_ids`` are
    the global ids of the local experts, in the order of the leading dim.
    Optional biases (GPT-OSS): gate_bias/up_bias ``[E_local, I]``, down_bias ``[E_local, H]``.
    """

    expert_ids: torch.Tensor
    gate: Weight
    up: Weight
    down: Weight
    gate_bias: Optional[torch.Tensor] = None
    up_bias: Optional[torch.Tensor] = None
    down_bias: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        n = int(self.expert_ids.numel())
        for name in ("gate", "up", "down"):
            w = getattr(self, name)
            if w.shape[0] != n:
                raise ValueError(f"ExpertWeights.{name} holds {w.shape[0]} experts but expert_ids lists {n}")
        if len({int(i) for i in self.expert_ids.tolist()}) != n:
            raise ValueError("ExpertWeights.expert_ids has duplicates")

    @property
    def format(self) -> Quant:
        return weight_format(self.gate)

    def nbytes(self) -> int:
        total = 0
        for w in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias):
            if w is None:
                continue
            total += w.nbytes() if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
        return total
