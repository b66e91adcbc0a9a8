"""The native CPU expert kernels: loading, variants, thread pools, calls (weight packing is in
native_pack.py, the ABI's codes and structs in native_abi.py).

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
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from kt_backends.cpu.native_abi import (ABI_VERSION, ACTIVATIONS, FORMATS, MAX_DIM, MAX_POOLS,  # noqa: F401
                                        MAX_THREADS, MAX_TOPK, NR, _ERRORS, _check_rc, _index, _MoeArgs, _Proj)
# packing lives in native_pack; these names stay reachable as native.X for callers
from kt_backends.cpu.native_pack import (PackedExperts, PackedProj, _pack_proj, _panels, _ptr, pack,  # noqa: F401
                                         pack_formats)
# loading lives in native_lib (torch-free, so `kt devices` can ask it); the names stay native.X
from kt_backends.cpu.native_lib import _load, _need, available, library_path, status, variant  # noqa: F401

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


def bf16_tile_tokens(variant: str, fmt: str) -> int:
    """The fewest tokens of one expert (rows of one dense call) from which ``variant`` runs ``fmt``
    on a kernel that rounds activations to bf16 (AMX tiles, AVX512-BF16 pairs); 0: never."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    n = int(_need().kt_bf16_tile_tokens(str(variant).encode(), FORMATS[fmt]))
    if n < 0:
        raise ValueError(f"unknown kernel variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return n


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


# ---------------------------------------------------------------- calls
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
                activation: str = "silu", pool: int = 0, save_gu: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted sum over the routes to the packed experts; same contract as ``moe_experts``.
    Route ids past the packed experts are other devices' experts and add nothing here.
    ``save_gu``: see native_grad.moe_forward_saving (which checks it)."""
    lib = _need()
    if not isinstance(packed, PackedExperts):
        raise ValueError(f"moe_forward takes the PackedExperts of native.pack(), got {type(packed).__name__}")
    local_of, gate, up, down, H, I, fmt, group, E, _, dfmt, dgroup, f16 = packed._prepared()
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
    if save_gu is not None:  # the library writes a row per held route: check the rows it will write
        flat = ids.reshape(-1)
        held = int((local_of[flat[(flat >= 0) & (flat < local_of.numel())]] >= 0).sum())
        if not isinstance(save_gu, torch.Tensor) or save_gu.dtype != torch.float32 or save_gu.device.type != "cpu" \
                or not save_gu.is_contiguous() or tuple(save_gu.shape) != (held, 2 * I):
            raise ValueError(f"moe_forward: save_gu must be a contiguous float32 CPU tensor [{held}, {2 * I}] "
                             f"(a row per route to these experts)")
    if T == 0:
        return out.to(hidden.dtype)
    args = _MoeArgs(T, H, I, K, E, local_of.numel(), fmt, group, act, x.data_ptr(), ids.data_ptr(),
                    w.data_ptr(), local_of.data_ptr(), gate, up, down, out.data_ptr(), pool,
                    int(hidden.dtype == torch.bfloat16), dfmt, dgroup, *f16,
                    None if save_gu is None else save_gu.data_ptr())
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
_lock = threading.Lock()  # guards _executors


def submit(packed: PackedExperts, hidden, topk_ids, topk_weights, activation: str = "silu", pool: int = 0) -> Future:
    """Start ``moe_forward`` on a helper thread of logical device ``pool`` (the GIL is released
    while the kernel runs, so the caller keeps working)."""
    pool = _pool(pool)
    with _lock:
        ex = _executors.get(pool)
        if ex is None:
            ex = _executors[pool] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kt-cpu{pool}-moe")
    return ex.submit(moe_forward, packed, hidden, topk_ids, topk_weights, activation, pool)
