"""Causal self-attention's backward pass (and, without AMX, its forward) while fine-tuning a bf16 model on
a CPU that multiplies bf16 pairs (AMX tiles, AVX512-BF16).

torch's fused CPU attention (SDPA's flash kernel) runs the forward of a 512-token, 32-head layer in
~5 ms on 2 threads of an AMX Xeon, but its backward in ~29 ms: a sixth of the benchmark's LoRA step
(bench/train_lora.py). Here the forward stays torch's; the backward, per chunk of query positions
(a chunk sees keys up to its last position only), is:

    S  = Q K^T,  dP = dO V^T                          float32 sums of the bf16 products
    P  = softmax(scale S),  dS = P (dP - <dO, O>) scale      bf16, zeros past the causal limit
    dV += P^T dO,  dK += dS^T Q,  dQ = dS K            torch's bf16 products, float32 sums

The first two lines are one native call for every head (``kt_attn_scores_grad``, native/attn_grad.inc):
the keys packed as AMX B tiles once, 16 query rows a tile against them, S and dP kept in L2 for the
rows' AVX-512 pass, q / dO / O read where they lie. Without the tiles, on AVX512-BF16, the same call runs
the pair kernels on the same packed keys (a 512-token layer's backward 18 -> 14 ms on a Zen 5 EPYC).
Elsewhere (the native ops' other variants, ``any_cpu`` in the tests) torch makes S and dP (its float32
products on the tiles' bf16 mode,
``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, exact for bf16 operands) and
``kt_attn_softmax_grad`` the rest. Each KV head's G query heads are stacked as [G x positions] rows,
so GQA needs no repeated keys. P and dS are rounded to bf16 for the last three products, as flash
attention rounds P. Against float64 the gradients are as close as torch's own backward's, or closer
(tests). A 512-token layer's forward + backward: ~22 ms against torch's 33-34.

Without AMX (Zen 4 / 5) torch's fused forward is slow too (24 ms for that layer on 2 threads of a Zen 5
EPYC); ``attention_forward`` runs it as the same chunks (S in float32 sums, the native softmax writing P in
bf16, then P v): forward + backward 67 -> 28 ms there.

``attend`` has ``torch_ops.attention.attend``'s contract and takes this path only for plain causal
attention of bf16 tensors that want gradients, with the native ops loaded, a torch that has the
precision switch, and bf16 pair products in hardware (elsewhere the float32 products would be slower
than torch's backward; the tests pass ``any_cpu``); ``KT_NATIVE_ATTENTION_GRAD=0`` turns it off.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from kt_core.backend.torch_ops import attention as torch_attention
from kt_core.train.scratch import work

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


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, sinks, any_cpu: bool = False) -> bool:
    """Whether ``attend`` runs this path for these inputs."""
    if mask is not None or sinks is not None or os.environ.get("KT_NATIVE_ATTENTION_GRAD", "1") == "0":
        return False
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return False
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 3 for t in (q, k, v)):
        return False
    if not k.shape[0] or q.shape[-2] != k.shape[-2] or q.shape[0] % k.shape[0] or v.shape != k.shape \
            or q.shape[-1] != k.shape[-1]:
        return False
    native, _ = _ops()
    return native is not None and _precision_switch() and (any_cpu or _bf16_products(native))


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
    """The native element-wise pass: S, dP float32 [rows, keys], O, dO bf16 [rows, head_dim] (contiguous);
    row r is query position pos0 + r % period, which sees keys 0..position. Writes P and dS (bf16 [rows,
    keys]): softmax(scale S) and P (dP - <dO, O>) scale, zero past the keys the row sees."""
    _, native_ops = _ops()
    if native_ops is None:
        raise RuntimeError("native CPU ops unavailable for attention's backward pass: reinstall kt-core")
    rows, keys = S.shape
    ok = (S.dtype == dP.dtype == torch.float32 and P.dtype == dS.dtype == O.dtype == dO.dtype == torch.bfloat16
          and S.shape == dP.shape == P.shape == dS.shape and O.dim() == 2 and O.shape == dO.shape
          and O.shape[0] == rows and all(t.is_contiguous() and t.device.type == "cpu" for t in (S, dP, O, dO, P, dS))
          and period >= 1 and rows % period == 0 and pos0 >= 0)
    if not ok:
        raise ValueError(f"softmax_grad: S, dP float32 [rows, keys], O, dO bf16 [rows, head_dim], P, dS bf16 [rows, "
                         f"keys], contiguous CPU tensors, rows a multiple of period; got S {tuple(S.shape)} {S.dtype}, "
                         f"dP {tuple(dP.shape)} {dP.dtype}, O {tuple(O.shape)} {O.dtype}, dO {tuple(dO.shape)} "
                         f"{dO.dtype}, P {tuple(P.shape)} {P.dtype}, dS {tuple(dS.shape)} {dS.dtype}, period {period}, "
                         f"pos0 {pos0}")
    if rows == 0:
        return
    pack = native_ops._PACKERS["kt_attn_softmax_grad"][0].pack  # attn_grad.inc AttnSoftmaxGradArgs
    args = pack(rows, keys, keys, period, pos0, O.shape[1], float(scale), native_ops._pool(pool), S.data_ptr(),
                dP.data_ptr(), O.data_ptr(), dO.data_ptr(), P.data_ptr(), dS.data_ptr())
    native_ops._check_rc(native_ops._need().kt_attn_softmax_grad(args), "attn_softmax_grad")


def softmax(S: torch.Tensor, period: int, pos0: int, scale: float, P: torch.Tensor, pool: int = 0) -> None:
    """The forward pass's probabilities: P = softmax(scale S) (bf16 [rows, keys]) of S float32 [rows, keys],
    row r at query position pos0 + r % period seeing keys 0..position, zeros past them (one native pass)."""
    _, native_ops = _ops()
    if native_ops is None:
        raise RuntimeError("native CPU ops unavailable for attention's softmax: reinstall kt-core")
    rows, keys = S.shape
    if not (S.dtype == torch.float32 and P.dtype == torch.bfloat16 and S.shape == P.shape and S.is_contiguous()
            and P.is_contiguous() and S.device.type == P.device.type == "cpu" and period >= 1 and rows % period == 0
            and pos0 >= 0):
        raise ValueError(f"softmax: S float32 and P bf16 [rows, keys], contiguous CPU tensors, rows a multiple of "
                         f"period; got S {tuple(S.shape)} {S.dtype}, P {tuple(P.shape)} {P.dtype}, period {period}")
    if rows == 0:
        return
    pack = native_ops._PACKERS["kt_attn_softmax_grad"][0].pack  # dP, O, dO, dS null: P alone
    args = pack(rows, keys, keys, period, pos0, 1, float(scale), native_ops._pool(pool), S.data_ptr(), 0, 0, 0,
                P.data_ptr(), 0)
    native_ops._check_rc(native_ops._need().kt_attn_softmax_grad(args), "attn_softmax")


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


def _chunks(n: int, G: int, keys: Optional[int] = None) -> list[tuple[int, int]]:
    """Query position chunks [c0, c1): at most CHUNK positions (a chunk's products stop at its last
    key, so smaller chunks skip more of the causal mask's zeros), scores of ``keys`` (default n) within
    SCORE_BYTES."""
    per = max(1, min(CHUNK, SCORE_BYTES // (4 * G * (keys or n))))
    return [(c0, min(n, c0 + per)) for c0 in range(0, n, per)]


def attention_backward(q, k, v, o, do, scale: float):
    """(dq, dk, dv) of causal attention o = softmax(scale q k^T) v: q, o, do [Hq, n, D], k, v [Hkv, n, D]
    (bf16; GQA by head groups); float32 sums, results in bf16."""
    Hq, n, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    dq = torch.empty(Hq, n, D, dtype=q.dtype)
    dk = torch.zeros(Hkv, n, D, dtype=torch.float32)
    dv = torch.zeros(Hkv, n, D, dtype=torch.float32)
    for c0, c1 in _chunks(n, G):
        m = c1 - c0
        rows = G * m
        P = work("attention.P", Hkv * rows, c1, torch.bfloat16).view(Hkv, rows, c1)
        dS = work("attention.dS", Hkv * rows, c1, torch.bfloat16).view(Hkv, rows, c1)
        tiles = scores_grad(q, do, o, k, v, c0, c1, scale, P.view(Hkv, G, m, c1), dS.view(Hkv, G, m, c1))
        qc = q[:, c0:c1].reshape(Hkv, rows, D)  # each KV head's query rows stacked (a copy: q lies [n, Hq, D])
        doc = do[:, c0:c1].reshape(Hkv, rows, D)
        if not tiles:
            for h in range(Hkv):
                heads = slice(h * G, (h + 1) * G)
                S = _products_fp32(qc[h], k[h, :c1], work("attention.S", rows, c1))
                dP = _products_fp32(doc[h], v[h, :c1], work("attention.dP", rows, c1))
                softmax_grad(S, dP, o[heads, c0:c1].reshape(rows, D).contiguous(), doc[h].contiguous(), m, c0, scale,
                             P[h], dS[h])
        dv[:, :c1] += torch.bmm(P.transpose(1, 2), doc)
        dk[:, :c1] += torch.bmm(dS.transpose(1, 2), qc)
        dq[:, c0:c1] = torch.bmm(dS, k[:, :c1]).view(Hq, m, D)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


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


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        with torch.no_grad():
            if takes_forward():
                o = attention_forward(q, k, v, scale)
            else:
                o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                   enable_gqa=q.shape[0] != k.shape[0])[0]
        ctx.save_for_backward(q, k, v, o)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # (P and dS are native: no graph for second derivatives)
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, o, do, ctx.scale)
        return dq, dk, dv, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           sinks: Optional[torch.Tensor] = None, any_cpu: bool = False) -> torch.Tensor:
    """``torch_ops.attention.attend``'s contract (q [Hq, n, D], k / v [Hkv, L, D] here), with this
    module's backward pass where ``takes`` says so."""
    if takes(q, k, v, mask, sinks, any_cpu):
        if scale is None:
            scale = q.shape[-1] ** -0.5
        return _CausalAttention.apply(q, k, v, float(scale))
    return torch_attention.attend(q, k, v, mask, scale, sinks)
