"""Every tensor of a checkpoint, by name and shape, from the ``ModelSpec`` alone.

One table serves the planner (sizes without weights) and the synthetic-checkpoint
writer (which fills the same names), so both agree with what the loader reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from kt_core.models.names import moe_names
from kt_core.models.spec import ModelSpec

# what a tensor is, for placement: "embed", "lm_head", "norm", "attention", "dense" (a dense MLP
# layer), "router", "shared" (shared experts and their gate), "experts"
GROUPS = ("embed", "lm_head", "norm", "attention", "dense", "router", "shared", "experts")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    group: str
    layer: Optional[int] = None
    expert: Optional[int] = None  # set for per-expert tensors
    linear: bool = False  # a weight matrix that the dense / expert quant formats apply to
    stored: Optional[int] = None  # bytes as its file keeps it (a GGUF's quantization), whatever quant says

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _attention(spec: ModelSpec, i: int) -> list[TensorInfo]:
    H, nh, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    a = f"model.layers.{i}.self_attn."
    out: list[TensorInfo] = []

    def lin(name, *shape):
        out.append(TensorInfo(a + name, shape, "attention", i, linear=True))

    def vec(name, n):
        out.append(TensorInfo(a + name, (n,), "attention", i))

    if spec.mla is not None:
        m = spec.mla
        qd = nh * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        if m.q_lora_rank:
            lin("q_a_proj.weight", m.q_lora_rank, H)
            vec("q_a_layernorm.weight", m.q_lora_rank)
            lin("q_b_proj.weight", qd, m.q_lora_rank)
        else:
            lin("q_proj.weight", qd, H)
        lin("kv_a_proj_with_mqa.weight", m.kv_lora_rank + m.qk_rope_head_dim, H)
        vec("kv_a_layernorm.weight", m.kv_lora_rank)
        lin("kv_b_proj.weight", nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        lin("o_proj.weight", H, nh * m.v_head_dim)
        if spec.index is not None and spec.index.runs_at(i):  # DeepSeek-V3.2's sparse attention indexer
            ix = spec.index
            lin("indexer.wq_b.weight", ix.n_heads * ix.head_dim, m.q_lora_rank)
            lin("indexer.wk.weight", ix.head_dim, H)
            vec("indexer.k_norm.weight", ix.head_dim)
            vec("indexer.k_norm.bias", ix.head_dim)
            lin("indexer.weights_proj.weight", ix.n_heads, H)
        return out
    q_rows = nh * hd * (2 if spec.attn_output_gate else 1)  # Qwen3-Next: each head's q, then its gate
    for n, rows in (("q", q_rows), ("k", nkv * hd), ("v", nkv * hd)):
        lin(f"{n}_proj.weight", rows, H)
        if spec.qkv_bias:
            vec(f"{n}_proj.bias", rows)
    lin("o_proj.weight", H, nh * hd)
    if spec.o_bias:
        vec("o_proj.bias", H)
    if spec.qk_norm:
        vec("q_norm.weight", spec.qk_norm_dims[0])
        vec("k_norm.weight", spec.qk_norm_dims[1])
    if spec.sinks:
        vec("sinks", nh)
    return out


def _linear_attention(spec: ModelSpec, i: int) -> list[TensorInfo]:
    """A Gated DeltaNet layer (Qwen3-Next): projections, the short convolution, decay and norm."""
    la, H, a = spec.linear, spec.hidden_size, f"model.layers.{i}.linear_attn."
    kd, vd = la.num_k_heads * la.k_dim, la.num_v_heads * la.v_dim
    if la.split_proj:  # Qwen3.5
        proj = [TensorInfo(a + "in_proj_qkv.weight", (2 * kd + vd, H), "attention", i, linear=True),
                TensorInfo(a + "in_proj_z.weight", (vd, H), "attention", i, linear=True),
                TensorInfo(a + "in_proj_b.weight", (la.num_v_heads, H), "attention", i, linear=True),
                TensorInfo(a + "in_proj_a.weight", (la.num_v_heads, H), "attention", i, linear=True)]
    else:
        proj = [TensorInfo(a + "in_proj_qkvz.weight", (2 * kd + 2 * vd, H), "attention", i, linear=True),
                TensorInfo(a + "in_proj_ba.weight", (2 * la.num_v_heads, H), "attention", i, linear=True)]
    return proj + [
            TensorInfo(a + "conv1d.weight", (la.conv_dim, 1, la.conv_kernel), "attention", i),
            TensorInfo(a + "dt_bias", (la.num_v_heads,), "attention", i),
            TensorInfo(a + "A_log", (la.num_v_heads,), "attention", i),
            TensorInfo(a + "norm.weight", (la.v_dim,), "attention", i),
            TensorInfo(a + "out_proj.weight", (H, vd), "attention", i, linear=True)]


def _mlp(prefix: str, H: int, inter: int, group: str, i: int) -> list[TensorInfo]:
    return [TensorInfo(prefix + "gate_proj.weight", (inter, H), group, i, linear=True),
            TensorInfo(prefix + "up_proj.weight", (inter, H), group, i, linear=True),
            TensorInfo(prefix + "down_proj.weight", (H, inter), group, i, linear=True)]


def _moe(spec: ModelSpec, i: int) -> list[TensorInfo]:
    p, m, H = f"model.layers.{i}.", spec.moe, spec.hidden_size
    E, I = m.num_experts, m.intermediate
    names = moe_names(spec.family)
    e, router = names.experts(p), names.router_weight(p)
    out = [TensorInfo(router, (E, H), "router", i)]
    if names.router_bias:
        out.append(TensorInfo(names.router_bias_name(p), (E,), "router", i))
    if names.fused:  # fused over experts in the checkpoint; sized per expert for placement
        out += [TensorInfo(e + "gate_up_proj", (E, H, 2 * I), "experts", i, linear=True),
                TensorInfo(e + "down_proj", (E, I, H), "experts", i, linear=True)]
        if m.expert_bias:
            out += [TensorInfo(e + "gate_up_proj_bias", (E, 2 * I), "experts", i),
                    TensorInfo(e + "down_proj_bias", (E, H), "experts", i)]
        return out + _shared(names, p, m, H, i)
    proj = names.projections
    if m.score_bias:
        out.append(TensorInfo(names.score_bias_name(p), (E,), "router", i))
    for j in range(E):
        out += [TensorInfo(f"{e}{j}.{proj[0]}.weight", (I, H), "experts", i, j, True),
                TensorInfo(f"{e}{j}.{proj[1]}.weight", (I, H), "experts", i, j, True),
                TensorInfo(f"{e}{j}.{proj[2]}.weight", (H, I), "experts", i, j, True)]
    return out + _shared(names, p, m, H, i)


def _shared(names, p: str, m, H: int, i: int) -> list[TensorInfo]:
    out = []
    if m.shared_intermediate:
        out += _mlp(names.shared_prefix(p), H, m.shared_intermediate, "shared", i)
        if m.shared_gate:
            out.append(TensorInfo(names.shared_gate(p), (1, H), "shared", i, linear=True))
    return out


def layer_tensors(spec: ModelSpec, i: int) -> list[TensorInfo]:
    if spec.v4 is not None:
        from kt_core.models import shapes_v4

        return shapes_v4.layer_tensors(spec, i)
    H = spec.hidden_size
    p = f"model.layers.{i}."
    out = _linear_attention(spec, i) if spec.is_linear(i) else _attention(spec, i)
    out += [TensorInfo(p + "input_layernorm.weight", (H,), "norm", i),
            TensorInfo(p + "post_attention_layernorm.weight", (H,), "norm", i)]
    out += _moe(spec, i) if spec.is_moe(i) else _mlp(moe_names(spec.family).dense_prefix(p), H,
                                                          spec.intermediate_size, "dense", i)
    return out


def model_tensors(spec: ModelSpec) -> list[TensorInfo]:
    if spec.v4 is not None:
        from kt_core.models import shapes_v4

        return shapes_v4.model_tensors(spec)
    H, V = spec.hidden_size, spec.vocab_size
    out = [TensorInfo("model.embed_tokens.weight", (V, H), "embed")]
    for i in range(spec.num_layers):
        out += layer_tensors(spec, i)
    out.append(TensorInfo("model.norm.weight", (H,), "norm"))
    if not spec.tie_embeddings:
        out.append(TensorInfo("lm_head.weight", (V, H), "lm_head", linear=True))
    return out
