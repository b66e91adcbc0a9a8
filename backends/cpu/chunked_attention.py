"""Causal attention in query chunks on the native ops, for bf16 models on CPUs that multiply bf16 pairs
(AMX tiles, AVX512-BF16): the pieces fine-tuning's backward (kt_core/train/native_attention.py) and the
CPU backend's plain causal prefill (native_attention.py here) share.

- ``softmax_grad`` / ``softmax``: the element-wise passes (``kt_attn_softmax_grad``, native/attn_grad.inc);
- ``scores_grad`` / ``scores_softmax``: S = q k^T (and dP = dO v^T) made on the tiles or the pair kernels
  and reduced in the same native call (``kt_attn_scores_grad``), every tensor read where it lies;
- ``attention_forward``: o = softmax(scale q k^T) v a chunk of query positions at a time (S in float32
  sums, P rounded to bf16 as flash attention rounds it), which beats torch's fused kernel without AMX (Zen 5
  EPYC, 2 threads, a 512-token 32-head layer: ~5 against 24 ms);
- ``_chunks``: the query chunks (at most CHUNK positions, scores within SCORE_BYTES).

Each KV head's G query heads are stacked as [G x positions] rows, so GQA needs no repeated keys.
"""
from __future__ import annotations

from typing import Optional

import torch

from kt_backends.cpu.native_abi import overlaps
from kt_core.runtime.scratch import work

SCORE_BYTES = 32 << 20  # float32 scores of one query chunk of one KV head (and as much of dP)
CHUNK = 256  # query positions a chunk at most


def _ops():
    try:
        from kt_backends.cpu import native, native_ops
    except ImportError:
        return None, None
    return (native, native_ops) if native_ops.available() else (None, None)


def _precision_switch() -> bool:
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return matmul is not None and hasattr(matmul, "fp32_precision")


def _pair_products() -> bool:
    """The native ops loaded, on kernels that multiply bf16 pairs (``_bf16_products``)."""
    native, _ = _ops()
    return native is not None and _bf16_products(native)


def _bf16_products(native) -> bool:
    """Whether this CPU's kernels multiply bf16 pairs in hardware (AMX tiles, AVX512-BF16), which
    torch's float32 products take in their bf16 mode too: then this path beats torch's backward (Zen 5
    EPYC, 2 threads, a 512-token 32-head layer's forward + backward: 46 against 67 ms). Without them
    the float32 products are slower than torch's."""
    variant = native.variant()
    return variant == "amx" or native.bf16_tile_tokens(variant, "bf16") > 0


def softmax_grad(S: torch.Tensor, dP: torch.Tensor, O: torch.Tensor, dO: torch.Tensor, period: int, pos0: int,
                 scale: float, P: torch.Tensor, dS: torch.Tensor, pool: int = 0) -> None:
    """The native element-wise pass: S, dP float32 [rows, keys], O, dO [rows, head_dim] (contiguous);
    row r is query position pos0 + r % period, which sees keys 0..position. Writes P and dS ([rows,
    keys]): softmax(scale S) and P (dP - <dO, O>) scale, zero past the keys the row sees. O, dO, P and
    dS are all bf16 or all float32; float32 P and dS may be S and dP themselves (written in place)."""
    _, native_ops = _ops()
    if native_ops is None:
        raise RuntimeError("native CPU ops unavailable for attention's backward pass: reinstall kt-core")
    rows, keys = S.shape
    ok = (S.dtype == dP.dtype == torch.float32 and P.dtype in (torch.bfloat16, torch.float32)
          and P.dtype == dS.dtype == O.dtype == dO.dtype
          and S.shape == dP.shape == P.shape == dS.shape and O.dim() == 2 and O.shape == dO.shape
          and O.shape[0] == rows and all(t.is_contiguous() and t.device.type == "cpu" for t in (S, dP, O, dO, P, dS))
          and period >= 1 and rows % period == 0 and pos0 >= 0 and _apart((P, dS), (S, dP, O, dO), P.dtype))
    if not ok:
        raise ValueError(f"softmax_grad: S, dP float32 [rows, keys], O, dO [rows, head_dim] and P, dS [rows, keys] "
                         f"all bf16 or all float32, contiguous CPU tensors, rows a multiple of period, P and dS "
                         f"apart from each other and the inputs (float32 P may be S, dS dP); got S "
                         f"{tuple(S.shape)} {S.dtype}, dP {tuple(dP.shape)} {dP.dtype}, O {tuple(O.shape)} {O.dtype}, "
                         f"dO {tuple(dO.shape)} {dO.dtype}, P {tuple(P.shape)} {P.dtype}, dS {tuple(dS.shape)} "
                         f"{dS.dtype}, period {period}, pos0 {pos0}")
    if rows == 0:
        return
    pack = native_ops._PACKERS["kt_attn_softmax_grad"][0].pack  # attn_grad.inc AttnSoftmaxGradArgs
    args = pack(rows, keys, keys, period, pos0, O.shape[1], float(scale), native_ops._pool(pool),
                native_ops._DTYPES[P.dtype], 0, S.data_ptr(), dP.data_ptr(), O.data_ptr(), dO.data_ptr(), P.data_ptr(),
                dS.data_ptr())
    native_ops._check_rc(native_ops._need().kt_attn_softmax_grad(args), "attn_softmax_grad")


