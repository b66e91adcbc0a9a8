"""The decode step's per-layer ops on the native CPU kernels: attention over the paged KV cache
(``native/attention_decode.inc``), RMS normalisation and rotary embeddings (``native/norm_rope.inc``).

Each op has the exact contract of its torch reference (``kt_core.backend.torch_ops``:
``attention.attention_decode``, ``norm_rope.rmsnorm``, ``norm_rope.rope``), float32 math inside,
results in the input's dtype (bf16 rounded to nearest even). What they cost per call is the point
(a decode step calls each once or twice per layer): the tensors' own memory goes to the kernel as
is (the KV cache is read in place through the block table, never gathered or converted), bf16
and float32 tensors both; only tiny tensors (sinks, an int64 block table, a strided q) are
converted here.

``attention_decode`` / ``rmsnorm`` / ``rope`` check their inputs and raise ValueError saying what is
wrong; ``try_attention_decode`` / ``try_rmsnorm`` / ``try_rope`` return None instead when the
kernels do not take the inputs (library not loaded, another device, float16, ...), so the caller
(the CPU backend) runs the torch reference. The library checks every size, pointer and index
again (``kt_cpu.cpp``: a native call never trusts a size it did not check); an index out of range
(a block id past the cache, a seq_len past the block table, a position past the rope table)
comes back as ValueError from either form.
"""
from __future__ import annotations

import ctypes
import struct
from typing import Optional

import torch

from kt_backends.cpu import native_lib
from kt_backends.cpu.native_abi import (DTYPE_CODES, MAX_DIM, MAX_HEAD_DIM, MAX_POOLS, _AttnDecodeArgs,
                                        _AttnScoresGradArgs, _AttnSoftmaxGradArgs, _check_rc, _LogSoftmaxGradArgs,
                                        _MlaDecodeArgs, _RmsNormArgs, _RmsNormGradArgs, _RopeArgs)

_DTYPES = {getattr(torch, name): code for name, code in DTYPE_CODES.items()}
_INDEX_DTYPES = frozenset({torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8})
_INT32_MAX = 2**31 - 1

# The argument blocks as struct.pack writes them (a third of the time of building the ctypes
# Structures of native_abi, which stay the ABI's definition: _lib checks that both give the same bytes)
_PACKERS = {"kt_attention_decode": (struct.Struct("@9qf3i7P"), _AttnDecodeArgs),
            "kt_rmsnorm": (struct.Struct("@2qf3i3P"), _RmsNormArgs),
            "kt_rmsnorm_backward": (struct.Struct("@2qf3i4P"), _RmsNormGradArgs),  # kt_core/train/native_norm_rope.py
            "kt_attn_softmax_grad": (struct.Struct("@6qfiii6P"), _AttnSoftmaxGradArgs),  # chunked_attention.py
            "kt_attn_scores_grad": (struct.Struct("@13qfi7P"), _AttnScoresGradArgs),  # chunked_attention.py
            "kt_logsoftmax_grad": (struct.Struct("@2q4i3P"), _LogSoftmaxGradArgs),  # kt_core/train/token_logprobs.py
            "kt_rope": (struct.Struct("@10q4i6P"), _RopeArgs),
            "kt_mla_decode": (struct.Struct("@9qf4i8P"), _MlaDecodeArgs)}  # called from native_mla.py
_ATTN, _RMS, _ROPE, _MLA = (_PACKERS[n][0].pack for n in ("kt_attention_decode", "kt_rmsnorm", "kt_rope",
                                                          "kt_mla_decode"))

_ops: Optional[ctypes.CDLL] = None
_ops_why: Optional[str] = None


def _lib() -> Optional[ctypes.CDLL]:
    """The loaded library with these ops' signatures set, or None (see ``why_unavailable``)."""
    global _ops, _ops_why
    if _ops is not None or _ops_why is not None:
        return _ops
    lib = native_lib._load()
    if lib is None:
        _ops_why = f"native CPU kernels unavailable: {native_lib._why}"
        return None
    try:
        for name, (packer, args) in _PACKERS.items():
            fn = getattr(lib, name)
            fn.argtypes = None  # the packed bytes (a char*) or ctypes.byref(args) (the tests' raw calls)
            fn.restype = ctypes.c_int
            size = getattr(lib, name + "_args_size")
            size.restype = ctypes.c_int64
            values = [i + 1 if t is not ctypes.c_float else 0.5 + i for i, (_, t) in enumerate(args._fields_)]
            if size() != ctypes.sizeof(args) or packer.size != ctypes.sizeof(args) or \
                    packer.pack(*values) != bytes(args(*values)):
                _ops_why = f"{name}: argument layout mismatch between Python and the built extension: reinstall kt-core"
                return None
    except AttributeError as exc:
        _ops_why = f"the built extension lacks the decode ops ({exc}): reinstall kt-core"
        return None
    _ops = lib
    return lib


