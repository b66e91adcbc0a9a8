"""``ModelSpec``: everything the runtime needs from a Hugging Face ``config.json``.

One parser serves every supported architecture; the differences between
families are data (which router, which activation, shared experts, MLA, sinks,
sliding windows), not classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from kt_core.errors import KtError
from kt_core.models.spec_checks import _check_config, _check_spec, _show
from kt_core.models.spec_rope import RopeSpec, _rope_params, _rot_dim, yarn_mscale  # noqa: F401 (re-exported)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "GptOssForCausalLM": "gpt_oss",
    "Glm4MoeForCausalLM": "glm4_moe",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "Llama4ForCausalLM": "llama4",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "DeepseekV4ForCausalLM": "deepseek_v4",
}


# config.json model_type values that name a family differently (used when architectures is absent)
MODEL_TYPES = {"llama4_text": "llama4", "kimi_k2": "deepseek_v3", "qwen3_5_moe_text": "qwen3_5_moe"}
# multimodal checkpoints whose text backbone kt-core runs: architecture -> (the backbone's architecture,
# {prefix in the checkpoint: prefix the loader reads}). Other tensors (vision tower, projector) are not loaded.
_LM = {"language_model.": ""}
TEXT_BACKBONES = {
    "KimiK25ForConditionalGeneration": ("DeepseekV3ForCausalLM", _LM),  # Kimi-K2.5's release
    "Kimi_K25ForConditionalGeneration": ("DeepseekV3ForCausalLM", _LM),  # transformers' name
    "Llama4ForConditionalGeneration": ("Llama4ForCausalLM", _LM),  # Llama 4 Scout / Maverick
    "Qwen3_5MoeForConditionalGeneration": ("Qwen3_5MoeForCausalLM",
                                           {"model.language_model.": "model.", "lm_head.": "lm_head."}),
}


def text_backbone(c: dict) -> tuple[dict, dict[str, str]]:
    """(the config.json to build the spec from, how its tensors' names map): a multimodal checkpoint's
    text_config and its language model's prefixes, else ``c`` itself and {}."""
    archs = c.get("architectures") if isinstance(c, dict) else None
    arch = next((a for a in archs if isinstance(a, str) and a in TEXT_BACKBONES), None) \
        if isinstance(archs, list) else None
    if arch is None:
        return c, {}
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise KtError(f"config.json: {arch} needs a text_config object (its language model's config); fix "
                      "config.json or download it again")
    backbone, prefixes = TEXT_BACKBONES[arch]
    return {**text, "architectures": [backbone]}, prefixes


@dataclass
class MoESpec:
    num_experts: int
    top_k: int
    intermediate: int
    scoring: str = "softmax"  # softmax | sigmoid | softmax_topk
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_bias: bool = False  # DeepSeek-V3 e_score_correction_bias
    router_bias: bool = False  # GPT-OSS router has a bias
    expert_bias: bool = False  # GPT-OSS experts have biases
    activation: str = "silu"
    shared_intermediate: int = 0  # 0 = no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert
    weight_input: bool = False  # Llama 4: the routing weight scales the expert's input, not its output


@dataclass
class MLASpec:
    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass
class IndexerSpec:
    """DeepSeek-V3.2's sparse attention indexer: heads, head dim, tokens each query keeps."""
    n_heads: int
    head_dim: int
    topk: int
    interleaved: bool = False  # GLM-5: the indexer's rope rotates adjacent pairs
    shared: frozenset[int] = frozenset()  # GLM-5: layers that reuse the previous indexer layer's choice

    def runs_at(self, layer: int) -> bool:
        return layer not in self.shared


@dataclass
class LinearAttnSpec:
    """Qwen3-Next's Gated DeltaNet layers: key heads (each serving num_v_heads / num_k_heads value
    heads), head dims and the short convolution's kernel."""
    num_k_heads: int
    num_v_heads: int
    k_dim: int
    v_dim: int
    conv_kernel: int
    split_proj: bool = False  # Qwen3.5: in_proj_qkv / _z / _b / _a, not Qwen3-Next's per-key-head qkvz / ba

    @property
    def conv_dim(self) -> int:  # channels of the convolution: q, k and v
        return 2 * self.num_k_heads * self.k_dim + self.num_v_heads * self.v_dim

    def state_bytes(self, dtype_bytes: int) -> int:
        """One sequence's state in one layer: the float32 recurrent state and the convolution window."""
        return self.num_v_heads * self.k_dim * self.v_dim * 4 + self.conv_dim * (self.conv_kernel - 1) * dtype_bytes


@dataclass
class ModelSpec:
    arch: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope: RopeSpec
    max_positions: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    qk_norm_whole: bool = False  # MiniMax-M2: q/k RMSNorm over all heads together, not per head
    sinks: bool = False
    sliding_window: Optional[int] = None
    layer_types: list[str] = field(default_factory=list)  # "full" | "sliding" | "chunked" per layer
    attention_chunk: Optional[int] = None  # Llama 4: "chunked" layers see only their chunk of positions
    nope_layers: frozenset[int] = frozenset()  # layers without rotary embedding (Llama 4's global layers)
    qk_l2_norm: bool = False  # Llama 4: weightless RMSNorm of q and k after rope, on rope layers
    attn_temperature: Optional[tuple[float, float]] = None  # Llama 4 NoPE layers: (floor_scale, attn_scale)
    linear: Optional[LinearAttnSpec] = None  # Qwen3-Next: "linear" layers are Gated DeltaNet, not attention
    index: Optional[IndexerSpec] = None  # DeepSeek-V3.2: MLA sees only the indexer's top-k cached tokens
    attn_output_gate: bool = False  # Qwen3-Next: q_proj also yields a per-head gate, sigmoid(gate) * output
    norm_offset: bool = False  # Qwen3-Next: RMSNorm weights are stored zero-centred (the scale is 1 + w)
    moe: Optional[MoESpec] = None
    moe_layers: frozenset[int] = frozenset()
    mla: Optional[MLASpec] = None
    v4: Optional[Any] = None  # DeepSeek-V4's attention / hyper-connection spec (spec_v4.V4Spec)
    softmax_scale: float = 0.0
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def qk_norm_dims(self) -> tuple[int, int]:
        """The sizes of the q and k RMSNorm weights."""
        if self.qk_norm_whole:
            return self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.head_dim, self.head_dim

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def window(self, layer: int) -> Optional[int]:
        if self.layer_types and self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    def is_linear(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "linear"

    @property
    def linear_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_linear(i)]

    def chunk(self, layer: int) -> Optional[int]:
        if self.layer_types and self.layer_types[layer] == "chunked":
            return self.attention_chunk
        return None


def _eos(c: dict) -> tuple[int, ...]:
    e = c.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, list) else (int(e),)


