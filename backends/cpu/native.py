"""The native CPU expert kernels: loading, weight packing, calls.

The extension (``_kt_cpu``, built by setup.py from ``native/``) exposes a C ABI over raw
pointers; we call it through ctypes, which releases the GIL during the call, so a
``submit`` on a helper thread overlaps with whatever the caller does next.
``KT_NO_NATIVE=1`` turns the native path off (the torch path runs).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from kt_core.weights.quant import ExpertWeights, Quant

NR = 16
FORMATS = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3, "w8a8": 4}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2}
ABI_VERSION = 6


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
_lock = threading.Lock()


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _why
    with _lock:
        if _lib is not None or _why is not None:
            return _lib
        if os.environ.get("KT_NO_NATIVE", "") not in ("", "0"):
            _why = "disabled by KT_NO_NATIVE=1"
            return None
        spec = importlib.util.find_spec("kt_backends.cpu._kt_cpu")
        if spec is None or not spec.origin:
            _why = ("not built (no C++ compiler when kt-core was installed?); install one and reinstall: "
                    "pip install -e .")
            return None
        try:
            lib = ctypes.CDLL(spec.origin)
            if lib.kt_abi_version() != ABI_VERSION:
                _why = f"built extension has ABI {lib.kt_abi_version()}, expected {ABI_VERSION}: reinstall kt-core"
                return None
        except OSError as exc:
            _why = f"failed to load {spec.origin}: {exc}"
            return None
        lib.kt_variant.restype = ctypes.c_char_p
        lib.kt_isa.restype = ctypes.c_uint32
        lib.kt_membw.restype = ctypes.c_double
        lib.kt_membw.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        lib.kt_moe_forward.argtypes = [ctypes.POINTER(_MoeArgs)]
        lib.kt_moe_args_size.restype = ctypes.c_int64
        lib.kt_set_variant.argtypes = [ctypes.c_char_p]
        lib.kt_variant_supported.argtypes = [ctypes.c_char_p]
        lib.kt_set_pool_threads.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.kt_pool_threads.argtypes = [ctypes.c_int]
        lib.kt_linear_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        if lib.kt_moe_args_size() != ctypes.sizeof(_MoeArgs):
            _why = "argument layout mismatch between Python and the built extension: reinstall kt-core"
            return None
        _lib = lib
        return lib


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
    lib = _need()
    rc = lib.kt_set_variant(name.encode())
    if rc:
        raise ValueError(f"kernel variant '{name}' is {'unknown' if rc == -2 else 'not supported by this CPU'}")


def set_threads(n: int) -> None:
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _need().kt_set_threads(int(n))


def threads() -> int:
    return int(_need().kt_threads())


def set_pool_threads(pool: int, n: int) -> None:
    """Workers of logical CPU device ``pool`` (cpu:N); pools run concurrently."""
    if n < 1 or _need().kt_set_pool_threads(int(pool), int(n)):
        raise ValueError(f"cannot give cpu:{pool} {n} threads (pool 0..63, threads >= 1)")


def pool_threads(pool: int) -> int:
    return int(_need().kt_pool_threads(int(pool)))


def memory_bandwidth_gbps(megabytes: int = 512, iters: int = 5) -> float:
    """Streaming-read bandwidth with the native multi-threaded loop (what decode can reach)."""
    buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    return float(_need().kt_membw(buf.data_ptr(), buf.numel(), iters))


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
    _call: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def call_parts(self) -> tuple:
        """What every call passes unchanged: the global id -> local index map (ids past its end
        are other devices' experts) and the three projections' argument structs."""
        if self._call is None:
            local_of = torch.full((int(self.expert_ids.max()) + 1,), -1, dtype=torch.long)
            local_of[self.expert_ids] = torch.arange(self.expert_ids.numel())
            self._call = (local_of, _proj(self.gate), _proj(self.up), _proj(self.down))
        return self._call

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in (self.gate, self.up, self.down)
                   for t in (p.data, p.scale, p.zero, p.bias) if t is not None)


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


def pack(ex: ExpertWeights) -> Optional[PackedExperts]:
    """The packed form, or None when the kernels do not take this format (torch path then)."""
    if ex.gate.device.type != "cpu":
        return None
    fmt = ex.format
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
        if not per_row and ex.down.group_size != group:
            return None
        name = "fp8"
    else:
        group = ex.gate.group_size
        if ex.down.group_size != group or group % 4 or (ex.gate.zeros is None) != (ex.down.zeros is None):
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


def _proj(p: PackedProj) -> _Proj:
    E = p.data.shape[0]
    per_param = 0 if p.scale is None else p.scale.numel() // E
    return _Proj(p.data.data_ptr(), _ptr(p.scale), _ptr(p.zero), _ptr(p.bias),
                 p.data.numel() * p.data.element_size() // E, per_param)


def moe_forward(packed: PackedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                activation: str = "silu", pool: int = 0) -> torch.Tensor:
    """Weighted sum over the routes to the packed experts; same contract as ``moe_experts``."""
    lib = _need()
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown MoE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    x = hidden.float().contiguous()
    ids = topk_ids.long().contiguous()
    w = topk_weights.float().contiguous()
    T, K = ids.shape
    out = torch.empty(T, packed.hidden, dtype=torch.float32)
    if T == 0:
        return out.to(hidden.dtype)
    local_of, gate, up, down = packed.call_parts()
    args = _MoeArgs(T, packed.hidden, packed.inter, K, packed.expert_ids.numel(), local_of.numel(),
                    FORMATS[packed.fmt], packed.group, ACTIVATIONS[activation], x.data_ptr(), ids.data_ptr(),
                    w.data_ptr(), local_of.data_ptr(), gate, up, down, out.data_ptr(), pool)
    rc = lib.kt_moe_forward(ctypes.byref(args))
    if rc == -1:
        raise ValueError("topk_ids has negative expert ids")
    if rc:
        raise RuntimeError(f"native moe_forward failed with code {rc}")
    return out.to(hidden.dtype)


def takes_linear(x: torch.Tensor, weight) -> bool:
    """Whether the native dense kernel serves this call: bf16 row-major weights on the CPU."""
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.device.type == "cpu" and weight.is_contiguous() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with bf16 weights streamed in their own layout; x's dtype out."""
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1]).float().contiguous()
    M, K = weight.shape
    out = torch.empty(xf.shape[0], M, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    _need().kt_linear_bf16(xf.data_ptr(), xf.shape[0], K, weight.data_ptr(), M, _ptr(b), out.data_ptr())
    return out.reshape(*lead, M).to(x.dtype)


_executors: dict[int, ThreadPoolExecutor] = {}


def submit(packed: PackedExperts, hidden, topk_ids, topk_weights, activation: str = "silu", pool: int = 0) -> Future:
    """Start ``moe_forward`` on a helper thread of logical device ``pool`` (the GIL is released
    while the kernel runs, so the caller keeps working)."""
    with _lock:
        ex = _executors.get(pool)
        if ex is None:
            ex = _executors[pool] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kt-cpu{pool}-moe")
    return ex.submit(moe_forward, packed, hidden, topk_ids, topk_weights, activation, pool)
