"""Training's passes through frozen packed experts on the native kernels (native/expert_grad.inc,
native/kernels_grad.hpp): a forward that also keeps every route's gate and up outputs, and the
transposed products of the backward pass, C[r] = A[r] . W_e for the rows r of each expert e (the
gradient of an expert's input from the gradient of its output), in every packed format.

Routes are laid out as the forward orders them: by local expert, then by token (``route_order``).
Every call checks the shapes, dtypes and offsets the library will read; the library checks the
sizes and offsets again (kt_cpu.cpp: a native call never trusts a size it did not check).
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from kt_backends.cpu import native
from kt_backends.cpu.native_abi import _ActGradArgs, _check_rc, _RowsTArgs, overlaps
from kt_backends.cpu.native_pack import PackedExperts

_lib_ready = False


def _lib() -> ctypes.CDLL:
    global _lib_ready
    lib = native._need()
    if not _lib_ready:
        for fn in (lib.kt_expert_rows_t, lib.kt_expert_rows):
            fn.argtypes = [ctypes.POINTER(_RowsTArgs)]
            fn.restype = ctypes.c_int
        lib.kt_silu_mul_backward.argtypes = [ctypes.POINTER(_ActGradArgs)]
        lib.kt_silu_mul_backward.restype = ctypes.c_int
        lib.kt_expert_rows_t_args_size.restype = ctypes.c_int64
        lib.kt_act_grad_args_size.restype = ctypes.c_int64
        if lib.kt_expert_rows_t_args_size() != ctypes.sizeof(_RowsTArgs) \
                or lib.kt_act_grad_args_size() != ctypes.sizeof(_ActGradArgs):
            raise RuntimeError("kt_expert_rows_t / kt_silu_mul_backward: argument layout mismatch between Python "
                               "and the built extension: reinstall kt-core")
        _lib_ready = True
    return lib


def route_order(packed: PackedExperts, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(routes, counts): the flat indices (token * top_k + k) of the routes to these experts in the
    order the native forward lays them out (by local expert, then token), and each local expert's
    count of them."""
    from kt_core.backend.torch_ops.moe import routes_by_expert

    if topk_ids.numel() and int(topk_ids.min()) < 0:
        raise ValueError("moe routes: topk_ids holds a negative expert id")
    if packed.expert_ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return routes_by_expert(topk_ids, packed.expert_ids)


