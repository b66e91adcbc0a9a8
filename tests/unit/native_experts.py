"""Tiny routed experts for the native-kernel boundary tests: their weights in any format, the packed
fixture and a valid routed call to check against."""
import pytest
import torch

from kt_backends.cpu import native
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight, quantize

H, I = 64, 32


def int8_with_zeros(t: torch.Tensor, group: int) -> QuantizedWeight:
    """Grouped int8 with zero points, as GGUF's Q5_K / Q5_1 / Q2_K blocks keep: codes 0..31, a float
    scale and a float zero point per group (value = (code - zero) * scale)."""
    g = t.float().reshape(*t.shape[:-1], t.shape[-1] // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 31).clamp_min(1e-8)
    zero = -lo / scale
    codes = torch.round(g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 31).to(torch.int8)
    return QuantizedWeight(Quant.INT8, codes.reshape(t.shape), scale, zero, group, t.shape[-1])


def experts(fmt="int4", E=4, group=32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        t = (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)
        return t if fmt == "bf16" else quantize(t.float(), fmt, group_size=group)
    kw = {}
    if bias:
        kw = {k: torch.randn(E, n, generator=g) * 0.1 for k, n in (("gate_bias", I), ("up_bias", I), ("down_bias", H))}
    return ExpertWeights(torch.tensor([3, 0, 7, 5][:E]), w(E, I, H), w(E, I, H), w(E, H, I), **kw)


@pytest.fixture(scope="module")
def packed():
    return native.pack(experts())


def call(T=3, K=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.tensor([[3, 0], [7, 5], [0, 7]])[:T, :K].contiguous()
    return x, ids, torch.rand(T, K, generator=g)

