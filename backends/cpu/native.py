"""The native CPU expert kernels: loading, weight packing, calls.

The extension (``_kt_cpu``, built by setup.py from ``native/``) exposes a C ABI over raw
pointers; we call it through ctypes, which releases the GIL during the call, so a
``submit`` on a helper thread overlaps with whatever the caller does next.
``KT_NO_NATIVE=1`` turns the native path off (the torch path runs); ``KT_NATIVE_LIB=<path>``
loads that build of the library instead of the installed one (the sanitizer test's ASan build).

The C++ side trusts raw pointers, so every call checks here first what it would read:
shapes, dtypes, devices, codes, pool indices, and (once per PackedExperts) that the packed
panels have exactly the sizes the kernels index. A mistake raises ValueError naming it and
the fix. The library checks codes, sizes and strides again, catches every C++ exception, and
answers with an error code that ``_check_rc`` turns into a Python exception.
"""
from __future__ import annotations

import ctypes
import importlib.util
import operator
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from kt_core.weights.quant import ExpertWeights, Quant, weight_format

NR = 16
FORMATS = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3, "w8a8": 4}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2}
ABI_VERSION = 7
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
                ("gate", _Proj), ("up", _Proj), ("down", _Proj), ("out", ctypes.c_void_p), ("pool", ctypes.c_int)]


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


VARIANTS = ("generic", "avx2", "avx_vnni", "avx512", "amx")  # the extension's kernel variants


def supported_variants() -> list[str]:
    """The variants this CPU (and this build's compiler) can run; the last is the default."""
    lib = _need()
    return [v for v in VARIANTS if lib.kt_variant_supported(v.encode()) == 1]


def set_variant(name: str) -> None:
    """Force a kernel variant (tests, benchmarks); a variant the CPU lacks is refused."""
    if not isinstance(name, str):
        raise ValueError(f"a kernel variant is a name ({', '.join(VARIANTS)}), got {name!r}")
    lib = _need()
    rc = lib.kt_set_variant(name.encode())
    if rc:
        raise ValueError(f"kernel variant '{name}' is {'unknown' if rc == -2 else 'not supported by this CPU'}")


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


def _pool(pool) -> int:
    return _index(pool, "pool (logical CPU device cpu:N)", 0, MAX_POOLS - 1)


def set_threads(n: int) -> None:
    """Threads of pool 0 (cpu:0 and the dense GEMV), the caller included; waits for a running call."""
    n = _index(n, "threads", 1, MAX_THREADS)
    _check_rc(_need().kt_set_threads(n), "set_threads")


def threads() -> int:
    n = int(_need().kt_threads())
    _check_rc(min(n, 0), "threads")
    return n


def set_pool_threads(pool: int, n: int) -> None:
    """Workers of logical CPU device ``pool`` (cpu:N); pools run concurrently."""
    pool, n = _pool(pool), _index(n, f"threads for cpu:{pool}", 1, MAX_THREADS)
    _check_rc(_need().kt_set_pool_threads(pool, n), "set_pool_threads")


def pool_threads(pool: int) -> int:
    n = int(_need().kt_pool_threads(_pool(pool)))
    _check_rc(min(n, 0), "pool_threads")
    return n


def memory_bandwidth_gbps(megabytes: int = 512, iters: int = 5) -> float:
    """Streaming-read bandwidth with the native multi-threaded loop (what decode can reach)."""
    megabytes = _index(megabytes, "megabytes", 1, 1 << 20)
    iters = _index(iters, "iters", 1, 1 << 20)
    lib = _need()
    buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    gbps = float(lib.kt_membw(buf.data_ptr(), buf.numel(), iters))
    _check_rc(int(min(gbps, 0.0)), "memory_bandwidth_gbps")
    return gbps


def _need() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_why}")
    return lib


# ---------------------------------------------------------------- packing
@dataclass
class PackedProj:
    data: torch.Tensor  # [E, P, K(/2), 16]
    scale: Optional[torch.Tensor]
    zero: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]  # float32 [E, M]