def available() -> bool:
    return _lib() is not None


def why_unavailable() -> Optional[str]:
    _lib()
    return _ops_why


def _need() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError(_ops_why)
    return lib


def _fail(strict: bool, op: str, msg: str):
    if strict:
        raise ValueError(f"{op}: {msg}")
    return None


def _unavailable(strict: bool):
    if strict:
        raise RuntimeError(_ops_why)
    return None


def _unfit(strict: bool, op: str, exc: Exception):
    """An argument the argument block cannot hold (an integer past its C type)."""
    return _fail(strict, op, f"an argument does not fit the kernel's types ({exc})")


def _invoke(fn, pack, values: tuple, op: str, strict: bool) -> bool:
    """Pack an argument block and call the library with it: True when it ran, False when an argument
    does not fit the block's C types (ValueError instead when ``strict``); a library error raises."""
    try:
        args = pack(*values)
    except (struct.error, OverflowError) as exc:
        _unfit(strict, op, exc)
        return False
    rc = fn(args)
    if rc:
        _check_rc(rc, op)
    return True


def _pool(pool) -> int:
    if type(pool) is not int or not 0 <= pool < MAX_POOLS:
        raise ValueError(f"pool (logical CPU device cpu:N) must be an integer in 0..{MAX_POOLS - 1}, got {pool!r}")
    return pool


def _what(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)} on {t.device}"


def _positive_int(value, name: str, strict: bool, op: str):
    """None, or value as an int >= 1; False (not taken) / ValueError otherwise."""
    if value is None:
        return 0
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        v = 0
    if isinstance(value, bool) or v < 1 or v != value:
        _fail(strict, op, f"{name} must be None or a positive integer, got {value!r}")
        return False
    return min(v, 1 << 62)  # past any context: the same as no window / one chunk


def _index32(t: torch.Tensor, hi: int) -> torch.Tensor:
    """An integer index tensor as contiguous int32; values outside [-1, hi] clamp to -1 or hi, which the
    library refuses where it reads them (so a value past int32 never wraps into range)."""
    if t.dtype != torch.int32:  # clamped as int64: a narrow dtype (uint8, int8, int16) cannot hold the bounds
        t = t.long().clamp(-1, min(hi, _INT32_MAX)).to(torch.int32)
    return t.contiguous()


def _tables32(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int):
    """The block table and lengths as the library reads them (contiguous int32; as they are when they are)."""
    if block_tables.dtype is not torch.int32 or not block_tables.is_contiguous():
        block_tables = _index32(block_tables, num_blocks)
    if seq_lens.dtype is not torch.int32 or not seq_lens.is_contiguous():
        seq_lens = _index32(seq_lens, _INT32_MAX)
    return block_tables, seq_lens