def parse_config(c: dict) -> ModelSpec:
    """Build the spec from a config.json dict. Every problem (an unsupported architecture, a missing
    field, a value of the wrong type or range) is a one-line KtError that names config.json."""
    try:
        c, _ = text_backbone(c)
        _check_config(c)
        spec = _parse_config(c)
        _check_spec(spec)
        return spec
    except KtError as exc:
        if "config.json" in str(exc):
            raise
        raise KtError(f"config.json: {exc}") from None
    except KeyError as exc:
        raise KtError(f"config.json lacks {exc}, which {_show(c.get('architectures') or 'this model')} needs; "
                      "fix config.json or download it again") from None
    except (TypeError, ValueError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
        raise KtError(f"config.json holds a value of the wrong type or range ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]}); fix config.json or download it again") from None


def _parse_config(c: dict) -> ModelSpec:
    """Build the spec from a config.json dict; unsupported architectures fail with the list."""
    from kt_core.models.spec_families import _deepseek, _llama4, _qwen3_next, _sigmoid_moe

    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:  # no architectures list: fall back to model_type
        mt = c.get("model_type")
        mt = MODEL_TYPES.get(mt, mt) if isinstance(mt, str) else mt
        arch = next((a for a, fam in ARCHITECTURES.items() if fam == mt), None)
    if arch is None:
        raise KtError(f"unsupported architecture {archs or c.get('model_type')!r}; supported: "
                      f"{', '.join([*ARCHITECTURES, *TEXT_BACKBONES])}")
    fam = ARCHITECTURES[arch]
    H, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or H // n_heads)
    theta, kind, params = _rope_params(c)
    L = int(c["num_hidden_layers"])
    spec = ModelSpec(
        arch=arch, family=fam, vocab_size=int(c["vocab_size"]), hidden_size=H, num_layers=L,
        num_heads=n_heads, num_kv_heads=int(c.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        intermediate_size=int(c.get("intermediate_size") or 0), rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope=RopeSpec(theta, _rot_dim(c, fam, head_dim, params), kind, params),
        max_positions=int(c.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=_eos(c),
    )
    spec.softmax_scale = head_dim ** -0.5
    if c.get("rope_freq_factors") is not None:  # from a GGUF's rope_freqs (replaces rope_scaling)
        spec.rope.kind, spec.rope.params = "freq_factors", {"freq_factors": list(c["rope_freq_factors"])}
    if fam == "llama":
        spec.qkv_bias = spec.o_bias = bool(c.get("attention_bias", False))
    elif fam in ("qwen2", "qwen2_moe"):
        spec.qkv_bias = True
    elif fam in ("qwen3", "qwen3_moe"):
        spec.qkv_bias = spec.o_bias = bool(c.get("attention_bias", False))
        spec.qk_norm = True
    if fam in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral") and c.get("sliding_window") and \
            c.get("use_sliding_window", fam == "mixtral"):
        spec.sliding_window = int(c["sliding_window"])
        lt = c.get("layer_types")
        max_window_layers = int(c.get("max_window_layers", L))
        spec.layer_types = list(lt) if lt else ["sliding" if i >= max_window_layers or fam == "mixtral" else "full"
                                               for i in range(L)]
        spec.layer_types = ["sliding" if t == "sliding_attention" or t == "sliding" else "full"
                            for t in spec.layer_types]
    if fam == "mixtral":
        spec.moe = MoESpec(int(c["num_local_experts"]), int(c["num_experts_per_tok"]), spec.intermediate_size)
        spec.moe_layers = frozenset(range(L))
    elif fam in ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe"):
        n_exp = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        spec.moe = MoESpec(n_exp, int(c["num_experts_per_tok"]), int(c["moe_intermediate_size"]),
                           renormalize=bool(c.get("norm_topk_prob", False)))
        if fam in ("qwen3_next", "qwen3_5_moe"):
            _qwen3_next(spec, c)
        if fam in ("qwen2_moe", "qwen3_next", "qwen3_5_moe"):
            spec.moe.shared_intermediate = int(c.get("shared_expert_intermediate_size") or 0)
            spec.moe.shared_gate = spec.moe.shared_intermediate > 0
        step, only = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
        spec.moe_layers = frozenset(i for i in range(L) if i not in only and spec.moe.num_experts > 0
                                    and (i + 1) % step == 0)
    elif fam in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"):
        _deepseek(spec, c, params)
    elif fam == "glm4_moe":
        spec.qkv_bias = bool(c.get("attention_bias", False))
        spec.qk_norm = bool(c.get("use_qk_norm", False))
        spec.moe = _sigmoid_moe(c, int(c.get("n_routed_experts") or c.get("num_local_experts") or 0),
                                int(c["moe_intermediate_size"]), bool(c.get("norm_topk_prob", True)))
        spec.moe.shared_intermediate = int(c["moe_intermediate_size"]) * int(c.get("n_shared_experts", 1) or 0)
        first_dense = int(c.get("first_k_dense_replace", 1))
        spec.moe_layers = frozenset(i for i in range(L) if i >= first_dense)
    elif fam == "llama4":
        _llama4(spec, c)
    elif fam == "minimax_m2":
        spec.qk_norm = spec.qk_norm_whole = True
        spec.moe = _sigmoid_moe(c, int(c.get("num_local_experts") or c.get("num_experts") or 0),
                                spec.intermediate_size, True, grouped=False, scaled=False)
        spec.moe_layers = frozenset(range(L))
    elif fam == "deepseek_v4":
        from kt_core.models import spec_v4

        spec_v4.parse(spec, c)
    elif fam == "gpt_oss":
        spec.qkv_bias = spec.o_bias = spec.sinks = True
        spec.moe = MoESpec(int(c["num_local_experts"]), int(c["num_experts_per_tok"]), spec.intermediate_size,
                           scoring="softmax_topk", router_bias=True, expert_bias=True, activation="swiglu_oai")
        spec.moe_layers = frozenset(range(L))
        spec.sliding_window = int(c.get("sliding_window") or 128)
        spec.layer_types = ["sliding" if t == "sliding_attention" else "full"
                            for t in (c.get("layer_types") or ["sliding_attention", "full_attention"] * (L // 2 + 1))][:L]
    return spec
