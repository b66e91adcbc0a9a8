"""GGUF architectures onto kt-core's: the reverse of llama.cpp's converter.

``hf_config(arch, meta, shapes)`` writes the config.json a Hugging Face checkpoint of the same
model would have (then ``parse_config`` builds the ModelSpec, as for a folder), and
``tensor_names(arch, config)`` maps every GGUF tensor name onto the checkpoint names the model
loader reads: per-expert names onto a slice of the merged ``ffn_*_exps`` tensor, llama's q/k rows
back from the order the converter permuted them into for its rope, DeepSeek's MLA ``kv_b_proj``
back from the ``attn_k_b`` / ``attn_v_b`` halves newer converters split it into, and gpt-oss's
interleaved ``gate_up_proj`` back from its separate gate and up expert tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from kt_core.errors import KtError

# GGUF general.architecture -> the HF architecture (the MoE one when the file has experts)
ARCHS = {"llama": ("LlamaForCausalLM", "MixtralForCausalLM"), "qwen2": ("Qwen2ForCausalLM", None),
         "qwen2moe": (None, "Qwen2MoeForCausalLM"), "qwen3": ("Qwen3ForCausalLM", None),
         "qwen3moe": (None, "Qwen3MoeForCausalLM"), "deepseek2": (None, "DeepseekV2ForCausalLM"),
         "gpt-oss": (None, "GptOssForCausalLM")}

# per-layer GGUF name -> HF name under model.layers.{i}. ("{mlp}" is the family's MoE block)
LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "ffn_gate_inp": "{mlp}.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
         "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
         "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
# rope_freqs: Llama-3.1-style rope scaling baked into per-frequency divisors (GGUFCheckpoint reads it
# into the config's rope_freq_factors)
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "rope_freqs.weight": "rope_freqs",
       "output.weight": "lm_head.weight"}
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# DeepSeek-V2/V3 (MLA attention, DeepSeek's shared experts) and gpt-oss on top of LAYER
ARCH_LAYER = {
    "deepseek2": {"attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
                  "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
                  "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
                  "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                  "ffn_down_shexp": "mlp.shared_experts.down_proj"},
    "gpt-oss": {"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router"},
}
# whole GGUF names (base.suffix) whose HF name has no .weight / .bias
WHOLE = {"exp_probs_b.bias": "mlp.gate.e_score_correction_bias", "attn_sinks.weight": "self_attn.sinks"}
YARN = (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"), ("yarn_attn_factor", "attention_factor"))


@dataclass(frozen=True)
class Source:
    """Where one checkpoint tensor comes from: a GGUF tensor, one expert of a merged one, a row
    permutation of one (llama q/k), or two GGUF tensors joined (``join``: "kv_b", DeepSeek's
    attn_k_b [heads, kv_lora, nope] + attn_v_b [heads, v, kv_lora] -> kv_b_proj [heads*(nope+v),
    kv_lora]; "gate_up", gpt-oss's gate + up experts [E, I, H] (biases [E, I]) -> gate_up_proj
    [E, H, 2I] with gate and up interleaved), and the HF shape to give it."""

    gguf: str
    expert: Optional[int] = None
    unpermute_heads: int = 0  # llama: rows were permuted for this many heads
    reshape: Optional[tuple] = None
    join: str = ""  # "" | "kv_b" | "gate_up": ``other`` is the second tensor
    other: Optional[str] = None
    transpose: bool = False  # the last two dims swapped (gpt-oss down_proj [E, I, H] from [E, H, I])

    @property
    def plain(self) -> bool:
        """One GGUF tensor's rows as stored (its blocks can be handed over as they are)."""
        return not self.join and not self.transpose


def _get(meta: Callable[[str, Any], Any], arch: str, key: str, default: Any = None, need: bool = False) -> Any:
    v = meta(f"{arch}.{key}", None)
    if v is None:
        if need:
            raise KtError(f"the GGUF metadata lacks {arch}.{key}, which a {arch} model needs; the file is "
                          "incomplete: convert it again")
        return default
    return v


