"""GGUF architectures onto kt-core's: the reverse of llama.cpp's converter.

``hf_config(arch, meta, shapes)`` writes the config.json a Hugging Face checkpoint of the same
model would have (then ``parse_config`` builds the ModelSpec, as for a folder), and
``tensor_names(arch, config)`` maps every GGUF tensor name onto the checkpoint names the model
loader reads: per-expert names onto a slice of the merged ``ffn_*_exps`` tensor, and llama's
q/k rows back from the order the converter permuted them into for its rope.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from kt_core.errors import KtError

# GGUF general.architecture -> the HF architecture (the MoE one when the file has experts)
ARCHS = {"llama": ("LlamaForCausalLM", "MixtralForCausalLM"), "qwen2": ("Qwen2ForCausalLM", None),
         "qwen2moe": (None, "Qwen2MoeForCausalLM"), "qwen3": ("Qwen3ForCausalLM", None),
         "qwen3moe": (None, "Qwen3MoeForCausalLM")}

# per-layer GGUF name -> HF name under model.layers.{i}. ("{mlp}" is the family's MoE block)
LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "ffn_gate_inp": "{mlp}.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
         "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
         "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@dataclass(frozen=True)
class Source:
    """Where one checkpoint tensor comes from: a GGUF tensor, one expert of a merged one, or a
    row permutation of one (llama q/k), and the HF shape to give it."""

    gguf: str
    expert: Optional[int] = None
    unpermute_heads: int = 0  # llama: rows were permuted for this many heads
    reshape: Optional[tuple] = None


def _get(meta: Callable[[str, Any], Any], arch: str, key: str, default: Any = None, need: bool = False) -> Any:
    v = meta(f"{arch}.{key}", None)
    if v is None:
        if need:
            raise KtError(f"the GGUF metadata lacks {arch}.{key}, which a {arch} model needs; the file is "
                          "incomplete: convert it again")
        return default
    return v


def hf_config(arch: str, meta: Callable[[str, Any], Any], shapes: dict[str, tuple]) -> dict:
    """The config.json of the model this GGUF holds (``shapes``: GGUF tensor name -> torch shape)."""
    if arch not in ARCHS:
        raise KtError(f"GGUF architecture {arch!r} is not supported; kt-core reads GGUF files of "
                      f"{', '.join(sorted(ARCHS))}")
    if "rope_freqs.weight" in shapes:
        raise KtError(f"this {arch} GGUF carries rope frequency factors (rope_freqs, Llama-3.1-style rope "
                      "scaling), which kt-core does not read from GGUF yet; use the Hugging Face folder")
    n_exp = int(_get(meta, arch, "expert_count", 0) or 0)
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
    kind = _get(meta, arch, "rope.scaling.type")
    if kind not in (None, "none"):
        factor = float(_get(meta, arch, "rope.scaling.factor", 1.0))
        scaling = {"rope_type": kind, "factor": factor}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = int(_get(meta, arch, "rope.scaling.original_context_length",
                                                                   c["max_position_embeddings"]))
        elif kind != "linear":
            raise KtError(f"GGUF rope scaling {kind!r} is not supported; kt-core reads linear and yarn")
        c["rope_scaling"] = scaling
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


def tensor_names(config: dict, arch: str, gguf_names: list[str], shapes: dict[str, tuple]) -> dict[str, Source]:
    """HF checkpoint name -> Source for every tensor of the file (unknown GGUF names are refused)."""
    mixtral = config["architectures"][0] == "MixtralForCausalLM"
    mlp = "block_sparse_moe" if mixtral else "mlp"
    expert_names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
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
        if base in EXPERTS and rest == "weight":
            hf = expert_names[EXPERTS.index(base)]
            for j in range(shapes[name][0]):
                out[f"{p}{mlp}.experts.{j}.{hf}.weight"] = Source(name, expert=j)
            continue
        if len(parts) == 5 and base in ("ffn_gate", "ffn_up", "ffn_down") and mixtral and parts[3].isdigit():
            hf = expert_names[("ffn_gate", "ffn_up", "ffn_down").index(base)]  # old Mixtral: one tensor per expert
            out[f"{p}{mlp}.experts.{int(parts[3])}.{hf}.weight"] = Source(name)
            continue
        if base not in LAYER or rest not in ("weight", "bias"):
            raise KtError(f"GGUF tensor {name!r} is not one kt-core knows for a {arch} model")
        hf = LAYER[base].replace("{mlp}", mlp)
        if base == "ffn_gate_inp_shexp":  # the converter squeezed [1, H] to [H]
            out[f"{p}{hf}.{rest}"] = Source(name, reshape=(1, shapes[name][-1]))
            continue
        unpermute = 0
        if arch == "llama" and base in ("attn_q", "attn_k"):
            unpermute = heads if base == "attn_q" else kv
        out[f"{p}{hf}.{rest}"] = Source(name, unpermute_heads=unpermute)
    return out
