"""Rotary embeddings in the spec: ``RopeSpec`` (and its inverse frequencies, yarn included) and the
rope parameters and rotary dimension read from a ``config.json``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kt_core.errors import KtError

if TYPE_CHECKING:  # torch loads on first use: kt plan reads specs without it
    import torch


@dataclass
class RopeSpec:
    theta: float
    rot_dim: int
    kind: str = "default"  # default | linear | llama3 | yarn | freq_factors (a GGUF's rope_freqs)
    params: dict[str, Any] = field(default_factory=dict)
    interleaved: bool = False

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [rot_dim/2], cos/sin scale), as the reference defines them."""
        import torch

        dim, base, p = self.rot_dim, self.theta, self.params
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if self.kind == "linear":
            return inv / float(p["factor"]), 1.0
        if self.kind == "llama3":
            factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old = float(p["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * scaled / factor + smooth * scaled
            is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
            return torch.where(is_mid, mid, scaled), 1.0
        if self.kind == "yarn":
            return _yarn(dim, base, p)
        if self.kind == "freq_factors":  # a GGUF's rope_freqs: each frequency divided by its factor
            return inv / torch.tensor(p["freq_factors"], dtype=torch.float32), 1.0
        return inv, 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, p: dict) -> tuple[torch.Tensor, float]:
    import torch

    factor = float(p["factor"])
    old = float(p["original_max_position_embeddings"])
    att = p.get("attention_factor")
    if att is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            att = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
        else:
            att = yarn_mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr(rot: float) -> float:
        return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = corr(fast), corr(slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, float(att)


def _rope_params(c: dict) -> tuple[float, str, dict]:
    p = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        p = {**scaling, **p}
    theta = float(p.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = str(p.get("rope_type", p.get("type", "default")) or "default")
    if kind in ("dynamic", "default", "mrope"):
        kind = "default"
    if kind == "yarn" and "original_max_position_embeddings" not in p:
        p["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or c.get(
            "max_position_embeddings", 4096)
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise KtError(f"rope scaling '{kind}' is not supported (supported: default, linear, llama3, yarn)")
    return theta, kind, p


def _rot_dim(c: dict, fam: str, head_dim: int, params: dict) -> int:
    """The rotary dimension: rope_parameters' partial_rotary_factor, else the top-level one (GLM-4.5's
    config.json; when absent, the reference's default), else MiniMax-M2's rotary_dim."""
    factor = params.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if factor is None and c.get("rotary_dim"):
        return int(c["rotary_dim"])
    if factor is None:  # the references' defaults
        factor = {"glm4_moe": 0.5, "qwen3_next": 0.25, "qwen3_5_moe": 0.25}.get(fam, 1.0)
    return int(head_dim * float(factor))
