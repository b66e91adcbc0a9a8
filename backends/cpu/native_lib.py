"""Loading the native CPU kernels' library, and what it says about itself (variant, threads).
Torch-free on purpose: ``kt devices`` and ``kt config`` ask it without importing torch.
``KT_NO_NATIVE=1`` turns the native path off; ``KT_NATIVE_LIB=<path>`` loads that build instead."""
from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from typing import Optional

from kt_backends.cpu.native_abi import ABI_VERSION, _MoeArgs

_lib: Optional[ctypes.CDLL] = None
_why: Optional[str] = None
_path: Optional[str] = None
_lock = threading.Lock()


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _why, _path
    with _lock:
        if _lib is not None or _why is not None:
            return _lib
        if os.environ.get("KT_NO_NATIVE", "") not in ("", "0"):
            _why = "disabled by KT_NO_NATIVE=1"
            return None
        override = os.environ.get("KT_NATIVE_LIB", "")
        if override:
            origin = override
            if not os.path.isfile(origin):
                _why = f"KT_NATIVE_LIB={override} is not a file; unset it to use the installed build"
                return None
        else:
            spec = importlib.util.find_spec("kt_backends.cpu._kt_cpu")
            if spec is None or not spec.origin:
                _why = ("not built (no C++ compiler when kt-core was installed?); install one and reinstall: "
                        "pip install -e .")
                return None
            origin = spec.origin
        try:
            lib = ctypes.CDLL(origin)
            if lib.kt_abi_version() != ABI_VERSION:
                _why = f"built extension has ABI {lib.kt_abi_version()}, expected {ABI_VERSION}: reinstall kt-core"
                return None
        except (OSError, AttributeError) as exc:
            _why = f"failed to load {origin}: {exc}"
            return None
        lib.kt_variant.restype = ctypes.c_char_p
        lib.kt_isa.restype = ctypes.c_uint32
        lib.kt_membw.restype = ctypes.c_double
        lib.kt_membw.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        lib.kt_moe_forward.argtypes = [ctypes.POINTER(_MoeArgs)]
        lib.kt_moe_forward.restype = ctypes.c_int
        lib.kt_moe_args_size.restype = ctypes.c_int64
        lib.kt_set_variant.argtypes = [ctypes.c_char_p]
        lib.kt_bf16_tile_tokens.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.kt_variant_supported.argtypes = [ctypes.c_char_p]
        lib.kt_set_threads.argtypes = [ctypes.c_int]
        lib.kt_set_threads.restype = ctypes.c_int
        lib.kt_threads.restype = ctypes.c_int
        lib.kt_set_pool_threads.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.kt_set_pool_threads.restype = ctypes.c_int
        lib.kt_pool_threads.argtypes = [ctypes.c_int]
        lib.kt_pool_threads.restype = ctypes.c_int
        lib.kt_linear_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        lib.kt_linear_bf16.restype = ctypes.c_int
        if lib.kt_moe_args_size() != ctypes.sizeof(_MoeArgs):
            _why = "argument layout mismatch between Python and the built extension: reinstall kt-core"
            return None
        _lib, _path = lib, origin
        return lib


def library_path() -> Optional[str]:
    """The file the native kernels were loaded from (None when they are not loaded)."""
    _load()
    return _path


def available() -> bool:
    return _load() is not None


def status() -> str:
    lib = _load()
    if lib is None:
        return f"torch (native kernels: {_why})"
    return f"native {lib.kt_variant().decode()} ({lib.kt_threads()} threads)"


def variant() -> Optional[str]:
    lib = _load()
    return lib.kt_variant().decode() if lib else None


def _need() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_why}")
    return lib