def softmax(S: torch.Tensor, period: int, pos0: int, scale: float, P: torch.Tensor, pool: int = 0) -> None:
    """The forward pass's probabilities: P = softmax(scale S) ([rows, keys], bf16 or float32, which may be
    S itself) of S float32 [rows, keys], row r at query position pos0 + r % period seeing keys 0..position,
    zeros past them (one native pass)."""
    _, native_ops = _ops()
    if native_ops is None:
        raise RuntimeError("native CPU ops unavailable for attention's softmax: reinstall kt-core")
    rows, keys = S.shape
    if not (S.dtype == torch.float32 and P.dtype in (torch.bfloat16, torch.float32) and S.shape == P.shape
            and S.is_contiguous() and P.is_contiguous() and S.device.type == P.device.type == "cpu" and period >= 1
            and rows % period == 0 and pos0 >= 0 and _apart((P,), (S,), P.dtype)):
        raise ValueError(f"softmax: S float32 and P bf16 or float32 [rows, keys], contiguous CPU tensors, rows a "
                         f"multiple of period, P S itself or apart from it; got S {tuple(S.shape)} {S.dtype}, P "
                         f"{tuple(P.shape)} {P.dtype}, period {period}")
    if rows == 0:
        return
    pack = native_ops._PACKERS["kt_attn_softmax_grad"][0].pack  # dP, O, dO, dS null: P alone
    args = pack(rows, keys, keys, period, pos0, 1, float(scale), native_ops._pool(pool), native_ops._DTYPES[P.dtype],
                0, S.data_ptr(), 0, 0, 0, P.data_ptr(), 0)
    native_ops._check_rc(native_ops._need().kt_attn_softmax_grad(args), "attn_softmax")


def _apart(outs: tuple, ins: tuple, dtype: torch.dtype) -> bool:
    """The pass's outputs share no byte with each other or its inputs, except that a float32 output may be
    exactly its own input (P over S, dS over dP: ins[i] for outs[i]), which the pass reads before it writes."""
    def same(a, b) -> bool:
        return dtype == torch.float32 and a.data_ptr() == b.data_ptr() and a.shape == b.shape

    for i, o in enumerate(outs):
        if any(overlaps(o, x) for x in outs[i + 1:]):
            return False
        if any(overlaps(o, x) and not (j == i and same(o, x)) for j, x in enumerate(ins)):
            return False
    return True


def scores_grad(q: torch.Tensor, do: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c0: int,
                c1: int, scale: float, P: torch.Tensor, dS: torch.Tensor, pool: int = 0) -> bool:
    """``softmax_grad`` for every head with S = q k^T and dP = dO v^T made on the AMX tiles (or the
    AVX512-BF16 pair kernels) by the same native call (``kt_attn_scores_grad``), every tensor read where
    it lies: q, do, o [Hq, n, D], k, v [Hkv, >= c1, D] (bf16, any head and position strides, GQA by head
    groups); query positions [c0, c1), keys [0, c1); writes P, dS [Hkv, G, c1 - c0, c1]. False where
    neither is on (then the caller runs the products)."""
    if not _pair_products():
        return False
    Hq, _, D = q.shape
    H = k.shape[0]
    G, m = Hq // H, c1 - c0
    ok = (all(t.device.type == "cpu" for t in (q, do, o, k, v, P, dS))
          and all(t.dtype == torch.bfloat16 and t.shape == q.shape and t.stride(2) == 1 for t in (q, do, o))
          and all(t.dtype == torch.bfloat16 and t.dim() == 3 and t.shape[0] == H and t.shape[1] >= c1
                  and t.shape[2] == D and t.stride(2) == 1 for t in (k, v))
          and k.stride()[:2] == v.stride()[:2] and P.shape == dS.shape == (H, G, m, c1)
          and P.dtype == dS.dtype == torch.bfloat16 and P.is_contiguous() and dS.is_contiguous()
          and 0 <= c0 < c1 <= q.shape[1] and D % 32 == 0 and Hq % H == 0)
    if not ok:
        return False
    return _scores_call((H, G, D, c0, c1, q.stride(0), q.stride(1), do.stride(0), do.stride(1), o.stride(0),
                         o.stride(1), k.stride(0), k.stride(1)), scale, pool,
                        (q.data_ptr(), do.data_ptr(), o.data_ptr(), k.data_ptr(), v.data_ptr(), P.data_ptr(),
                         dS.data_ptr()), "attn_scores_grad")