# ---------------------------------------------------------------- attention_decode
def _attention_why(q, k_cache, v_cache, block_tables, seq_lens, sinks) -> str:
    """What keeps these tensors from the kernel, in words (after the fast check failed)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.device.type != "cpu":
            return f"{name} is on {t.device}; the native kernels read host memory"
    if q.dim() != 3:
        return f"q must be [batch, q_heads, head_dim], got {_what(q)}"
    if q.dtype not in _DTYPES:
        return f"q must be float32 or bfloat16, got {q.dtype}"
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        return (f"k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got k_cache "
                f"{_what(k_cache)}, v_cache {_what(v_cache)}")
    if k_cache.dtype not in _DTYPES or v_cache.dtype != k_cache.dtype:
        return f"the caches must both be float32 or both bfloat16, got {k_cache.dtype} and {v_cache.dtype}"
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "the caches must be contiguous (the kernel reads them in place; a copy per call is what it avoids)"
    B, Hq, D = q.shape
    nb, bs, Hkv, Dk = k_cache.shape
    if Dk != D:
        return f"q has head_dim {D}, the caches {Dk}"
    if not 1 <= D <= MAX_HEAD_DIM:
        return f"head_dim {D} is outside 1..{MAX_HEAD_DIM}"
    if Hkv < 1 or Hq % Hkv:
        return f"q's {Hq} heads are not a multiple of the caches' {Hkv} kv heads (GQA groups)"
    if min(nb, bs) < 1:
        return f"the caches hold no tokens ({_what(k_cache)})"
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.shape[1] < 1 or \
            block_tables.dtype not in _INDEX_DTYPES:
        return f"block_tables must be integer [batch={B}, max_blocks >= 1], got {_what(block_tables)}"
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B or seq_lens.dtype not in _INDEX_DTYPES:
        return f"seq_lens must be integer [batch={B}], got {_what(seq_lens)}"
    if max(B, Hq, nb, bs, block_tables.shape[1]) > MAX_DIM:
        return f"a size is above {MAX_DIM}"
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.device.type != "cpu" or not sinks.dtype.is_floating_point \
                or sinks.numel() != Hq:
            return f"sinks must be a floating point CPU tensor of {Hq} values (one per query head), got {_what(sinks)}"
    return "unsupported inputs"


def _attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, sinks, chunk, pool,
                      strict):
    op = "attention_decode"
    lib = _ops or _lib()
    if lib is None:
        return _unavailable(strict)
    try:  # the usual case in one test (a few microseconds); the diagnosis only when it fails
        B, Hq, D = q.shape
        nb, bs, Hkv, Dk = k_cache.shape
        Bt, mb = block_tables.shape
        kdt = k_cache.dtype
        qcode, kvcode = _DTYPES.get(q.dtype), _DTYPES.get(kdt)
        ok = (qcode is not None and kvcode is not None and v_cache.dtype is kdt and q.is_cpu and k_cache.is_cpu
              and v_cache.is_cpu and block_tables.is_cpu and seq_lens.is_cpu and v_cache.shape == k_cache.shape
              and k_cache.is_contiguous() and v_cache.is_contiguous() and Dk == D and 0 < D <= MAX_HEAD_DIM
              and Hkv > 0 and Hq % Hkv == 0 and Bt == B and seq_lens.dim() == 1 and seq_lens.shape[0] == B
              and block_tables.dtype in _INDEX_DTYPES and seq_lens.dtype in _INDEX_DTYPES
              and (sinks is None or (isinstance(sinks, torch.Tensor) and sinks.is_cpu and sinks.dtype.is_floating_point
                                     and sinks.numel() == Hq)))
        # sizes past the library's limits (num_blocks, block_size, ... above 2^24) it refuses itself
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        return _fail(strict, op, _attention_why(q, k_cache, v_cache, block_tables, seq_lens, sinks))
    window, chunk_ = (0 if v is None else _positive_int(v, name, strict, op)
                      for v, name in ((sliding_window, "sliding_window"), (chunk, "chunk")))
    if window is False or chunk_ is False:
        return None
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        return _fail(strict, op, f"scale must be a number, got {scale!r}")
    if type(pool) is not int or not 0 <= pool < MAX_POOLS:
        pool = _pool(pool)
    if B == 0:
        return torch.empty_like(q)
    if not q.is_contiguous():
        q = q.contiguous()  # [B, Hq, D]: tiny
    block_tables, seq_lens = _tables32(block_tables, seq_lens, nb)
    sink_ptr = 0
    if sinks is not None:
        sinks = sinks.float().contiguous()
        sink_ptr = sinks.data_ptr()
    out = torch.empty_like(q)
    ran = _invoke(lib.kt_attention_decode, _ATTN,
                  (B, Hq, Hkv, D, nb, bs, mb, window, chunk_, scale, qcode, kvcode, pool, q.data_ptr(),
                   k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(), sink_ptr,
                   out.data_ptr()), op, strict)
    return out if ran else None


def attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None, sinks=None,
                     chunk=None, pool: int = 0) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over its seq_lens[b] cached tokens in the paged caches
    [num_blocks, block_size, Hkv, D] (bf16 or float32); the contract of the torch reference."""
    return _attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, sinks, chunk,
                             pool, True)


def try_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None, sinks=None,
                         chunk=None, pool: int = 0) -> Optional[torch.Tensor]:
    """``attention_decode``, or None when the kernel does not take these inputs."""
    return _attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, sinks, chunk,
                             pool, False)


# ---------------------------------------------------------------- rmsnorm
def _rmsnorm(x, weight, eps, pool, strict):
    op = "rmsnorm"
    lib = _ops or _lib()
    if lib is None:
        return _unavailable(strict)
    try:
        D = x.shape[-1]
        xcode, wcode = _DTYPES.get(x.dtype), _DTYPES.get(weight.dtype)
        ok = (xcode is not None and wcode is not None and x.is_cpu and weight.is_cpu and weight.dim() == 1
              and weight.shape[0] == D and 0 < D <= MAX_DIM)
    except (AttributeError, TypeError, IndexError):
        ok = False
    if not ok:
        if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
            return _fail(strict, op, f"x and weight must be torch.Tensors, got {_what(x)} and {_what(weight)}")
        if x.device.type != "cpu" or weight.device.type != "cpu":
            return _fail(strict, op, f"x is on {x.device}, weight on {weight.device}; the native kernels read host "
                                     "memory")
        if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
            return _fail(strict, op, f"x and weight must be float32 or bfloat16, got {x.dtype} and {weight.dtype}")
        return _fail(strict, op, f"x must be [..., D] with 1 <= D <= {MAX_DIM} and weight [D], got x {_what(x)}, "
                                 f"weight {_what(weight)}")
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        return _fail(strict, op, f"eps must be a number, got {eps!r}")
    if type(pool) is not int or not 0 <= pool < MAX_POOLS:
        pool = _pool(pool)
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // D
    if rows == 0:
        return out
    ran = _invoke(lib.kt_rmsnorm, _RMS, (rows, D, eps, xcode, wcode, pool, x.data_ptr(), weight.data_ptr(),
                                         out.data_ptr()), op, strict)
    return out if ran else None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, pool: int = 0) -> torch.Tensor:
    """RMS normalisation of the rows of x [..., D] (bf16 or float32) by weight [D], in x's dtype."""
    return _rmsnorm(x, weight, eps, pool, True)


