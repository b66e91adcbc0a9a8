"""The config.json parsers of the families whose fields need more than a line of ``_parse_config``:
DeepSeek (V2 / V3 / V3.2, GLM-5's sparse attention), GLM-4.5 / MiniMax-M2's sigmoid routing,
Llama 4, Qwen3-Next / Qwen3.5-MoE."""
from __future__ import annotations

from kt_core.errors import KtError
from kt_core.models.spec import IndexerSpec, LinearAttnSpec, MLASpec, ModelSpec, MoESpec, yarn_mscale


def _deepseek(spec: ModelSpec, c: dict, rope_params: dict) -> None:
    mla = MLASpec(c.get("q_lora_rank"), int(c["kv_lora_rank"]), int(c["qk_nope_head_dim"]),
                  int(c["qk_rope_head_dim"]), int(c["v_head_dim"]))
    spec.mla = mla
    spec.head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    spec.num_kv_heads = spec.num_heads
    spec.rope.rot_dim = mla.qk_rope_head_dim
    # MLA ropes interleaved pairs (V2 always; V3 unless rope_interleave is false)
    spec.rope.interleaved = bool(c.get("rope_interleave", True)) or spec.family == "deepseek_v2"
    spec.softmax_scale = spec.head_dim ** -0.5
    if spec.rope.kind == "yarn" and rope_params.get("mscale_all_dim"):
        m = yarn_mscale(float(rope_params["factor"]), float(rope_params["mscale_all_dim"]))
        spec.softmax_scale *= m * m
    v3 = spec.family in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")
    if spec.family in ("deepseek_v32", "glm_moe_dsa"):
        if not mla.q_lora_rank:
            raise KtError("config.json: DeepSeek-V3.2's indexer reads the query's low-rank projection: set q_lora_rank")
        spec.index = IndexerSpec(int(c.get("index_n_heads") or 64), int(c.get("index_head_dim") or 128),
                                 int(c.get("index_topk") or 2048))
        if spec.index.head_dim < mla.qk_rope_head_dim:
            raise KtError(f"config.json: index_head_dim={spec.index.head_dim} must hold the "
                          f"qk_rope_head_dim={mla.qk_rope_head_dim} rotary features; fix config.json")
        if spec.family == "glm_moe_dsa":
            spec.rope.interleaved = spec.index.interleaved = True
            spec.index.shared = _glm5_shared_indexers(c, spec.num_layers)
    n_group = int(c.get("n_group") or 1)
    if not v3 and c.get("topk_method", "greedy") == "greedy":
        n_group = 1
    spec.moe = MoESpec(
        int(c.get("n_routed_experts") or c.get("num_local_experts") or 0), int(c["num_experts_per_tok"]),
        int(c["moe_intermediate_size"]), scoring="sigmoid" if v3 else "softmax",
        renormalize=bool(c.get("norm_topk_prob", False)) if v3 else False, n_group=n_group,
        topk_group=int(c.get("topk_group") or 1), routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        score_bias=v3, shared_intermediate=int(c["moe_intermediate_size"]) * int(c.get("n_shared_experts") or 0))
    first_dense = int(c.get("first_k_dense_replace", 0))
    spec.moe_layers = frozenset(i for i in range(spec.num_layers) if i >= first_dense)
    kinds = c.get("mlp_layer_types")  # DeepSeek-V3.2 spells the same out per layer
    if kinds is not None:
        if not isinstance(kinds, list) or len(kinds) != spec.num_layers or set(kinds) - {"dense", "sparse"}:
            raise KtError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                          f"{spec.num_layers} layers; fix config.json")
        spec.moe_layers = frozenset(i for i, k in enumerate(kinds) if k == "sparse")


def _sigmoid_moe(c: dict, experts: int, inter: int, renormalize: bool, grouped: bool = True,
                 scaled: bool = True) -> MoESpec:
    """DeepSeek-V3-style routing (GLM-4.5, MiniMax-M2): sigmoid scores, a choice-only correction bias,
    optional expert groups and a routed scaling factor."""
    return MoESpec(experts, int(c["num_experts_per_tok"]), inter, scoring="sigmoid", renormalize=renormalize,
                   n_group=int(c.get("n_group") or 1) if grouped else 1,
                   topk_group=int(c.get("topk_group") or 1) if grouped else 1,
                   routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)) if scaled else 1.0,
                   score_bias=True)


