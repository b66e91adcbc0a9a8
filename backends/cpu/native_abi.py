"""The native CPU kernels' C ABI as Python sees it: format and activation codes, limits, the
library's error codes and their messages, the argument structs, and integer checking.
One place for what native.py, native_pack.py and native_linear.py share."""
from __future__ import annotations

import ctypes
import operator

NR = 16
FORMATS = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3, "w8a8": 4}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2, "silu_clamp10": 3}
# 9: int8 takes groups (scale [P][K/g][16]); 10: down's own format (MoeArgs.down_fmt); 11: activation 3,
# silu_clamp10 (DeepSeek-V4's clamped SwiGLU)
ABI_VERSION = 11
MAX_POOLS = 64  # logical CPU devices cpu:0..cpu:63, one thread pool each
MAX_THREADS = 4096  # per pool
MAX_DIM = 1 << 24  # hidden size, expert width, tokens per call, expert ids: what the library accepts
MAX_TOPK = 4096

# the library's error codes (kt_cpu.cpp, enum Error): exception type, what is wrong and what to do
_ERRORS = {
    -1: (ValueError, "topk_ids holds a negative expert id; routes carry global expert ids >= 0 (ids past "
                     "the packed experts are other devices' and are skipped)"),
    -2: (ValueError, f"thread pool index out of range; pools are 0..{MAX_POOLS - 1} (cpu:0..cpu:{MAX_POOLS - 1})"),
    -3: (ValueError, "unknown weight format code (or zero points on a format without them); pack the experts "
                     "with native.pack()"),
    -4: (ValueError, f"unknown activation code; use one of {', '.join(ACTIVATIONS)}"),
    -5: (ValueError, f"a size is out of range (negative, zero, or above {MAX_DIM}); check the shapes passed"),
    -6: (ValueError, "a buffer the call needs was not passed (null pointer)"),
    -7: (ValueError, "the group size does not fit the format and the hidden / expert widths; pack the experts "
                     "with native.pack()"),
    -8: (ValueError, "the expert map points past the packed experts; pack the experts with native.pack()"),
    -9: (ValueError, "a projection's per-expert stride is smaller than one expert's panels; pack the experts "
                     "with native.pack()"),
    -10: (RuntimeError, "the worker threads could not be started; ask for fewer (native.set_threads)"),
    -11: (MemoryError, "the native kernels ran out of memory; pass fewer tokens per call or free memory"),
    -12: (RuntimeError, "internal error in the native kernels (a C++ exception); please report it with "
                        "`kt doctor` output"),
}


def _check_rc(rc: int, what: str) -> None:
    """Raise the Python exception for a library error code (0: success)."""
    if rc == 0:
        return
    exc, msg = _ERRORS.get(int(rc), (RuntimeError, f"unknown error code {rc}; the library and native.py "
                                                   "disagree: reinstall kt-core"))
    raise exc(f"native {what}: {msg}")


class _Proj(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("data_stride", ctypes.c_int64), ("param_stride", ctypes.c_int64)]


class _MoeArgs(ctypes.Structure):
    _fields_ = [("T", ctypes.c_int64), ("H", ctypes.c_int64), ("I", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("n_local", ctypes.c_int64), ("n_global", ctypes.c_int64), ("fmt", ctypes.c_int),
                ("group", ctypes.c_int), ("activation", ctypes.c_int), ("x", ctypes.c_void_p),
                ("ids", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("local_of", ctypes.c_void_p),
                ("gate", _Proj), ("up", _Proj), ("down", _Proj), ("out", ctypes.c_void_p), ("pool", ctypes.c_int),
                ("round_bf16", ctypes.c_int), ("down_fmt", ctypes.c_int), ("down_group", ctypes.c_int)]


def _index(value, what: str, lo: int, hi: int) -> int:
    """value as an int in lo..hi, or ValueError saying what it must be."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v