def moe_forward_saving(packed: PackedExperts, hidden: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor, activation: str = "silu", pool: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """native.moe_forward's output, plus (gu, routes, counts): gu[i] = route routes[i]'s gate
    outputs then up outputs ([routes, 2 * inter], float32, bias included, before the activation)."""
    routes, counts = route_order(packed, topk_ids)
    gu = torch.empty(routes.numel(), 2 * packed.inter, dtype=torch.float32)
    out = native.moe_forward(packed, hidden, topk_ids, topk_weights, activation, pool, save_gu=gu)
    return out, gu, routes, counts


def _sizes(packed: PackedExperts, proj: str) -> tuple:
    """(M, K, format code, group, fp16 params, the projection's struct) of gate / up / down"""
    local_of, gate, up, down, H, I, fmt, group, E, _, dfmt, dgroup, f16 = packed._prepared()
    if proj == "down":
        return H, I, dfmt, dgroup, f16[1], down
    if proj not in ("gate", "up"):
        raise ValueError(f"expert_rows_t: proj is gate, up or down, got {proj!r}")
    return I, H, fmt, group, f16[0], gate if proj == "gate" else up


def _check_rows(what: str, packed: PackedExperts, A, width: int, counts) -> tuple[int, int]:
    """(local experts, rows) after checking A [rows, width] float32 and counts against them."""
    E = int(packed.expert_ids.numel())
    if not isinstance(A, torch.Tensor) or A.dtype != torch.float32 or A.dim() != 2 or A.shape[1] != width \
            or not A.is_contiguous() or A.device.type != "cpu":
        raise ValueError(f"{what}: A must be a contiguous float32 CPU tensor [rows, {width}], got "
                         f"{getattr(A, 'dtype', type(A).__name__)} {tuple(getattr(A, 'shape', ()))}")
    return E, _check_counts(what, E, counts, A.shape[0])


def _check_counts(what: str, E: int, counts, rows: int) -> int:
    if not isinstance(counts, torch.Tensor) or counts.dtype.is_floating_point or counts.dtype.is_complex \
            or counts.dtype == torch.bool or counts.numel() != E or (E and int(counts.min()) < 0) \
            or int(counts.sum()) != rows:
        raise ValueError(f"{what}: counts must hold {E} non-negative integer row counts summing to the {rows} rows "
                         f"of A")
    return rows


def expert_rows_t(packed: PackedExperts, proj: str, A: torch.Tensor, counts: torch.Tensor,
                  out: Optional[torch.Tensor] = None, accumulate: bool = False, round_bf16: bool = False,
                  pool: int = 0, a_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C[r] = A[r] . W_e for the rows of each local expert e (``counts[e]`` rows each, in order):
    A [rows, M] float32, C [rows, K] float32 (M x K: gate / up I x H, down H x I), written into
    ``out`` when given (added to it with ``accumulate``). ``round_bf16``: a bf16 model's gradients
    (the AMX tiles round A to bf16). ``a_rows`` (int64 [rows]): row r's A is A[a_rows[r]] instead, A
    then any number of rows (the tokens' gradients, which the routes read in place)."""
    lib = _lib()
    M, K, fmt, group, f16, p = _sizes(packed, proj)
    a_count = 0
    if a_rows is not None:
        if not isinstance(a_rows, torch.Tensor) or a_rows.dtype != torch.int64 or a_rows.dim() != 1 \
                or not a_rows.is_contiguous() or a_rows.device.type != "cpu":
            raise ValueError(f"expert_rows_t({proj}): a_rows must be a contiguous int64 CPU tensor [rows]")
        if not isinstance(A, torch.Tensor) or A.dtype != torch.float32 or A.dim() != 2 or A.shape[1] != M \
                or not A.is_contiguous() or A.device.type != "cpu" or (a_rows.numel() and A.shape[0] == 0):
            raise ValueError(f"expert_rows_t({proj}): A must be a contiguous float32 CPU tensor [n, {M}] that a_rows "
                             f"indexes, got {getattr(A, 'dtype', type(A).__name__)} {tuple(getattr(A, 'shape', ()))}")
        a_count, E = A.shape[0], int(packed.expert_ids.numel())
        rows = _check_counts(f"expert_rows_t({proj})", E, counts, a_rows.numel())
    else:
        E, rows = _check_rows(f"expert_rows_t({proj})", packed, A, M, counts)
    if out is None:
        if accumulate:
            raise ValueError(f"expert_rows_t({proj}): accumulate=True adds into out: pass out")
        C = torch.empty(rows, K, dtype=torch.float32)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != (rows, K) \
                or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"expert_rows_t({proj}): out must be a contiguous float32 CPU tensor [{rows}, {K}]")
        c0, c1 = out.data_ptr(), out.data_ptr() + out.numel() * 4
        for what, t in (("A", A), ("a_rows", a_rows)):  # the library reads both while it writes out
            if t is not None and t.data_ptr() < c1 and c0 < t.data_ptr() + t.numel() * t.element_size():
                raise ValueError(f"expert_rows_t({proj}): out overlaps {what}; the products read {what} while "
                                 f"writing out")
        C = out
    acc = int(bool(accumulate))
    if rows == 0:
        return C
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = counts.long().cumsum(0)
    args = _RowsTArgs(M, K, E, rows, M, K, fmt, group, f16, acc, int(bool(round_bf16)), native._pool(pool),
                      offsets.data_ptr(), p, A.data_ptr(), C.data_ptr(), None if a_rows is None else a_rows.data_ptr(),
                      a_count)
    _check_rc(lib.kt_expert_rows_t(ctypes.byref(args)), f"expert_rows_t({proj})")
    return C


def expert_rows(packed: PackedExperts, proj: str, A: torch.Tensor, counts: torch.Tensor, round_bf16: bool = False,
                pool: int = 0) -> torch.Tensor:
    """The forward products one projection at a time: C[r] = A[r] . W_e^T for the rows of each local
    expert e (``counts[e]`` rows each, in order): A [rows, K] float32, C [rows, M] float32 (gate / up:
    K = H, M = I; down: K = I, M = H). ``round_bf16``: a bf16 model's activations (AMX tiles)."""
    lib = _lib()
    M, K, fmt, group, f16, p = _sizes(packed, proj)
    E, rows = _check_rows(f"expert_rows({proj})", packed, A, K, counts)
    C = torch.empty(rows, M, dtype=torch.float32)
    if rows == 0:
        return C
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = counts.long().cumsum(0)
    args = _RowsTArgs(M, K, E, rows, K, M, fmt, group, f16, 0, int(bool(round_bf16)), native._pool(pool),
                      offsets.data_ptr(), p, A.data_ptr(), C.data_ptr())
    _check_rc(lib.kt_expert_rows(ctypes.byref(args)), f"expert_rows({proj})")
    return C


def silu_mul_backward(gu: torch.Tensor, z: torch.Tensor, w: torch.Tensor, dg: Optional[torch.Tensor] = None,
                      du: Optional[torch.Tensor] = None, pool: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dg, du, dw): the gradients of a = silu(g) * u times each route's weight, in one native pass
    (act_grad.inc): gu [rows, 2 I] (moe_forward_saving's gate then up outputs), z [rows, I] the
    gradient of a, w [rows] the routing weights; dg = w z u s (1 + g (1 - s)), du = w z g s
    (s = sigmoid(g)), dw = <z, a> a row. ``dg`` / ``du``: float32 [rows, I] buffers to write into."""
    lib = _lib()

    def ok(t, shape) -> bool:
        return (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                and t.is_contiguous() and tuple(t.shape) == shape)

    rows = gu.shape[0] if isinstance(gu, torch.Tensor) and gu.dim() == 2 else -1
    I = gu.shape[1] // 2 if rows >= 0 else 0
    if rows < 0 or gu.shape[1] % 2 or not ok(gu, (rows, 2 * I)) or not ok(z, (rows, I)) or not ok(w, (rows,)):
        raise ValueError(f"silu_mul_backward: gu [rows, 2 I], z [rows, I] and w [rows] must be contiguous float32 "
                         f"CPU tensors, got {tuple(getattr(gu, 'shape', ()))}, {tuple(getattr(z, 'shape', ()))}, "
                         f"{tuple(getattr(w, 'shape', ()))}")
    dg = torch.empty(rows, I, dtype=torch.float32) if dg is None else dg
    du = torch.empty(rows, I, dtype=torch.float32) if du is None else du

    if not ok(dg, (rows, I)) or not ok(du, (rows, I)) or overlaps(dg, du) \
            or any(overlaps(o, i) for o in (dg, du) for i in (gu, z, w)):
        raise ValueError(f"silu_mul_backward: dg and du must be two contiguous float32 CPU tensors [{rows}, {I}] "
                         f"that overlap neither each other nor the inputs (the pass reads the inputs as it writes)")
    dw = torch.empty(rows, dtype=torch.float32)
    if rows:
        args = _ActGradArgs(rows, I, native._pool(pool), gu.data_ptr(), z.data_ptr(), w.data_ptr(), dg.data_ptr(),
                            du.data_ptr(), dw.data_ptr())
        _check_rc(lib.kt_silu_mul_backward(ctypes.byref(args)), "silu_mul_backward")
    return dg, du, dw
