"""Quantized dense projections (``quant.dense``) on the native CPU kernels.

An int8 / int4 / fp8 / w8a8 dense weight is repacked once, at load, into the experts' 16-row
panel layout (``native._pack_proj`` with one "expert") and then multiplied by the same panel
kernels, ISA variants included, as the experts (``native/linear_packed.inc``). Before this,
such a weight was dequantized to a full float matrix on every call, which made
``quant.dense=int8`` decode an order of magnitude slower than bf16.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from kt_backends.cpu import native
from kt_backends.cpu.hugepages import huge_empty
from kt_backends.cpu.native_abi import MAX_DIM, _check_rc, _index
from kt_backends.cpu.native_pack import _check_kind, _check_proj, _f16_scales
from kt_core.weights.quant import Quant, QuantizedWeight, int8_group_ok

log = logging.getLogger(__name__)


class _LinearArgs(ctypes.Structure):
    _fields_ = [("T", ctypes.c_int64), ("K", ctypes.c_int64), ("M", ctypes.c_int64), ("fmt", ctypes.c_int),
                ("group", ctypes.c_int), ("x", ctypes.c_void_p), ("data", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("data_bytes", ctypes.c_int64), ("out", ctypes.c_void_p), ("pool", ctypes.c_int),
                ("round_bf16", ctypes.c_int), ("scale_f16", ctypes.c_int), ("pad", ctypes.c_int)]


@dataclass
class PackedLinear:
    """A dense weight ``[M, K]`` in the native panel layout; ``shape`` is the logical one."""

    fmt: str
    group: int
    proj: "native.PackedProj"
    out_features: int
    in_features: int
    pool: int = 0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def format(self) -> Quant:
        return Quant(self.fmt)

    def nbytes(self) -> int:
        p = self.proj
        return sum(t.numel() * t.element_size() for t in (p.data, p.scale, p.zero) if t is not None)


def _lib() -> Optional[ctypes.CDLL]:
    if not native.available():
        return None
    lib = native._need()
    if not hasattr(lib, "kt_linear_packed"):
        return None
    if lib.kt_linear_packed.argtypes is None:
        lib.kt_linear_packed.argtypes = [ctypes.POINTER(_LinearArgs)]
        lib.kt_linear_args_size.restype = ctypes.c_int64
        if lib.kt_linear_args_size() != ctypes.sizeof(_LinearArgs):
            lib.kt_linear_packed.argtypes = None
            return None
    return lib


def _one(w: QuantizedWeight) -> QuantizedWeight:
    """The weight as one 'expert' (a leading dim of 1), as the expert packer takes it."""
    return QuantizedWeight(w.format, w.qdata[None], w.scales[None], None if w.zeros is None else w.zeros[None],
                           w.group_size, w.in_features)


def _consistent(w: QuantizedWeight) -> bool:
    """Codes, scales and zero points have the sizes in_features and group_size say: what the
    kernels read from them (the library checks the code bytes, not the scales)."""
    M, K, g = w.qdata.shape[0], w.in_features, w.group_size
    if not isinstance(g, int) or g <= 0 or K % g or (w.format is Quant.INT4 and K % 2):
        return False
    width = K // 2 if w.format is Quant.INT4 else K
    params = [t for t in (w.scales, w.zeros) if t is not None]
    return tuple(w.qdata.shape) == (M, width) and all(tuple(t.shape) == (M, K // g) for t in params)


def pack_linear(w, in_place: bool = False) -> Optional[PackedLinear]:
    """The packed form of a quantized dense weight, or None when the kernels do not take it
    (then the torch path keeps serving it). ``in_place``: the codes are the caller's to give up, and
    their panels are laid out in their own memory where the layout allows (no second copy of the
    codes alive: a 151936 x 2048 int8 LM head's 311 MB)."""
    if not isinstance(w, QuantizedWeight) or w.device.type != "cpu" or w.qdata.dim() != 2 or _lib() is None:
        return None
    M, K = w.shape
    if not _consistent(w):
        raise ValueError(f"quantized weight {tuple(w.shape)}: codes {tuple(w.qdata.shape)}, scales "
                         f"{tuple(w.scales.shape)} do not match in_features {K} in groups of {w.group_size}")
    if w.format in (Quant.INT8, Quant.W8A8):
        group = 0 if w.group_size == K else w.group_size
        if K % (4 if w.format is Quant.W8A8 else 2) or (group and (w.format is Quant.W8A8 or not int8_group_ok(group))):
            return None
        if w.zeros is not None and not group:  # zero points: grouped int8 only (GGUF Q5_1 / Q5_K / Q2_K)
            return None
    elif w.format is Quant.FP8:
        if w.zeros is not None:
            return None
        group = 0 if w.group_size == K else w.group_size
    elif w.format is Quant.INT4:
        group = w.group_size
        if group % 4 or group > 4096:
            return None
    else:
        return None
    data = native._pack_proj(_one(w), None, _f16_scales([w]), alloc=huge_empty, in_place=in_place)
    return PackedLinear(w.format.value, group, data, M, K)


_REPACK_LINEAR = "pack the weight with native_linear.pack_linear(QuantizedWeight)"


def check_packed_linear(w) -> int:
    """Everything the kernels read of a PackedLinear, against its sizes (a field changed after packing,
    e.g. its group, would have them read past its scales); its pool index."""
    where = "packed linear"
    if not isinstance(w, PackedLinear):
        raise ValueError(f"{where}: expected a PackedLinear, got {type(w).__name__}; {_REPACK_LINEAR}")
    if w.fmt not in native.FORMATS:
        raise ValueError(f"{where}: unknown format {w.fmt!r}; {_REPACK_LINEAR}")
    M = _index(w.out_features, f"{where}: out_features", 1, MAX_DIM)
    K = _index(w.in_features, f"{where}: in_features", 1, MAX_DIM)
    group = _index(w.group, f"{where}: group size", 0, MAX_DIM)
    _check_kind(where, "weight", w.fmt, group, K)
    _check_proj(where, "weight", w.proj, w.fmt, group, 1, M, K, _REPACK_LINEAR)
    return native._pool(w.pool)


def linear(x: torch.Tensor, w: PackedLinear, bias: Optional[torch.Tensor] = None,
           round_bf16: Optional[bool] = None) -> torch.Tensor:
    """``x @ W.T + bias`` on the packed weight; float32 math, x's dtype out. ``round_bf16``: the kernels
    may round x to bf16 (the AMX tiles); default: when x is bf16."""
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable for packed dense weights: {native.status()}")
    pool = check_packed_linear(w)
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or not (x.is_floating_point() and x.dim() >= 1):
        raise ValueError(f"linear: the input must be a floating-point CPU tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} on {getattr(x, 'device', '?')}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"linear: the input has {x.shape[-1]} features but the weight takes {w.in_features}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.device.type != "cpu"
                             or not bias.is_floating_point() or bias.numel() != w.out_features):
        raise ValueError(f"linear: bias must be {w.out_features} floating-point values on the CPU, got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))} on "
                         f"{getattr(bias, 'device', '?')}")
    lead = x.shape[:-1]
    xf = x.reshape(-1, w.in_features).float().contiguous()
    out = torch.empty(xf.shape[0], w.out_features, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    p = w.proj
    args = _LinearArgs(xf.shape[0], w.in_features, w.out_features, native.FORMATS[w.fmt], w.group, xf.data_ptr(),
                       p.data.data_ptr(), native._ptr(p.scale), native._ptr(p.zero), native._ptr(b),
                       p.data.numel() * p.data.element_size(), out.data_ptr(), pool,
                       int(x.dtype == torch.bfloat16 if round_bf16 is None else round_bf16), p.scale_f16)
    _check_rc(lib.kt_linear_packed(ctypes.byref(args)), f"linear on a packed {w.fmt} weight")
    return out.reshape(*lead, w.out_features).to(x.dtype)
