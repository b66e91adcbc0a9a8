"""DeepSeek-V4's tensors, by name and shape, from the ``ModelSpec``: the one list the loader, the
planner and the synthesizer read. Names are the ones transformers' ``save_pretrained`` writes (the
release's module names under ``model.``)."""
from __future__ import annotations

from kt_core.models.shapes import TensorInfo
from kt_core.models.spec import ModelSpec

GLOBALS = {"embed": "model.embed_tokens.weight", "head": "head.weight", "norm": "model.norm.weight",
           "hc_fn": "model.hc_head.hc_fn", "hc_base": "model.hc_head.hc_base", "hc_scale": "model.hc_head.hc_scale"}


def prefix(i: int) -> str:
    return f"model.layers.{i}."


def _compressor(a: str, H: int, width: int, rate: int, dim: int, i: int) -> list[TensorInfo]:
    """A compressor of ``width`` projected features per token (two series on csa layers) pooled into
    ``dim``-wide entries every ``rate`` tokens."""
    return [TensorInfo(a + "wkv.weight", (width, H), "attention", i, linear=True),
            TensorInfo(a + "wgate.weight", (width, H), "attention", i, linear=True),
            TensorInfo(a + "ape", (rate, width), "attention", i),
            TensorInfo(a + "norm.weight", (dim,), "attention", i)]


def attention(spec: ModelSpec, i: int) -> list[TensorInfo]:
    v, H, nh, hd = spec.v4, spec.hidden_size, spec.num_heads, spec.head_dim
    a = prefix(i) + "attn."

    def lin(name, *shape):
        return TensorInfo(a + name, shape, "attention", i, linear=True)

    out = [lin("wq_a.weight", v.q_lora_rank, H), TensorInfo(a + "q_norm.weight", (v.q_lora_rank,), "attention", i),
           lin("wq_b.weight", nh * hd, v.q_lora_rank), lin("wkv.weight", hd, H),
           TensorInfo(a + "norm.weight", (hd,), "attention", i),
           lin("wo_a.weight", v.o_groups * v.o_lora_rank, nh * hd // v.o_groups),
           lin("wo_b.weight", H, v.o_groups * v.o_lora_rank), TensorInfo(a + "attn_sink", (nh,), "attention", i)]
    kind, rate = v.kinds[i], v.rate(i)
    if kind == "hca":
        out += _compressor(a + "compressor.", H, hd, rate, hd, i)
    elif kind == "csa":
        out += _compressor(a + "compressor.", H, 2 * hd, rate, hd, i)
        out += _compressor(a + "indexer.compressor.", H, 2 * v.index_dim, rate, v.index_dim, i)
        out += [lin("indexer.wq_b.weight", v.index_heads * v.index_dim, v.q_lora_rank),
                lin("indexer.weights_proj.weight", v.index_heads, H)]
    return out


def layer_tensors(spec: ModelSpec, i: int) -> list[TensorInfo]:
    v, m, H = spec.v4, spec.moe, spec.hidden_size
    p = prefix(i)
    n, mix = v.hc_mult, (2 + v.hc_mult) * v.hc_mult
    out = attention(spec, i)
    out += [TensorInfo(p + "attn_norm.weight", (H,), "norm", i), TensorInfo(p + "ffn_norm.weight", (H,), "norm", i)]
    for hc in ("hc_attn", "hc_ffn"):  # the hyper-connections' mixing weights (small, kept in float32)
        out += [TensorInfo(p + hc + "_fn", (mix, n * H), "norm", i), TensorInfo(p + hc + "_base", (mix,), "norm", i),
                TensorInfo(p + hc + "_scale", (3,), "norm", i)]
    f = p + "ffn."
    out.append(TensorInfo(f + "gate.weight", (m.num_experts, H), "router", i))
    if i in v.hash_layers:
        out.append(TensorInfo(f + "gate.tid2eid", (spec.vocab_size, m.top_k), "router", i))
    else:
        out.append(TensorInfo(f + "gate.bias", (m.num_experts,), "router", i))
    for j in range(m.num_experts):
        e = f"{f}experts.{j}."
        out += [TensorInfo(e + "w1.weight", (m.intermediate, H), "experts", i, j, True),
                TensorInfo(e + "w3.weight", (m.intermediate, H), "experts", i, j, True),
                TensorInfo(e + "w2.weight", (H, m.intermediate), "experts", i, j, True)]
    if m.shared_intermediate:
        s = f + "shared_experts."
        out += [TensorInfo(s + "w1.weight", (m.shared_intermediate, H), "shared", i, linear=True),
                TensorInfo(s + "w3.weight", (m.shared_intermediate, H), "shared", i, linear=True),
                TensorInfo(s + "w2.weight", (H, m.shared_intermediate), "shared", i, linear=True)]
    return out


def model_tensors(spec: ModelSpec) -> list[TensorInfo]:
    H, V, n = spec.hidden_size, spec.vocab_size, spec.v4.hc_mult
    out = [TensorInfo(GLOBALS["embed"], (V, H), "embed")]
    for i in range(spec.num_layers):
        out += layer_tensors(spec, i)
    out += [TensorInfo(GLOBALS["hc_fn"], (n, n * H), "norm"), TensorInfo(GLOBALS["hc_base"], (n,), "norm"),
            TensorInfo(GLOBALS["hc_scale"], (1,), "norm"), TensorInfo(GLOBALS["norm"], (H,), "norm"),
            TensorInfo(GLOBALS["head"], (V, H), "lm_head", linear=True)]
    return out
