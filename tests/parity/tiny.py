"""Tiny random checkpoints of every supported architecture, written with transformers'
own ``save_pretrained`` so the parity tests compare against the reference implementation."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_scaled": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                          num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_tied_mha": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                              rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "qwen3_linear_rope": ("Qwen3Config", "Qwen3ForCausalLM",
                          dict(head_dim=16, num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=6, num_experts_per_tok=2)),
    "mixtral_window": ("MixtralConfig", "MixtralForCausalLM",
                       dict(num_local_experts=4, num_experts_per_tok=3, sliding_window=6)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1],
                       norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                       decoder_sparse_step=2, mlp_only_layers=[])),
    "qwen3_moe_unnormed": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                           dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                norm_topk_prob=False, mlp_only_layers=[0])),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1,
                         first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                         routed_scaling_factor=1.5, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)),
    "deepseek_v2_greedy": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                           dict(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2,
                                first_k_dense_replace=0, topk_method="greedy", routed_scaling_factor=1.0,
                                kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=16, qk_nope_head_dim=8,
                                v_head_dim=24, num_key_value_heads=4)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)),
    "deepseek_v3_yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                         dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2,
                              first_k_dense_replace=0, n_group=2, topk_group=1, norm_topk_prob=True,
                              kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                              v_head_dim=8, num_key_value_heads=4,
                              rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                            "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1})),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4,
                     max_position_embeddings=131072,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gpt_oss_full": ("GptOssConfig", "GptOssForCausalLM",
                     dict(num_local_experts=6, num_experts_per_tok=3, head_dim=8, num_attention_heads=8,
                          max_position_embeddings=131072, sliding_window=16,
                          layer_types=["full_attention", "sliding_attention", "full_attention"])),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                      first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                      norm_topk_prob=True, use_qk_norm=True, attention_bias=True)),
    "glm4_moe_plain": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                       dict(n_routed_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, n_shared_experts=2,
                            first_k_dense_replace=0, norm_topk_prob=False, use_qk_norm=False,
                            attention_bias=False, head_dim=32, partial_rotary_factor=0.25)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, rotary_dim=8, bos_token_id=1,
                        eos_token_id=2)),
    "minimax_m2_mqa": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                       dict(num_local_experts=6, num_experts_per_tok=3, head_dim=24, rotary_dim=12,
                            num_key_value_heads=1, intermediate_size=40, bos_token_id=1, eos_token_id=2)),
    # Llama 4: chunked rope layers between global NoPE layers (temperature-tuned), top-1 sigmoid routing on the
    # experts' input with a shared expert; the second: dense / MoE interleaved, top-2, no QK-norm, llama3 rope
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=64, intermediate_size_mlp=80,
                    head_dim=16, attention_chunk_size=8, no_rope_layer_interval=2, floor_scale=4, attn_scale=0.5,
                    use_qk_norm=True, bos_token_id=1, eos_token_id=2)),
    "llama4_interleaved": ("Llama4TextConfig", "Llama4ForCausalLM",
                           dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=32,
                                intermediate_size_mlp=96, head_dim=16, interleave_moe_layer_step=2,
                                attention_chunk_size=6, no_rope_layer_interval=3, use_qk_norm=False,
                                attn_temperature_tuning=False, bos_token_id=1, eos_token_id=2,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Qwen3-Next: Gated DeltaNet layers (recurrent state) around a gated full-attention layer
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(head_dim=16, partial_rotary_factor=0.5, full_attention_interval=2, linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
                        linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[2])),
    # Qwen3.5-MoE: the same layers with q|k|v, z, b, a projected separately, every layer MoE
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM",
                    dict(head_dim=16, full_attention_interval=3, linear_num_key_heads=2, linear_num_value_heads=2,
                         linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=3, num_experts=6,
                         num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    # DeepSeek-V3.2: MLA restricted to the lightning indexer's top-k cached tokens (4 of up to 52 here)
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                          first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                          norm_topk_prob=True, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                          qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4, index_topk=4,
                          index_head_dim=16, index_n_heads=8)),
    # GLM-5: DeepSeek-V3.2's sparse attention with an interleaved-rope indexer, and layers that reuse the
    # previous indexer layer's choice ("shared"; here layers 1 and 3)
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    dict(num_hidden_layers=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                         kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24,
                         num_key_value_heads=4, index_topk=4, index_head_dim=16, index_n_heads=8,
                         indexer_types=["full", "shared", "full", "shared"])),
    # DeepSeek-V4: hyper-connected streams (3), a sliding window of 6 over one key=value head with sinks,
    # csa layers (entries of 4 tokens, the indexer keeps 3) and an hca layer (entries of 8 tokens), a hash
    # MoE layer, sqrt-softplus routing, SwiGLU clamped at 10 (the experts are scaled up to reach it)
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM",
                    dict(num_hidden_layers=4, head_dim=32, q_lora_rank=48, num_experts_per_tok=2, n_routed_experts=8,
                         n_shared_experts=1, routed_scaling_factor=1.5,  # expert width: BASE's intermediate_size
                         layer_types=["sliding_attention", "compressed_sparse_attention",
                                      "heavily_compressed_attention", "compressed_sparse_attention"],
                         mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                         compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                         sliding_window=6, o_groups=2, o_lora_rank=16, index_n_heads=4, index_head_dim=16,
                         index_topk=3, hc_mult=3, hc_sinkhorn_iters=5, partial_rotary_factor=0.25)),
    # Kimi-K2.5: the DeepSeek-V3 text backbone of a multimodal checkpoint (vision tower not loaded)
    "kimi_k25": ("Kimi_K25Config", "Kimi_K25ForConditionalGeneration",
                 dict(text_config=dict(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2,
                                       moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                       n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                                       kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                       v_head_dim=16, num_key_value_heads=4),
                      vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64),
                      projection_hidden_size=32)),
}


def _config(cfg_cls, extra: dict):
    import transformers

    cls = getattr(transformers, cfg_cls)
    if "text_config" in extra:  # multimodal: the tiny shape goes to the language model
        tie = extra["text_config"].get("tie_word_embeddings", BASE["tie_word_embeddings"])
        return cls(**{**extra, "text_config": {**BASE, **extra["text_config"]}, "tie_word_embeddings": tie})
    return cls(**{**BASE, **extra})


def _released_names(out: Path) -> None:
    """transformers 5.24 saves a Kimi-K2.5 language model's layers as ``language_model.model.blocks.N``;
    the released checkpoint (and transformers' own loader) name them ``language_model.model.layers.N``."""
    from safetensors.torch import load_file, save_file

    f = out / "model.safetensors"
    sd = load_file(f)
    fixed = {re.sub(r"^language_model\.model\.blocks\.", "language_model.model.layers.", k): v for k, v in sd.items()}
    if fixed.keys() != sd.keys():
        save_file(fixed, f, metadata={"format": "pt"})


def build(name: str, out: Path, seed: int = 0, dtype=torch.float32, init_std: float = 0.08,
          shape: dict | None = None) -> Path:
    """Write a tiny random checkpoint of ``name`` to ``out`` and return it; ``shape``: config values
    over ``name``'s (e.g. widths that are whole GGUF super-blocks of 256)."""
    import transformers

    cfg_cls, model_cls, extra = CONFIGS[name]
    cfg = _config(cfg_cls, {**extra, **(shape or {})})
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    centred = cfg.model_type in ("qwen3_next", "qwen3_5_moe_text")
    with torch.no_grad():  # random biases / norms / sinks so every parameter matters
        for pname, p in model.named_parameters():
            if p.dim() == 1 or "bias" in pname or "sinks" in pname:  # (position_bias: V4's compressors)
                base = 1.0 if ("norm" in pname and "bias" not in pname) else 0.0
                if centred and "linear_attn.norm" not in pname:  # Qwen3-Next's norms scale by 1 + w
                    base = 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            if "experts.gate_up_proj" in pname and cfg.model_type == "deepseek_v4":
                p.mul_(12.0)  # gate / up pre-activations beyond DeepSeek-V4's clamp at 10
        for pname, buf in model.named_buffers():
            if "e_score_correction_bias" in pname:
                buf.copy_(0.05 * torch.randn_like(buf))
            if "tid2eid" in pname:  # DeepSeek-V4's hash routing: each token's experts, distinct per token
                buf.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[:buf.shape[1]] for _ in range(buf.shape[0])]))
    model.save_pretrained(out, safe_serialization=True)
    _released_names(out)
    return out


def hf_model(path: Path, dtype=torch.float32):
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=dtype).eval()