def _llama4(spec: ModelSpec, c: dict) -> None:
    """Llama 4's text model: chunked local attention with rope between global NoPE layers (whose
    queries get a position-dependent temperature), top-k sigmoid routing that scales the expert's
    input, a shared expert, dense layers of intermediate_size_mlp between MoE layers."""
    L = spec.num_layers
    spec.qkv_bias = spec.o_bias = bool(c.get("attention_bias", False))
    spec.rope.interleaved = True  # complex rotation of adjacent pairs
    interval = int(c.get("no_rope_layer_interval") or 4)
    use_rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]  # 1: this layer ropes
    if len(use_rope) != L:
        raise KtError(f"config.json: no_rope_layers has {len(use_rope)} entries for {L} layers; fix config.json")
    spec.nope_layers = frozenset(i for i in range(L) if not use_rope[i])
    spec.qk_l2_norm = bool(c.get("use_qk_norm", True))
    if c.get("attn_temperature_tuning", True):
        spec.attn_temperature = (float(c.get("floor_scale", 8192)), float(c.get("attn_scale", 0.1)))
    chunk = c.get("attention_chunk_size", 8192)
    spec.attention_chunk = int(chunk) if chunk else None
    types = c.get("layer_types") or ["chunked_attention" if use_rope[i] and chunk else "full_attention"
                                     for i in range(L)]
    spec.layer_types = ["chunked" if t == "chunked_attention" else "full" for t in types]
    expert = spec.intermediate_size
    spec.intermediate_size = int(c.get("intermediate_size_mlp") or expert)
    spec.moe = MoESpec(int(c["num_local_experts"]), int(c["num_experts_per_tok"]), expert, scoring="sigmoid",
                       renormalize=False, weight_input=True, shared_intermediate=expert)
    step = int(c.get("interleave_moe_layer_step") or 1)
    layers = c.get("moe_layers")
    spec.moe_layers = frozenset(layers if layers is not None else range(step - 1, L, step)) & frozenset(range(L))


def _qwen3_next(spec: ModelSpec, c: dict) -> None:
    """Qwen3-Next: Gated DeltaNet layers between gated full-attention layers (every
    full_attention_interval-th), zero-centred RMSNorm weights, QK-norm, partial rotary."""
    L = spec.num_layers
    interval = int(c.get("full_attention_interval") or 4)
    types = c.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                     for i in range(L)]
    unknown = sorted({t for t in types} - {"full_attention", "linear_attention"})
    if unknown:
        raise KtError(f"config.json: layer_types has {unknown[0]!r}; Qwen3-Next layers are full_attention or "
                      "linear_attention")
    spec.layer_types = ["linear" if t == "linear_attention" else "full" for t in types]
    spec.linear = LinearAttnSpec(int(c.get("linear_num_key_heads") or 16), int(c.get("linear_num_value_heads") or 32),
                                 int(c.get("linear_key_head_dim") or 128), int(c.get("linear_value_head_dim") or 128),
                                 int(c.get("linear_conv_kernel_dim") or 4))
    if spec.linear.num_v_heads % spec.linear.num_k_heads:
        raise KtError(f"config.json: linear_num_value_heads={spec.linear.num_v_heads} must be a multiple of "
                      f"linear_num_key_heads={spec.linear.num_k_heads}; fix config.json")
    spec.qk_norm = spec.attn_output_gate = spec.norm_offset = True
    spec.qkv_bias = spec.o_bias = bool(c.get("attention_bias", False))
    if spec.family == "qwen3_5_moe":  # Qwen3.5: q|k|v, z, b, a projected separately; routing always renormalised
        spec.linear.split_proj = True
        spec.moe.renormalize = True


def _glm5_shared_indexers(c: dict, L: int) -> frozenset[int]:
    """GLM-5's layers whose attention reuses the previous indexer layer's top-k ("shared"), from
    indexer_types, else index_topk_pattern ("F"ull / "S"hared per layer), else every
    index_topk_freq-th layer from index_skip_topk_offset runs its own indexer (the reference's rule)."""
    kinds = c.get("indexer_types")
    if kinds is None and c.get("index_topk_pattern") is not None:
        pattern = c["index_topk_pattern"]
        kinds = [{"F": "full", "S": "shared"}.get(ch) for ch in pattern] if isinstance(pattern, str) else pattern
    if kinds is None:
        freq, offset = max(int(c.get("index_topk_freq") or 1), 1), int(c.get("index_skip_topk_offset", 2))
        kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(L)]
    if not isinstance(kinds, list) or len(kinds) != L or set(kinds) - {"full", "shared"} or kinds[0] != "full":
        raise KtError(f"config.json: indexer_types must list 'full' or 'shared' for each of the {L} layers, the "
                      "first 'full'; fix config.json")
    return frozenset(i for i, k in enumerate(kinds) if k == "shared")