@dataclass
class PackedExperts:
    """Experts repacked into the native kernel's panel layout (see native/kernels.hpp)."""

    expert_ids: torch.Tensor
    fmt: str
    group: int
    hidden: int
    inter: int
    gate: PackedProj
    up: PackedProj
    down: PackedProj
    pool: int = 0  # logical CPU device (cpu:N) whose workers run these experts
    _prep: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def call_parts(self) -> tuple:
        """What every call passes unchanged: the global id -> local index map (ids past its end
        are other devices' experts) and the three projections' argument structs."""
        return self._prepared()[:4]

    def _prepared(self) -> tuple:
        """call_parts plus the checked sizes and codes, and the tensors behind the structs' raw
        pointers (kept referenced here whatever later happens to this object's fields). The
        checks run once per object: a decode call pays none of them."""
        prep = self._prep
        if prep is None:
            H, I, fmt, group, E = _check_packed(self)
            ids = self.expert_ids
            local_of = torch.full((int(ids.max()) + 1 if E else 0,), -1, dtype=torch.long)
            local_of[ids] = torch.arange(E)
            keep = (self.gate, self.up, self.down)
            prep = self._prep = (local_of, _proj(self.gate, E), _proj(self.up, E), _proj(self.down, E),
                                 H, I, fmt, group, E, keep)
        return prep

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in (self.gate, self.up, self.down)
                   for t in (p.data, p.scale, p.zero, p.bias) if t is not None)


_REPACK = "pack the experts with native.pack(ExpertWeights)"


