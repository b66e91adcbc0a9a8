"""RMS normalisation and rotary embeddings on torch."""
from __future__ import annotations

import torch


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rope_cos_sin(rot_dim: int, max_positions: int, base: float = 10000.0,
                 inv_freq: torch.Tensor | None = None, mscale: float = 1.0) -> torch.Tensor:
    """The ``cos_sin [max_positions, rot_dim]`` table the ``rope`` op reads (cos | sin)."""
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq.double())
    return (torch.cat((freqs.cos(), freqs.sin()), dim=-1) * mscale).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    xr, rest = x[..., :rot].float(), x[..., rot:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1) if rest.shape[-1] else out.to(x.dtype)


def rope(q, k, positions, cos_sin, interleaved=False):
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions.long()]
    cos, sin = table[:, :half].float(), table[:, half:].float()
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
