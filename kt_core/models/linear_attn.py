"""Qwen3-Next's and Qwen3.5's Gated DeltaNet layer, through the device contract's linear-attention ops.

in_proj_qkvz / in_proj_ba (Qwen3.5: in_proj_qkv, _z, _b, _a) give, per key head, its q and k, its value heads' v and z (the output
gate), and their b (write strength, sigmoid) and a (decay); q | k | v go through a short causal
convolution (SiLU), then the gated delta rule continues each sequence's recurrent state; the
output is RMS-normalised per value head, gated by SiLU(z) and projected out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_core.backend.contract import Backend
from kt_core.kvcache.paged import Batch
from kt_core.models.spec import ModelSpec


def load(r, p: str, spec: ModelSpec) -> "GatedDeltaNet":
    """The layer's weights (``r``: the model loader's reader), named as Qwen3-Next's checkpoints name them."""
    la, H = spec.linear, spec.hidden_size
    a = p + "linear_attn."
    kd, vd = la.num_k_heads * la.k_dim, la.num_v_heads * la.v_dim
    if la.split_proj:  # Qwen3.5: q|k|v already in the convolution's channel order
        w = {"qkv": r.dense(a + "in_proj_qkv.weight", (2 * kd + vd, H)), "z": r.dense(a + "in_proj_z.weight", (vd, H)),
             "b": r.dense(a + "in_proj_b.weight", (la.num_v_heads, H)),
             "a": r.dense(a + "in_proj_a.weight", (la.num_v_heads, H))}
    else:
        w = {"qkvz": r.dense(a + "in_proj_qkvz.weight", (2 * kd + 2 * vd, H)),
             "ba": r.dense(a + "in_proj_ba.weight", (2 * la.num_v_heads, H))}
    w |= {"conv": r.t(a + "conv1d.weight", (la.conv_dim, 1, la.conv_kernel))[:, 0].contiguous(),
         "dt_bias": r.t(a + "dt_bias", (la.num_v_heads,), torch.float32),
         "A": -r.t(a + "A_log", (la.num_v_heads,), torch.float32).exp(),
         "norm": r.t(a + "norm.weight", (la.v_dim,)),
         "out": r.dense(a + "out_proj.weight", (H, vd))}
    return GatedDeltaNet(w, spec)


class GatedDeltaNet:
    def __init__(self, w: dict, spec: ModelSpec) -> None:
        self.w, self.spec = w, spec

    def __call__(self, be: Backend, x: torch.Tensor, batch: Batch, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
                 cos_sin=None) -> torch.Tensor:
        la, w, T = self.spec.linear, self.w, x.shape[0]
        Hk, Hv, dk, dv = la.num_k_heads, la.num_v_heads, la.k_dim, la.v_dim
        rep = Hv // Hk
        if "qkv" in w:  # Qwen3.5
            mixed, z = be.linear(x, w["qkv"]), be.linear(x, w["z"])
            b, a = be.linear(x, w["b"]), be.linear(x, w["a"])
        else:  # Qwen3-Next: grouped by key head
            qkvz = be.linear(x, w["qkvz"]).view(T, Hk, 2 * dk + 2 * rep * dv)
            q, k, v, z = torch.split(qkvz, [dk, dk, rep * dv, rep * dv], dim=-1)
            b, a = torch.split(be.linear(x, w["ba"]).view(T, Hk, 2 * rep), [rep, rep], dim=-1)
            mixed = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=-1)
        slots, qsl = batch.state_slots, batch.query_start_loc
        mixed = be.causal_conv1d(mixed, conv_pool, w["conv"], slots, qsl, "silu")
        q, k, v = torch.split(mixed, [Hk * dk, Hk * dk, Hv * dv], dim=-1)
        beta = torch.sigmoid(b.reshape(T, Hv).float())
        g = w["A"] * F.softplus(a.reshape(T, Hv).float() + w["dt_bias"])
        o = be.gated_delta_rule(q.reshape(T, Hk, dk), k.reshape(T, Hk, dk), v.reshape(T, Hv, dv), g, beta,
                                ssm_pool, slots, qsl)
        o = be.rmsnorm(o, w["norm"], self.spec.rms_eps)
        o = (o.float() * F.silu(z.reshape(T, Hv, dv).float())).to(x.dtype)
        return be.linear(o.reshape(T, Hv * dv), w["out"])