def _packed_layout(fmt: str, group: int, E: int, M: int, K: int) -> tuple:
    """(data shape, data dtype, scale shape or None) of one projection as _pack_proj lays it out."""
    P = -(-M // NR)
    if fmt == "bf16":
        return (E, P, K, NR), torch.int16, None
    if fmt == "int8":
        return (E, P, K // 2, NR, 2), torch.int8, (E, P * NR)
    if fmt == "w8a8":
        return (E, P, K // 4, NR, 4), torch.int8, (E, P * NR)
    G = K // group if group else 1
    if fmt == "int4":
        return (E, P, K // 4, 2 * NR), torch.uint8, (E, P, G, NR)
    return (E, P, K, NR), torch.uint8, (E, P, G, NR)  # fp8


def _check_tensor(t, what: str, shape: tuple, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(t).__name__}; {_REPACK}")
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{what} is a {'' if t.is_contiguous() else 'non-contiguous '}{t.dtype} tensor of shape "
                         f"{tuple(t.shape)} on {t.device}; the kernels read a contiguous {dtype} CPU tensor of "
                         f"shape {shape}; {_REPACK}")


def _check_packed(p: PackedExperts) -> tuple:
    """Everything the kernels index, checked against the sizes: (H, I, format code, group, E)."""
    where = "packed experts"
    if not isinstance(p.fmt, str) or p.fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {p.fmt!r} (one of {', '.join(FORMATS)}); {_REPACK}")
    H = _index(p.hidden, f"{where}: hidden size", 1, MAX_DIM)
    I = _index(p.inter, f"{where}: expert width (inter)", 1, MAX_DIM)
    group = _index(p.group, f"{where}: group size", 0, MAX_DIM)
    ids = p.expert_ids
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long or ids.device.type != "cpu"
            or not ids.is_contiguous()):
        raise ValueError(f"{where}: expert_ids must be a 1-D int64 CPU tensor; {_REPACK}")
    E = ids.numel()
    if E and (int(ids.min()) < 0 or int(ids.max()) >= MAX_DIM):
        raise ValueError(f"{where}: expert ids must be in 0..{MAX_DIM - 1}, got {int(ids.min())}..{int(ids.max())}")
    if E and torch.unique(ids).numel() != E:
        raise ValueError(f"{where}: expert_ids has duplicates; {_REPACK}")
    fmt = p.fmt
    step = {"int8": 2, "w8a8": 4, "int4": 4}.get(fmt, 1)
    if H % step or I % step:
        raise ValueError(f"{where}: {fmt} kernels read inputs in {step}s; hidden {H} and width {I} must be multiples")
    if fmt in ("bf16", "int8", "w8a8") and group != 0:
        raise ValueError(f"{where}: {fmt} has no groups (group 0), got group {group}; {_REPACK}")
    if fmt == "int4" and (group <= 0 or group % 4 or group > 4096):
        raise ValueError(f"{where}: int4 groups must be a multiple of 4 in 4..4096, got {group}; {_REPACK}")
    if group and (H % group or I % group):
        raise ValueError(f"{where}: group {group} must divide hidden {H} and width {I}; {_REPACK}")
    for name, proj, M, K in (("gate", p.gate, I, H), ("up", p.up, I, H), ("down", p.down, H, I)):
        if not isinstance(proj, PackedProj):
            raise ValueError(f"{where}: {name} must be a PackedProj, got {type(proj).__name__}; {_REPACK}")
        data_shape, data_dtype, scale_shape = _packed_layout(fmt, group, E, M, K)
        _check_tensor(proj.data, f"{where}: {name}.data", data_shape, data_dtype)
        if scale_shape is None:
            if proj.scale is not None or proj.zero is not None:
                raise ValueError(f"{where}: {name} has scales, but {fmt} weights take none; {_REPACK}")
        else:
            _check_tensor(proj.scale, f"{where}: {name}.scale", scale_shape, torch.float32)
            if proj.zero is not None:
                if fmt != "int4":
                    raise ValueError(f"{where}: {name} has zero points, which only int4 takes; {_REPACK}")
                _check_tensor(proj.zero, f"{where}: {name}.zero", scale_shape, torch.float32)
        if proj.bias is not None:
            _check_tensor(proj.bias, f"{where}: {name}.bias", (E, M), torch.float32)
    return H, I, FORMATS[fmt], group, E


def _panels(t: torch.Tensor) -> torch.Tensor:
    """[E, M, X] -> [E, ceil(M/16), X, 16] with zero rows padding M."""
    E, M, X = t.shape
    pad = (-M) % NR
    if pad:
        t = torch.cat([t, t.new_zeros(E, pad, X)], dim=1)
    return t.reshape(E, -1, NR, X).transpose(2, 3).contiguous()


def _pack_proj(w, bias: Optional[torch.Tensor]) -> PackedProj:
    b = None if bias is None else bias.float().contiguous()
    if isinstance(w, torch.Tensor):
        return PackedProj(_panels(w.view(torch.int16)), None, None, b)
    if w.format in (Quant.INT8, Quant.W8A8):
        scale = _panels(w.scales.float()).reshape(w.scales.shape[0], -1).contiguous()  # [E, P*16]
        data = _panels(w.qdata)  # [E, P, K, 16]
        E, P, K, _ = data.shape
        step = 4 if w.format is Quant.W8A8 else 2  # inputs of a row side by side: [E, P, K/step, 16, step]
        data = data.reshape(E, P, K // step, step, NR).transpose(3, 4).contiguous()
        return PackedProj(data, scale, None, b)
    scale = _panels(w.scales.float())  # [E, P, G, 16]
    zero = None if w.zeros is None else _panels(w.zeros.float())
    data = _panels(w.qdata) if w.format is Quant.FP8 else _int4_quads(w.qdata)
    return PackedProj(data, scale, zero, b)


def _int4_quads(qdata: torch.Tensor) -> torch.Tensor:
    """int4 codes [E, M, K/2] (low nibble = even input) -> the kernel's quad layout
    [E, P, K/4, 32] bytes (native/kernels.hpp): per 4 inputs of a panel, 16 little-endian
    16-bit words; word 2l+e holds code(row l + 8h, input 4q + 2s + e) in its nibble h + 2s."""
    E, M, half = qdata.shape
    codes = torch.stack((qdata & 0xF, qdata >> 4), dim=-1).reshape(E, M, 2 * half)
    c = _panels(codes)  # [E, P, K, 16 rows]
    P, K = c.shape[1], c.shape[2]
    # [E, P, q, s, e, h, l] -> [E, P, q, l, e, s, h]: bytes (q, l, e, s), nibble h
    c = c.reshape(E, P, K // 4, 2, 2, 2, 8).permute(0, 1, 2, 6, 4, 3, 5)
    return (c[..., 0] | (c[..., 1] << 4)).reshape(E, P, K // 4, 32).contiguous()


def _check_experts(ex: ExpertWeights) -> None:
    """The ExpertWeights agree with themselves (a .ktq file or a caller could hand in any
    sizes): gate / up [E, I, H], down [E, H, I], and each quantized weight's codes, scales and
    zero points have the sizes its in_features and group_size say."""
    E = int(ex.expert_ids.numel())
    if len(ex.gate.shape) != 3:
        raise ValueError(f"expert gate weights must be [experts, width, hidden], got shape {tuple(ex.gate.shape)}")
    I, H = int(ex.gate.shape[1]), int(ex.gate.shape[2])
    for name, w, want in (("gate", ex.gate, (E, I, H)), ("up", ex.up, (E, I, H)), ("down", ex.down, (E, H, I))):
        if tuple(w.shape) != want:
            raise ValueError(f"expert {name} weights have shape {tuple(w.shape)}, expected {want} "
                             f"(gate / up [E, I, H], down [E, H, I])")
        if isinstance(w, torch.Tensor):
            continue
        E_, M, K = want
        q_last = K // 2 if w.format is Quant.INT4 else K
        if (w.format is Quant.INT4 and K % 2) or tuple(w.qdata.shape) != (E_, M, q_last):
            raise ValueError(f"expert {name}: {w.format.value} codes have shape {tuple(w.qdata.shape)}, but "
                             f"in_features={K} needs {(E_, M, q_last)}")
        if not isinstance(w.group_size, int) or w.group_size <= 0 or K % w.group_size:
            raise ValueError(f"expert {name}: group_size {w.group_size!r} must be positive and divide "
                             f"in_features {K}")
        G = K // w.group_size
        for part, t in (("scales", w.scales), ("zeros", w.zeros)):
            if t is not None and tuple(t.shape) != (E_, M, G):
                raise ValueError(f"expert {name}: {part} have shape {tuple(t.shape)}, expected {(E_, M, G)} "
                                 f"for in_features {K} in groups of {w.group_size}")
    for name, b, M in (("gate_bias", ex.gate_bias, I), ("up_bias", ex.up_bias, I), ("down_bias", ex.down_bias, H)):
        if b is not None and tuple(b.shape) != (E, M):
            raise ValueError(f"expert {name} has shape {tuple(b.shape)}, expected {(E, M)}")


def pack(ex: ExpertWeights) -> Optional[PackedExperts]:
    """The packed form, or None when the kernels do not take this format (torch path then).
    ValueError when the weights disagree with their own sizes."""
    if any(w.device.type != "cpu" for w in (ex.gate, ex.up, ex.down)):
        return None
    fmt = ex.format
    if any(weight_format(w) is not fmt for w in (ex.up, ex.down)):
        return None  # mixed formats: the torch path takes each as it is
    _check_experts(ex)
    if fmt is Quant.NONE:
        if any(w.dtype != torch.bfloat16 for w in (ex.gate, ex.up, ex.down)):
            return None  # fp32 / fp16 weights: the torch path keeps their precision
        name, group = "bf16", 0
    elif fmt in (Quant.INT8, Quant.W8A8):
        if ex.gate.group_size != ex.gate.in_features or ex.down.group_size != ex.down.in_features:
            return None
        step = 4 if fmt is Quant.W8A8 else 2
        if ex.gate.in_features % step or ex.down.in_features % step:
            return None  # the integer dot products take inputs in pairs (w8a8: fours)
        name, group = fmt.value, 0
    elif fmt is Quant.FP8:
        per_row = all(w.group_size == w.in_features for w in (ex.gate, ex.down))
        group = 0 if per_row else ex.gate.group_size  # 0: one scale per row, whatever K is
        if not per_row and (ex.down.group_size != group or ex.up.group_size != group):
            return None
        name = "fp8"
    else:
        group = ex.gate.group_size
        asym = [w.zeros is not None for w in (ex.gate, ex.up, ex.down)]
        if ex.down.group_size != group or ex.up.group_size != group or group % 4 or len(set(asym)) > 1:
            return None  # the int4 kernel reads inputs in fours (a 16-bit word per row pair of inputs)
        if group > 4096:
            return None  # a group's int32 sum of code x int16 activation could overflow
        name = "int4"
    H, I = ex.gate.shape[2], ex.gate.shape[1]
    return PackedExperts(ex.expert_ids.long().contiguous(), name, group, H, I, _pack_proj(ex.gate, ex.gate_bias),
                         _pack_proj(ex.up, ex.up_bias), _pack_proj(ex.down, ex.down_bias))


# ---------------------------------------------------------------- calls
def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _proj(p: PackedProj, E: int) -> _Proj:
    if E == 0:
        return _Proj(None, None, None, None, 0, 0)
    per_param = 0 if p.scale is None else p.scale.numel() // E
    return _Proj(p.data.data_ptr(), _ptr(p.scale), _ptr(p.zero), _ptr(p.bias),
                 p.data.numel() * p.data.element_size() // E, per_param)


_FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})
_INTS = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def _check_routes(hidden, topk_ids, topk_weights, H: int) -> tuple:
    """(tokens, top_k) after checking what the kernel reads of the call's own tensors: a fast
    test of the usual case (about 1 us), the diagnosis only when it fails."""
    try:
        if (hidden.is_cpu and topk_ids.is_cpu and topk_weights.is_cpu and hidden.ndim == 2 and topk_ids.ndim == 2
                and hidden.dtype in _FLOATS and topk_ids.dtype in _INTS and topk_weights.dtype in _FLOATS):
            T, width = hidden.shape
            T_ids, K = topk_ids.shape
            if width == H and T_ids == T and topk_weights.shape == topk_ids.shape and T <= MAX_DIM and K <= MAX_TOPK:
                return T, K
    except (AttributeError, TypeError, ValueError):
        pass
    _explain_routes(hidden, topk_ids, topk_weights, H)
    raise ValueError("moe_forward: hidden, topk_ids and topk_weights do not fit these experts")  # not reached


def _explain_routes(hidden, topk_ids, topk_weights, H: int) -> None:
    """Raise ValueError naming what is wrong with a call's tensors and how to fix it."""
    for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"moe_forward: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"moe_forward: {name} is on {t.device}; the native kernels read host memory: "
                             f"pass {name}.cpu()")
    if hidden.dim() != 2 or hidden.shape[1] != H:
        raise ValueError(f"moe_forward: hidden has shape {tuple(hidden.shape)}, but these experts were packed for "
                         f"hidden size {H}: pass hidden states of shape [tokens, {H}]")
    floats = ", ".join(sorted(str(d).replace("torch.", "") for d in _FLOATS))
    if hidden.dtype not in _FLOATS:
        raise ValueError(f"moe_forward: hidden must be one of {floats}, got {hidden.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_forward: topk_ids must be 2-D [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in _INTS:
        raise ValueError(f"moe_forward: topk_ids must hold integer expert ids (int64, int32, ...), "
                         f"got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe_forward: topk_weights has shape {tuple(topk_weights.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}: they must agree ([tokens, top_k])")
    if topk_weights.dtype not in _FLOATS:
        raise ValueError(f"moe_forward: topk_weights must be one of {floats}, got {topk_weights.dtype}")
    T, K = topk_ids.shape
    if T != hidden.shape[0]:
        raise ValueError(f"moe_forward: topk_ids routes {T} tokens, hidden holds {hidden.shape[0]}: one row of "
                         f"routes per token")
    if T > MAX_DIM or K > MAX_TOPK:
        raise ValueError(f"moe_forward: {T} tokens x top_k {K} is more than one call takes ({MAX_DIM} x {MAX_TOPK}); "
                         f"split the tokens")


def moe_forward(packed: PackedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                activation: str = "silu", pool: int = 0) -> torch.Tensor:
    """Weighted sum over the routes to the packed experts; same contract as ``moe_experts``.
    Route ids past the packed experts are other devices' experts and add nothing here."""
    lib = _need()
    if not isinstance(packed, PackedExperts):
        raise ValueError(f"moe_forward takes the PackedExperts of native.pack(), got {type(packed).__name__}")
    local_of, gate, up, down, H, I, fmt, group, E, _ = packed._prepared()
    act = ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    if act is None:
        raise ValueError(f"unknown MoE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    if type(pool) is not int or not 0 <= pool < MAX_POOLS:
        pool = _pool(pool)
    T, K = _check_routes(hidden, topk_ids, topk_weights, H)
    x = hidden.float().contiguous()
    ids = topk_ids.long().contiguous()
    w = topk_weights.float().contiguous()
    out = torch.empty(T, H, dtype=torch.float32)
    if T == 0:
        return out.to(hidden.dtype)
    args = _MoeArgs(T, H, I, K, E, local_of.numel(), fmt, group, act, x.data_ptr(), ids.data_ptr(),
                    w.data_ptr(), local_of.data_ptr(), gate, up, down, out.data_ptr(), pool)
    _check_rc(lib.kt_moe_forward(ctypes.byref(args)), "moe_forward")
    return out.to(hidden.dtype)


def takes_linear(x: torch.Tensor, weight) -> bool:
    """Whether the native dense kernel serves this call: bf16 row-major weights on the CPU."""
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.device.type == "cpu" and weight.is_contiguous() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with bf16 weights streamed in their own layout; x's dtype out."""
    lib = _need()
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and weight.is_contiguous()):
        what = (f"a {weight.dtype} tensor of shape {tuple(weight.shape)} on {weight.device}"
                if isinstance(weight, torch.Tensor) else type(weight).__name__)
        raise ValueError(f"linear: weight must be a contiguous 2-D bfloat16 CPU tensor [out, in], got {what}; "
                         f"check native.takes_linear() first")
    M, K = weight.shape
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or not x.dtype.is_floating_point or x.dim() < 1:
        raise ValueError(f"linear: x must be a floating point CPU tensor [..., {K}], got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[-1] != K:
        raise ValueError(f"linear: x has {x.shape[-1]} features (its last dim), but weight [{M}, {K}] takes {K}")
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.device.type == "cpu"
                                 and bias.dim() == 1 and bias.numel() == M and bias.dtype.is_floating_point):
        what = (f"{bias.dtype} shape {tuple(bias.shape)} on {bias.device}" if isinstance(bias, torch.Tensor)
                else type(bias).__name__)
        raise ValueError(f"linear: bias must be a 1-D floating point CPU tensor of {M} values (one per output), "
                         f"got {what}")
    lead = x.shape[:-1]
    xf = x.reshape(-1, K).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    if xf.shape[0] == 0 or M == 0 or K == 0:  # nothing for the kernel to stream
        out = torch.nn.functional.linear(xf, weight.float(), b)
    else:
        out = torch.empty(xf.shape[0], M, dtype=torch.float32)
        _check_rc(lib.kt_linear_bf16(xf.data_ptr(), xf.shape[0], K, weight.data_ptr(), M, _ptr(b), out.data_ptr()),
                  "linear")
    return out.reshape(*lead, M).to(x.dtype)


_executors: dict[int, ThreadPoolExecutor] = {}


def submit(packed: PackedExperts, hidden, topk_ids, topk_weights, activation: str = "silu", pool: int = 0) -> Future:
    """Start ``moe_forward`` on a helper thread of logical device ``pool`` (the GIL is released
    while the kernel runs, so the caller keeps working)."""
    pool = _pool(pool)
    with _lock:
        ex = _executors.get(pool)
        if ex is None:
            ex = _executors[pool] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kt-cpu{pool}-moe")
    return ex.submit(moe_forward, packed, hidden, topk_ids, topk_weights, activation, pool)
