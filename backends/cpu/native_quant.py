"""Load-time quantization on the native CPU kernels (``native/quantize_load.inc``). ``try_int4``: the fits
of ``kt_core.weights.quant`` (symmetric over 16 levels, asymmetric with a zero point, scales rounded to
fp16 values) in one pass per group instead of ~25 torch passes over the weights; ``quantize()`` runs
its torch reference when this returns None (no library, ``KT_NATIVE_QUANT=0``, a dtype or group the
kernel does not take). ``try_int8``: weight-only int8, exactly as the torch form. ``try_pack_int4``: int4
codes into the kernels' panel layout, for ``native_pack``."""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from kt_backends.cpu import native_lib
from kt_backends.cpu.native_abi import DTYPE_CODES, NR, _check_rc, _PackInt4Args, _QuantInt4Args, _QuantInt8Args
from kt_core.weights.quant import codes_empty

_DTYPES = {getattr(torch, name): code for name, code in DTYPE_CODES.items()}
_MAX_GROUP = 4096  # quantize_load.inc kQuantMaxGroup
_MAX_GROUP8 = 65536  # kQuantInt8MaxGroup
_MAX_STARTS, _MAX_REFITS = 16, 64  # kQuantMaxStarts, kQuantMaxRefits
_lib_fns: Optional[ctypes.CDLL] = None
_why: Optional[str] = None


def _lib() -> Optional[ctypes.CDLL]:
    """The library with kt_quantize_int4 / kt_pack_int4's signatures set, or None (``why_unavailable``)."""
    global _lib_fns, _why
    if _lib_fns is not None or _why is not None:
        return _lib_fns
    lib = native_lib._load()
    if lib is None:
        _why = f"native CPU kernels unavailable: {native_lib._why}"
        return None
    for name, args in (("kt_quantize_int4", _QuantInt4Args), ("kt_quantize_int8", _QuantInt8Args),
                       ("kt_pack_int4", _PackInt4Args)):
        try:
            fn, size = getattr(lib, name), getattr(lib, name + "_args_size")
        except AttributeError:
            _why = f"the built extension lacks {name}: reinstall kt-core"
            return None
        fn.argtypes = [ctypes.POINTER(args)]
        fn.restype = ctypes.c_int
        size.restype = ctypes.c_int64
        if size() != ctypes.sizeof(args):
            _why = f"{name}: argument layout mismatch between Python and the built extension: reinstall kt-core"
            return None
    _lib_fns = lib
    return lib


def why_unavailable() -> Optional[str]:
    return None if _lib() is not None else _why


def _takes(rows, group: int, max_group: int) -> bool:
    """Whether the quantization kernels take these weight rows [n, K] in groups of ``group``: the
    library loaded (and not KT_NATIVE_QUANT=0), a float32 / bf16 CPU matrix, groups of 8k inputs."""
    if os.environ.get("KT_NATIVE_QUANT", "1") == "0" or _lib() is None:
        return False
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.device.type != "cpu" or rows.dtype not in _DTYPES:
        return False
    K = rows.shape[1]
    return 8 <= group <= max_group and group % 8 == 0 and 0 < K < 1 << 24 and K % group == 0


def try_int4(rows: torch.Tensor, group: int, symmetric: bool, fp16: bool, shrinks, refits: int, alloc=None
             ) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """(codes uint8 [n, K/2] (input 2j in the low nibble), scale float32 [n, K/group], zero point
    float32 [n, K/group] or None when symmetric) of the weight rows ``rows [n, K]``, or None when the
    native kernel does not take them. ``fp16``: scales (and zero points) rounded to fp16 values,
    each group's codes taken anew for them (a group whose values would not survive fp16 keeps its
    float32 fit). ``shrinks`` / ``refits``: the asymmetric fit's starting ranges and refits. ``alloc``: the
    codes' memory (quant.codes_empty)."""
    if not _takes(rows, group, _MAX_GROUP):
        return None
    n, K = rows.shape
    if not symmetric and not (1 <= len(shrinks) <= _MAX_STARTS and 0 <= refits <= _MAX_REFITS):
        return None  # a fit the kernel does not take: the torch path runs it
    rows = rows.contiguous()
    codes = codes_empty((n, K // 2), torch.uint8, alloc)
    scale = torch.empty(n, K // group, dtype=torch.float32)
    zero = None if symmetric else torch.empty(n, K // group, dtype=torch.float32)
    lo = torch.tensor([s / 2 for s in shrinks], dtype=torch.float32)
    width = torch.tensor([1 - s for s in shrinks], dtype=torch.float32)
    if n:
        args = _QuantInt4Args(n, K, group, _DTYPES[rows.dtype], int(symmetric), int(fp16), len(shrinks), int(refits),
                              0, lo.data_ptr(), width.data_ptr(), rows.data_ptr(), codes.data_ptr(),
                              scale.data_ptr(), None if zero is None else zero.data_ptr())
        _check_rc(_lib_fns.kt_quantize_int4(ctypes.byref(args)), "quantize_int4")
    return codes, scale, zero


def try_int8(rows: torch.Tensor, group: int, fp16: bool, alloc=None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(codes int8 [n, K], scale float32 [n, K/group]) of the weight rows ``rows [n, K]`` as
    ``quantize()``'s int8 computes them (the largest magnitude over 127; ``fp16``: scales rounded to
    fp16 values where they stay finite and positive), or None when the native kernel does not take them.
    ``alloc``: the codes' memory (quant.codes_empty)."""
    if not _takes(rows, group, _MAX_GROUP8):
        return None
    n, K = rows.shape
    rows = rows.contiguous()
    codes = codes_empty((n, K), torch.int8, alloc)
    scale = torch.empty(n, K // group, dtype=torch.float32)
    if n:
        args = _QuantInt8Args(n, K, group, _DTYPES[rows.dtype], int(fp16), 0, rows.data_ptr(), codes.data_ptr(),
                              scale.data_ptr())
        _check_rc(_lib_fns.kt_quantize_int8(ctypes.byref(args)), "quantize_int8")
    return codes, scale


def try_pack_int4(qdata: torch.Tensor, alloc=None) -> Optional[torch.Tensor]:
    """int4 codes [E, M, K/2] (input 2j in the low nibble of byte j) in the kernels' quad layout
    [E, P, K/4, 32] (native_pack._int4_quads says it; rows past M zero) in memory from ``alloc(shape,
    dtype)``, or None without the library."""
    if _lib() is None or not isinstance(qdata, torch.Tensor) or qdata.dim() != 3 or qdata.dtype != torch.uint8 \
            or qdata.device.type != "cpu":
        return None
    E, M, half = qdata.shape
    if half % 2 or not 0 < M < 1 << 24 or not 0 < half < 1 << 23:
        return None
    qdata = qdata.contiguous()
    P = -(-M // NR)
    shape = (E, P, half // 2, 2 * NR)
    out = codes_empty(shape, torch.uint8, alloc)
    if E:
        args = _PackInt4Args(E, M, 2 * half, 0, qdata.data_ptr(), out.data_ptr())
        _check_rc(_lib_fns.kt_pack_int4(ctypes.byref(args)), "pack_int4")
    return out
