"""RMS normalisation and rotary embeddings on the native CPU kernels while fine-tuning, with autograd.

The torch reference (``backend/torch_ops/norm_rope.py``) makes a dozen float32 passes over its
tensors forward and backward: on the benchmark's 2-layer, 512-token LoRA step (bench/train_lora.py)
the norms and rope took ~80 ms of ~640. Here the forward is the inference kernels' (``native_ops``:
rmsnorm, rope, one pass each), and the backward:

- rmsnorm (frozen weight): the input gradient in one native pass (``norm_grad.inc``,
  ``kt_rmsnorm_backward``): dx = r (g w) - x r^3 <g w, x> / D, r = rsqrt(mean(x^2) + eps).
- rope: a rotation's gradient is the rotation by minus the angle, so it is the same kernel on the
  gradients with the sines of the table's rows negated (exactly autograd's arithmetic on them).

``rmsnorm`` / ``rope`` return None where the native kernels do not take the call (no library, an
accelerator tensor, float16, a weight that wants its own gradient): the caller runs the reference.
"""
from __future__ import annotations

from typing import Optional

import torch


def _ops():
    try:
        from kt_backends.cpu import native_ops
    except ImportError:
        return None
    return native_ops if native_ops.available() else None


def rmsnorm_backward(x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, eps: float, pool: int = 0
                     ) -> torch.Tensor:
    """dL/dx of ``rmsnorm(x, weight, eps)`` given g = dL/d(out): contiguous CPU tensors, x and g of one
    shape [..., D] and dtype (float32 / bf16), weight [D]; dx in x's dtype."""
    from kt_backends.cpu import native_ops

    ok = (isinstance(x, torch.Tensor) and isinstance(g, torch.Tensor) and isinstance(weight, torch.Tensor)
          and x.dtype in native_ops._DTYPES and weight.dtype in native_ops._DTYPES and g.dtype == x.dtype
          and g.shape == x.shape and x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1]
          and x.device.type == g.device.type == weight.device.type == "cpu")
    if not ok:
        raise ValueError(f"rmsnorm_backward: x and g must be CPU float32 / bfloat16 tensors of one shape [..., D] and "
                         f"dtype, weight [D]; got x {native_ops._what(x)}, g {native_ops._what(g)}, weight "
                         f"{native_ops._what(weight)}")
    x, g, weight = x.contiguous(), g.contiguous(), weight.contiguous()
    dx = torch.empty_like(x)
    D = x.shape[-1]
    rows = x.numel() // D if D else 0
    if rows == 0:
        return dx
    lib = native_ops._need()
    codes = native_ops._DTYPES
    pack = native_ops._PACKERS["kt_rmsnorm_backward"][0].pack  # norm_grad.inc RmsNormGradArgs
    args = pack(rows, D, float(eps), codes[x.dtype], codes[weight.dtype], native_ops._pool(pool), x.data_ptr(),
                weight.data_ptr(), g.data_ptr(), dx.data_ptr())
    native_ops._check_rc(lib.kt_rmsnorm_backward(args), "rmsnorm_backward")
    return dx


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from kt_backends.cpu import native_ops

        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return native_ops.rmsnorm(x, weight, eps)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return rmsnorm_backward(x, weight, g, ctx.eps), None, None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, cos_sin, interleaved):
        from kt_backends.cpu import native_ops

        ctx.save_for_backward(positions, cos_sin)
        ctx.interleaved = interleaved
        return native_ops.rope(q, k, positions, cos_sin, interleaved)

    @staticmethod
    def backward(ctx, gq, gk):
        from kt_backends.cpu import native_ops

        positions, cos_sin = ctx.saved_tensors
        half = cos_sin.shape[-1] // 2
        rows = cos_sin[positions.long()]  # the tokens' rows, sines negated: the rotation by minus each angle
        table = torch.cat((rows[:, :half], -rows[:, half:]), dim=-1).contiguous()
        at = torch.arange(positions.shape[0], dtype=torch.int64)
        dq, dk = native_ops.rope(gq, gk, at, table, ctx.interleaved)
        return dq, dk, None, None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """The reference's rmsnorm with autograd on the native kernels, or None where they do not take it."""
    ops = _ops()
    if ops is None or not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) \
            or x.device.type != "cpu" or weight.device.type != "cpu" or weight.requires_grad \
            or x.dtype not in ops._DTYPES or weight.dtype not in ops._DTYPES or weight.dim() != 1 \
            or x.dim() < 1 or x.shape[-1] != weight.shape[0] or x.numel() == 0 or x.shape[-1] > ops.MAX_DIM:
        return None
    return _RmsNorm.apply(x, weight, float(eps))


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, interleaved: bool = False
         ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The reference's rope with autograd on the native kernels, or None where they do not take it."""
    ops = _ops()
    if ops is None or any(not isinstance(t, torch.Tensor) or t.device.type != "cpu"
                          for t in (q, k, positions, cos_sin)):
        return None
    if cos_sin.requires_grad or cos_sin.dtype != torch.float32 or cos_sin.dim() != 2 or q.dim() != 3 or k.dim() != 3 \
            or q.dtype not in ops._DTYPES or k.dtype not in ops._DTYPES or positions.dim() != 1 \
            or positions.dtype not in ops._INDEX_DTYPES or not q.shape[0] == k.shape[0] == positions.shape[0] > 0 \
            or q.shape[2] != k.shape[2] or not 2 <= cos_sin.shape[1] <= q.shape[2] <= ops.MAX_HEAD_DIM \
            or cos_sin.shape[1] % 2 or cos_sin.shape[0] == 0:
        return None
    return _Rope.apply(q, k, positions, cos_sin, bool(interleaved))