def try_rmsnorm(x, weight, eps, pool: int = 0) -> Optional[torch.Tensor]:
    return _rmsnorm(x, weight, eps, pool, False)


# ---------------------------------------------------------------- rope
def _rope(q, k, positions, cos_sin, interleaved, pool, strict):
    op = "rope"
    lib = _ops or _lib()
    if lib is None:
        return _unavailable(strict)
    try:
        T, Hq, D = q.shape
        Tk, Hk, Dk = k.shape
        P, rot = cos_sin.shape
        qcode, kcode = _DTYPES.get(q.dtype), _DTYPES.get(k.dtype)
        ok = (qcode is not None and kcode is not None and q.is_cpu and k.is_cpu and positions.is_cpu and cos_sin.is_cpu
              and cos_sin.dtype is torch.float32 and positions.dim() == 1 and positions.shape[0] == T
              and positions.dtype in _INDEX_DTYPES and Tk == T and Dk == D and 0 < D <= MAX_HEAD_DIM and rot % 2 == 0
              and 2 <= rot <= D and P > 0)
    except (AttributeError, TypeError, ValueError):
        ok = False
    if not ok:
        for name, t in (("q", q), ("k", k), ("positions", positions), ("cos_sin", cos_sin)):
            if not isinstance(t, torch.Tensor):
                return _fail(strict, op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type != "cpu":
                return _fail(strict, op, f"{name} is on {t.device}; the native kernels read host memory")
        if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
            return _fail(strict, op, f"q and k must be [tokens, heads, head_dim] with the same tokens and head_dim, "
                                     f"got q {_what(q)}, k {_what(k)}")
        if q.dtype not in _DTYPES or k.dtype not in _DTYPES:
            return _fail(strict, op, f"q and k must be float32 or bfloat16, got {q.dtype} and {k.dtype}")
        if positions.dim() != 1 or positions.shape[0] != q.shape[0] or positions.dtype not in _INDEX_DTYPES:
            return _fail(strict, op, f"positions must be integer [tokens={q.shape[0]}], got {_what(positions)}")
        if cos_sin.dtype != torch.float32 or cos_sin.dim() != 2:
            return _fail(strict, op, f"cos_sin must be a float32 table [max_positions, rot_dim], got {_what(cos_sin)}")
        return _fail(strict, op, f"cos_sin's rot_dim {cos_sin.shape[1]} must be even and in 2..head_dim "
                                 f"({q.shape[2]} <= {MAX_HEAD_DIM}), with at least one row")
    if type(pool) is not int or not 0 <= pool < MAX_POOLS:
        pool = _pool(pool)
    qs, ks = q.stride(), k.stride()
    if qs[2] != 1:
        q = q.contiguous()
        qs = q.stride()
    if ks[2] != 1:
        k = k.contiguous()
        ks = k.stride()
    q_out = torch.empty_like(q) if qs[1] == D and qs[0] == Hq * D else torch.empty((T, Hq, D), dtype=q.dtype)
    k_out = torch.empty_like(k) if ks[1] == D and ks[0] == Hk * D else torch.empty((T, Hk, D), dtype=k.dtype)
    if T == 0:
        return q_out, k_out
    if positions.dtype is not torch.int64 or not positions.is_contiguous():
        positions = positions.to(torch.int64).contiguous()
    if not cos_sin.is_contiguous():
        cos_sin = cos_sin.contiguous()
    ran = _invoke(lib.kt_rope, _ROPE,
                  (T, Hq, Hk, D, rot, P, qs[0], qs[1], ks[0], ks[1], qcode, kcode, 1 if interleaved else 0, pool,
                   q.data_ptr(), k.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(), q_out.data_ptr(),
                   k_out.data_ptr()), op, strict)
    return (q_out, k_out) if ran else None


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, interleaved: bool = False,
         pool: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, Hq, D] and k [T, Hk, D] by rows ``positions`` of the float32 table
    ``cos_sin [max_positions, rot]`` (cos | sin); new tensors in the inputs' dtypes."""
    return _rope(q, k, positions, cos_sin, interleaved, pool, True)


def try_rope(q, k, positions, cos_sin, interleaved=False, pool: int = 0):
    return _rope(q, k, positions, cos_sin, interleaved, pool, False)