def _scores_call(sizes: tuple, scale: float, pool: int, pointers: tuple, op: str) -> bool:
    """kt_attn_scores_grad (attn_grad.inc AttnScoresGradArgs: sizes and strides, scale, pool, pointers);
    False where the library takes it on neither the tiles nor the pair kernels (ERR_FORMAT)."""
    _, native_ops = _ops()
    pack = native_ops._PACKERS["kt_attn_scores_grad"][0].pack
    rc = native_ops._need().kt_attn_scores_grad(pack(*sizes, float(scale), native_ops._pool(pool), *pointers))
    if rc == -3:  # ERR_FORMAT: the library's tiles are off (its first-use check), and no pair kernels
        return False
    native_ops._check_rc(rc, op)
    return True


def scores_softmax(q: torch.Tensor, k: torch.Tensor, c0: int, c1: int, scale: float, P: torch.Tensor,
                   pool: int = 0) -> bool:
    """The forward's P = softmax(scale q k^T) for query positions [c0, c1) against keys [0, c1) of every
    head (q [Hq, n, D], k [Hkv, >= c1, D], bf16, any head and position strides), written to P [Hkv, G,
    c1 - c0, c1] by one native call (``kt_attn_scores_grad``'s forward form: S on the AVX512-BF16 pair
    kernels, never in memory). False where the kernels do not take it (then the caller runs the products)."""
    if not _pair_products():
        return False
    Hq, _, D = q.shape
    H = k.shape[0]
    G, m = Hq // H, c1 - c0
    ok = (q.device.type == k.device.type == P.device.type == "cpu" and q.dtype == k.dtype == P.dtype == torch.bfloat16
          and q.stride(2) == 1 and k.dim() == 3 and k.stride(2) == 1 and k.shape[1] >= c1 and k.shape[2] == D
          and P.shape == (H, G, m, c1) and P.is_contiguous() and 0 <= c0 < c1 <= q.shape[1] and D % 32 == 0
          and Hq % H == 0)
    if not ok:
        return False
    return _scores_call((H, G, D, c0, c1, q.stride(0), q.stride(1), 0, 0, 0, 0, k.stride(0), k.stride(1)), scale, pool,
                        (q.data_ptr(), 0, 0, k.data_ptr(), 0, P.data_ptr(), 0), "attn_scores_softmax")  # forward form


def _products_fp32(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b_t^T in float32 from bf16 a, b_t, on the tiles (exact products, float32 sums)."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        return torch.mm(a.float(), b_t.float().t(), out=out)
    finally:
        matmul.fp32_precision = before


def _chunks(n: int, G: int, keys: Optional[int] = None, most: Optional[int] = None) -> list[tuple[int, int]]:
    """Query position chunks [c0, c1): at most ``most`` (default CHUNK) positions (a chunk's products stop
    at its last key, so smaller chunks skip more of the causal mask's zeros), scores of ``keys`` (default
    n) within SCORE_BYTES."""
    per = max(1, min(most or CHUNK, SCORE_BYTES // (4 * G * max(1, keys or n))))
    return [(c0, min(n, c0 + per)) for c0 in range(0, n, per)]


def takes_forward() -> bool:
    """Whether ``attention_forward`` beats torch's fused kernel here: the native ops loaded, torch's
    precision switch, and bf16 pair products without AMX (with the tiles torch's kernel is faster)."""
    native, _ = _ops()
    return native is not None and _precision_switch() and native.variant() != "amx" and _bf16_products(native)


def attention_forward(q, k, v, scale: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention o = softmax(scale q k^T) v, q [Hq, n, D] (any strides), k, v [Hkv, L, D] with
    L >= n (the queries are the last n positions: a cached prefix before them), bf16, GQA by head groups;
    ``out``: [Hq, n, D] to write (a view may be passed). Per query chunk, S in float32 sums of the bf16
    products, P rounded to bf16 (as flash attention and the backward round it) for P v. Where the kernels
    multiply bf16 pairs without tiles (AVX512-BF16: Zen 4 / 5) this beats torch's fused kernel (Zen 5
    EPYC, 2 threads, 512 tokens, 32 heads: ~5 against 24 ms); with AMX torch's is faster (~5 ms). Also
    the CPU backend's prefill attention there (backends/cpu/native_attention.py)."""
    Hq, n, D = q.shape
    Hkv, L = k.shape[0], k.shape[1]
    G, off = Hq // Hkv, L - n
    o = torch.empty(Hq, n, D, dtype=q.dtype) if out is None else out
    for c0, c1 in _chunks(n, G, L):
        m, keys = c1 - c0, off + c1
        rows = G * m
        P = work("attention.P", Hkv * rows, keys, torch.bfloat16).view(Hkv, rows, keys)
        if off or not scores_softmax(q, k, c0, c1, scale, P.view(Hkv, G, m, keys)):  # (positions: from 0)
            qc = q[:, c0:c1].reshape(Hkv, rows, D)
            for h in range(Hkv):
                softmax(_products_fp32(qc[h], k[h, :keys], work("attention.S", rows, keys)), m, off + c0, scale,
                        P[h])
        o[:, c0:c1] = torch.bmm(P, v[:, :keys]).view(Hq, m, D)
    return o