MAX_LAYERS = 4096  # more than any model has (DeepSeek-V3: 61 and its MTP layer)


def _dims(shapes: dict[str, tuple], name: str, least: int) -> tuple:
    """A tensor's shape, which the loader indexes: at least ``least`` dims, none of them zero."""
    shape = tuple(shapes[name])
    if len(shape) < least or any(int(d) <= 0 for d in shape):
        raise KtError(f"the GGUF's tensor {name} has shape {list(shape)}, where at least {least} non-zero dims "
                      "belong; the file is damaged: convert it again")
    return shape


def _count(meta: Callable[[str, Any], Any], arch: str, key: str, most: int, default: Any = None,
           need: bool = False) -> int:
    """An integer the loader loops over, read from the file and so checked before any loop: 0..most."""
    v = _get(meta, arch, key, default, need)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= most:
        raise KtError(f"the GGUF metadata's {arch}.{key} is {v!r}, where an integer in 0..{most} belongs; the file "
                      "is damaged: convert it again")
    return v


def hf_config(arch: str, meta: Callable[[str, Any], Any], shapes: dict[str, tuple]) -> dict:
    """The config.json of the model this GGUF holds (``shapes``: GGUF tensor name -> torch shape)."""
    if arch not in ARCHS:
        raise KtError(f"GGUF architecture {arch!r} is not supported; kt-core reads GGUF files of "
                      f"{', '.join(sorted(ARCHS))}")
    # what later loops run over is checked first: a layer count past 4096 or an expert count past 2^16 is
    # a damaged or hostile header (one of 10^12 layers ran for minutes)
    _count(meta, arch, "block_count", MAX_LAYERS, need=True)
    n_exp = _count(meta, arch, "expert_count", 1 << 16, 0)
    if "token_embd.weight" in shapes:
        _dims(shapes, "token_embd.weight", 2)
    dense_arch, moe_arch = ARCHS[arch]
    hf_arch = moe_arch if n_exp else dense_arch
    if hf_arch is None:
        raise KtError(f"a {arch} GGUF {'without' if n_exp == 0 else 'with'} experts is not a model kt-core knows")
    H = int(_get(meta, arch, "embedding_length", need=True))
    heads = int(_get(meta, arch, "attention.head_count", need=True))
    if "token_embd.weight" not in shapes:
        raise KtError("the GGUF has no token_embd.weight (the embedding); the file is incomplete")
    c: dict[str, Any] = {
        "architectures": [hf_arch], "hidden_size": H, "num_hidden_layers": int(_get(meta, arch, "block_count", need=True)),
        "num_attention_heads": heads, "num_key_value_heads": int(_get(meta, arch, "attention.head_count_kv", heads)),
        "head_dim": int(_get(meta, arch, "attention.key_length", H // heads)),
        "rms_norm_eps": float(_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_get(meta, arch, "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_get(meta, arch, "context_length", 4096)),
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "intermediate_size": int(_get(meta, arch, "feed_forward_length", 0) or 0),
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id", None),
    }
    _rope_scaling(c, arch, meta)
    if arch == "deepseek2":
        return _deepseek2(c, meta, shapes, n_exp)
    if arch == "gpt-oss":
        return _gpt_oss(c, meta, n_exp)
    if "blk.0.attn_q.bias" in shapes and arch == "llama":
        c["attention_bias"] = True
    if n_exp:
        used = int(_get(meta, arch, "expert_used_count", need=True))
        width = int(_get(meta, arch, "expert_feed_forward_length", 0) or c["intermediate_size"])
        if hf_arch == "MixtralForCausalLM":
            c.update(num_local_experts=n_exp, num_experts_per_tok=used, intermediate_size=width)
        else:
            c.update(num_experts=n_exp, num_experts_per_tok=used, moe_intermediate_size=width,
                     norm_topk_prob=arch == "qwen3moe")  # llama.cpp renormalizes qwen3moe's top-k, not qwen2moe's
            # layers without merged experts are dense (Qwen2-MoE's mlp_only_layers)
            c["mlp_only_layers"] = [i for i in range(c["num_hidden_layers"])
                                    if f"blk.{i}.ffn_gate_exps.weight" not in shapes]
            shared = int(_get(meta, arch, "expert_shared_feed_forward_length", 0) or 0)
            if shared:
                c["shared_expert_intermediate_size"] = shared
    return c


def _rope_scaling(c: dict, arch: str, meta: Callable[[str, Any], Any]) -> None:
    """rope.scaling.* -> rope_scaling (linear, yarn)."""
    kind = _get(meta, arch, "rope.scaling.type")
    if kind in (None, "none"):
        return
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(_get(meta, arch, "rope.scaling.factor", 1.0))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = int(_get(meta, arch, "rope.scaling.original_context_length",
                                                               c["max_position_embeddings"]))
        for key, hf in YARN:
            if _get(meta, arch, f"rope.scaling.{key}") is not None:
                scaling[hf] = float(_get(meta, arch, f"rope.scaling.{key}"))
        ext = _get(meta, arch, "rope.scaling.yarn_ext_factor")
        if ext is not None and float(ext) != 1.0:
            raise KtError(f"this {arch} GGUF sets rope.scaling.yarn_ext_factor={float(ext):g}; kt-core's yarn "
                          "extrapolates with factor 1 only")
        log_mul = _get(meta, arch, "rope.scaling.yarn_log_multiplier")
        if log_mul and arch == "deepseek2":
            # llama.cpp's deepseek2 writes 0.1 * mscale_all_dim and scales q.k by its mscale squared;
            # its rope keeps magnitude 1, which in HF terms is mscale == mscale_all_dim
            scaling["mscale"] = scaling["mscale_all_dim"] = round(float(log_mul) / 0.1, 6)
        elif log_mul:
            raise KtError(f"rope.scaling.yarn_log_multiplier in a {arch} GGUF is not supported; kt-core reads it "
                          "for deepseek2 only")
        if arch == "gpt-oss":
            scaling["truncate"] = False  # gpt-oss's yarn does not round its correction range
    elif kind != "linear":
        raise KtError(f"GGUF rope scaling {kind!r} is not supported; kt-core reads linear and yarn")
    c["rope_scaling"] = scaling


def _deepseek2(c: dict, meta: Callable[[str, Any], Any], shapes: dict[str, tuple], n_exp: int) -> dict:
    """DeepSeek-V2 / V2-Lite / V3 / R1 / Kimi-K2: MLA attention, routed + shared experts, leading
    dense layers. V3's sigmoid router with a score-correction bias (exp_probs_b) tells it from V2."""
    g = lambda key, default=None, need=False: _get(meta, "deepseek2", key, default, need)  # noqa: E731
    gating = int(g("expert_gating_func", 0) or 0)  # 1 softmax, 2 sigmoid, 0 unset (llama.cpp: softmax)
    has_bias = any(n.endswith(".exp_probs_b.bias") for n in shapes)
    if gating not in (0, 1, 2):
        raise KtError(f"deepseek2 GGUF expert_gating_func={gating} is not supported; kt-core routes with "
                      "softmax (1, DeepSeek-V2) or sigmoid (2, DeepSeek-V3)")
    if gating == 1 and has_bias:
        raise KtError("this deepseek2 GGUF routes with softmax (expert_gating_func=1) but carries a score "
                      "correction bias (exp_probs_b); kt-core knows that bias with sigmoid routing (V3) only")
    v3 = gating == 2 or (gating == 0 and has_bias)
    if v3 and not has_bias:
        raise KtError("this deepseek2 GGUF routes with sigmoid (DeepSeek-V3) but has no exp_probs_b tensors "
                      "(e_score_correction_bias); the file is incomplete: convert it again")
    kv_lora = int(g("attention.kv_lora_rank", need=True))
    rope = int(g("rope.dimension_count", need=True))
    # newer converters write MLA's "compressed" head sizes in key/value_length and the real ones in *_mla
    key = int(g("attention.key_length_mla", 0) or g("attention.key_length", need=True))
    value = int(g("attention.value_length_mla", 0) or g("attention.value_length", need=True))
    if key <= rope:
        raise KtError(f"deepseek2 GGUF key length {key} is not more than the rope dimension {rope}; the file is "
                      "inconsistent: convert it again")
    groups = int(g("expert_group_count", 1) or 1)
    c.update(architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
             num_key_value_heads=c["num_attention_heads"],  # the file says 1: MLA stored as MQA
             head_dim=rope, q_lora_rank=int(g("attention.q_lora_rank", 0) or 0) or None, kv_lora_rank=kv_lora,
             qk_rope_head_dim=rope, qk_nope_head_dim=key - rope, v_head_dim=value, rope_interleave=True,
             n_routed_experts=n_exp, num_experts_per_tok=int(g("expert_used_count", need=True)),
             moe_intermediate_size=int(g("expert_feed_forward_length", need=True)),
             n_shared_experts=int(g("expert_shared_count", 0) or 0),
             first_k_dense_replace=int(g("leading_dense_block_count", 0) or 0),
             routed_scaling_factor=float(g("expert_weights_scale", 1.0) or 1.0),
             norm_topk_prob=bool(g("expert_weights_norm", False)),
             n_group=groups, topk_group=int(g("expert_group_used_count", 1) or 1),
             scoring_func="sigmoid" if v3 else "softmax")
    if not v3:  # llama.cpp limits V2's routing to groups exactly when it has more than one
        c["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"
    return c


def _gpt_oss(c: dict, meta: Callable[[str, Any], Any], n_exp: int) -> dict:
    """gpt-oss: sinks, biases, swiglu experts; llama.cpp alternates sliding and full attention
    starting with sliding (its swa pattern 2) unless the file says otherwise."""
    g = lambda key, default=None, need=False: _get(meta, "gpt-oss", key, default, need)  # noqa: E731
    L = c["num_hidden_layers"]
    pattern = g("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == L:
        sliding = [bool(x) for x in pattern]
    elif pattern is None or isinstance(pattern, int) and pattern > 0:
        n = int(pattern or 2)
        sliding = [i % n < n - 1 for i in range(L)]
    else:
        raise KtError(f"gpt-oss GGUF attention.sliding_window_pattern={pattern!r} is not one kt-core reads (a "
                      "period, or one flag per layer)")
    clamp = g("swiglu_clamp_exp")
    if clamp is not None and set(clamp if isinstance(clamp, list) else [clamp]) - {0.0, 7.0}:
        raise KtError(f"gpt-oss GGUF swiglu_clamp_exp={clamp!r} is not supported; kt-core's gpt-oss clamps its "
                      "swiglu at 7.0 (llama.cpp's and the model's)")
    c.update(num_local_experts=n_exp, num_experts_per_tok=int(g("expert_used_count", need=True)),
             intermediate_size=int(g("expert_feed_forward_length", 0) or c["intermediate_size"]),
             sliding_window=int(g("attention.sliding_window", need=True)), attention_bias=True,
             layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
    return c


def tensor_names(config: dict, arch: str, gguf_names: list[str], shapes: dict[str, tuple]) -> dict[str, Source]:
    """HF checkpoint name -> Source for every tensor of the file (unknown GGUF names are refused)."""
    mixtral = config["architectures"][0] == "MixtralForCausalLM"
    mlp = "block_sparse_moe" if mixtral else "mlp"
    expert_names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    layer = {**LAYER, **ARCH_LAYER.get(arch, {})}
    names = set(gguf_names)
    out: dict[str, Source] = {}
    for name in gguf_names:
        if name in TOP:
            out[TOP[name]] = Source(name)
            continue
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "blk" or not parts[1].isdigit():
            raise KtError(f"GGUF tensor {name!r} is not one kt-core knows for a {arch} model")
        p = f"model.layers.{int(parts[1])}."
        base, rest = parts[2], ".".join(parts[3:])
        if base in EXPERTS and rest in ("weight", "bias") and _dims(shapes, name, 2)[0] > (1 << 16):
            raise KtError(f"the GGUF's tensor {name} holds {shapes[name][0]} experts, more than 65536; the file is "
                          "damaged: convert it again")
        if arch == "gpt-oss" and base in EXPERTS and rest in ("weight", "bias"):
            _gpt_oss_experts(out, p, name, base, rest, names, shapes[name][0])
            continue
        if base in EXPERTS and rest == "weight":
            hf = expert_names[EXPERTS.index(base)]
            for j in range(shapes[name][0]):
                out[f"{p}{mlp}.experts.{j}.{hf}.weight"] = Source(name, expert=j)
            continue
        if len(parts) == 5 and base in ("ffn_gate", "ffn_up", "ffn_down") and mixtral and parts[3].isdigit():
            hf = expert_names[("ffn_gate", "ffn_up", "ffn_down").index(base)]  # old Mixtral: one tensor per expert
            out[f"{p}{mlp}.experts.{int(parts[3])}.{hf}.weight"] = Source(name)
            continue
        if arch == "deepseek2" and base in ("attn_k_b", "attn_v_b") and rest == "weight":
            k_b, v_b = f"blk.{parts[1]}.attn_k_b.weight", f"blk.{parts[1]}.attn_v_b.weight"
            if k_b not in names or v_b not in names:
                raise KtError(f"GGUF tensor {name!r} comes without its other half ({v_b if base == 'attn_k_b' else k_b}"
                              "); the file is incomplete: convert it again")
            out[f"{p}self_attn.kv_b_proj.weight"] = Source(k_b, join="kv_b", other=v_b)
            continue
        if f"{base}.{rest}" in WHOLE and (arch, base) in (("deepseek2", "exp_probs_b"), ("gpt-oss", "attn_sinks")):
            out[p + WHOLE[f"{base}.{rest}"]] = Source(name)
            continue
        if base not in layer or rest not in ("weight", "bias"):
            raise KtError(f"GGUF tensor {name!r} is not one kt-core knows for a {arch} model")
        hf = layer[base].replace("{mlp}", mlp)
        if base == "ffn_gate_inp_shexp":  # the converter squeezed [1, H] to [H]
            out[f"{p}{hf}.{rest}"] = Source(name, reshape=(1, _dims(shapes, name, 1)[-1]))
            continue
        unpermute = 0
        if arch == "llama" and base in ("attn_q", "attn_k"):
            unpermute = heads if base == "attn_q" else kv
        out[f"{p}{hf}.{rest}"] = Source(name, unpermute_heads=unpermute)
    return out


def _gpt_oss_experts(out: dict[str, Source], p: str, name: str, base: str, rest: str, names: set[str],
                     n_experts: int) -> None:
    """gpt-oss's experts as its HF checkpoint holds them: gate_up_proj [E, H, 2I] (gate and up
    interleaved, biases [E, 2I] likewise) from the separate gate and up tensors, down_proj [E, I, H];
    and each expert's weights by the per-expert names of the other families (gate_proj, up_proj
    [I, H], down_proj [H, I]), plain slices the loader can keep in their quantization."""
    e = p + "mlp.experts."
    suffix = "_bias" if rest == "bias" else ""
    if rest == "weight":
        proj = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}[base]
        for j in range(n_experts):
            out[f"{e}{j}.{proj}.weight"] = Source(name, expert=j)
    if base == "ffn_down_exps":
        out[f"{e}down_proj{suffix}"] = Source(name, transpose=rest == "weight")
        return
    gate, up = (name.replace(base, b) for b in ("ffn_gate_exps", "ffn_up_exps"))
    if gate not in names or up not in names:
        raise KtError(f"GGUF tensor {name!r} comes without its other half ({up if base == 'ffn_gate_exps' else gate}); "
                      "the file is incomplete: convert it again")
    out[f"{e}gate_up_proj{suffix}"] = Source(gate, join="gate_up", other=up)
