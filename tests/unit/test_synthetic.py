"""Synthetic checkpoints are real HF checkpoints (transformers loads them and agrees with us),
deterministic, and their calibrated routers spread tokens over the experts."""
import json

import pytest
import torch

import kt_core
from kt_core.errors import KtError
from kt_core.models.synthetic import build_config, synthesize
from tests.parity.tiny import hf_model

SMALL = {
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=4, topk_group=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=4096),
    "gpt_oss": dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_local_experts=8, num_experts_per_tok=2, sliding_window=8),
    "glm4_moe": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, first_k_dense_replace=1),
    "minimax_m2": dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rotary_dim=8, num_local_experts=16, num_experts_per_tok=4),
    "llama4": dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_local_experts=16, num_experts_per_tok=1,
                   attention_chunk_size=16, interleave_moe_layer_step=2),
    "qwen3_next": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=8, num_experts=16, num_experts_per_tok=4,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "deepseek_v32": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                         n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, first_k_dense_replace=1,
                         n_group=4, topk_group=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=4096, index_n_heads=4,
                         index_head_dim=16, index_topk=8),
    "glm_moe_dsa": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, first_k_dense_replace=1,
                        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        max_position_embeddings=4096, index_n_heads=4, index_head_dim=16, index_topk=8,
                        index_topk_freq=2, index_skip_topk_offset=1),  # layers 1, 3, ... reuse the choice
    "deepseek_v4": dict(hidden_size=64, num_attention_heads=4, head_dim=32, q_lora_rank=48, qk_rope_head_dim=8,
                        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, o_groups=2,
                        o_lora_rank=16, index_n_heads=4, index_head_dim=16, index_topk=8, hc_mult=2,
                        sliding_window=16, num_hash_layers=1, max_position_embeddings=4096,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                        layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                                     "sliding_attention"]),
    "qwen3_5_moe": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=16, linear_value_head_dim=8, num_experts=16, num_experts_per_tok=4,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32),
}


# deepseek_v3 (MLA, grouped routing, a dense first layer) stays in the default run; the two others,
# 20+ s each on 2 cores, run in the slow set (.ci/run runs both)
ARCHS = [pytest.param(a, marks=() if a == "deepseek_v3" else pytest.mark.slow) for a in SMALL]


@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_checkpoint_loads_in_transformers_and_matches(arch, tmp_path):
    report = synthesize(tmp_path / "m", arch=arch, layers=3, shape=SMALL[arch], sample_tokens=96)
    moe_layers = [i for i in range(3) if report.spec.is_moe(i)]
    assert sorted(report.reached) == moe_layers
    E = report.spec.moe.num_experts
    assert all(n >= E * 3 // 4 for n in report.reached.values()), report.reached
    engine = kt_core.Engine.from_pretrained(report.path, overrides=["model.dtype=float32"])
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        ref = hf_model(report.path)(torch.tensor([ids])).logits[0].float()
    ours = engine.logits(ids)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-3  # weights are stored in bf16


@pytest.mark.slow  # two builds: ~25 s on 2 cores
def test_deterministic_and_refuses_non_empty_out(tmp_path):
    a = synthesize(tmp_path / "a", arch="qwen3_moe", layers=1, shape=SMALL["qwen3_moe"], sample_tokens=32)
    b = synthesize(tmp_path / "b", arch="qwen3_moe", layers=1, shape=SMALL["qwen3_moe"], sample_tokens=32)
    for f in sorted(a.path.glob("*.safetensors")):
        assert f.read_bytes() == (b.path / f.name).read_bytes()
    with pytest.raises(KtError, match="is not empty"):
        synthesize(a.path, arch="qwen3_moe", layers=1, shape=SMALL["qwen3_moe"])
    assert json.loads((a.path / "config.json").read_text())["num_hidden_layers"] == 1


def test_config_errors():
    with pytest.raises(KtError, match="unknown arch 'bert'"):
        build_config("bert", None, None)
    with pytest.raises(KtError, match="unknown preset"):
        build_config(None, "qwen9", None)
    with pytest.raises(KtError, match="is a qwen3_moe model, not mixtral"):
        build_config("mixtral", "qwen3-30b-a3b", None)
    cfg = build_config("qwen3_moe", None, 2)
    assert cfg["hidden_size"] == 2048 and cfg["num_experts"] == 128 and cfg["num_hidden_layers"] == 2
