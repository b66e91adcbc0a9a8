"""The newest architectures (GLM-4.5, MiniMax-M2, Llama 4, Qwen3-Next, Qwen3.5-MoE, DeepSeek-V3.2, GLM-5,
DeepSeek-V4) with the engine's features, not only plain parity:
quantized experts and hybrid expert placement (the prefix cache: tests/unit/test_scheduler.py; the
server: tests/server/test_server_archs.py)."""
import pytest

import kt_core

ARCHS = ["glm4_moe", "minimax_m2", "llama4", "qwen3_next", "qwen3_5_moe", "deepseek_v32", "glm_moe_dsa", "deepseek_v4"]
PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88, 19, 27, 50, 61, 1, 9, 30, 77]
FP32 = ["model.dtype=float32", "quant.group_size=32"]
# the quantized engine against transformers running the same experts decoded from their codes (by the
# conformance suite's decoders, written from the format definitions): what is left is the kernels'
# arithmetic (int8 / int4 multiply int16-quantized activations: ~4e-5 median relative, ~1e-4 max)
BOUND = {"int8": 2e-4, "fp8": 2e-5, "int4": 2e-4}


def _dequantized_reference(path, fmt):
    """transformers' model with every routed expert's weights replaced by quantize -> reference decode."""
    import torch

    from kt_core.weights.quant import Quant, quantize
    from tests.conformance.dequant_reference import dequantize
    from tests.parity.tiny import hf_model

    hf = hf_model(path)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".experts." not in name or p.dim() != 3:
                continue
            # [E, out, in], except Llama 4's [E, in, out]
            transposed = name.endswith("gate_up_proj") and p.shape[1] * 2 == p.shape[2] or \
                name.endswith("down_proj") and "feed_forward" in name
            for j in range(p.shape[0]):
                w = p[j].T if transposed else p[j]
                w.copy_(dequantize(quantize(w.contiguous(), Quant(fmt), 32, True)).to(w.dtype))
    return hf


@pytest.mark.parametrize("fmt", list(BOUND))
@pytest.mark.parametrize("name", ARCHS)
def test_quantized_experts_match_transformers_on_the_decoded_weights(name, fmt, tiny_checkpoint):
    import torch

    path = tiny_checkpoint(name)
    engine = kt_core.Engine.from_pretrained(path, overrides=[*FP32, f"quant={fmt}"])
    assert [s for layer in engine.model.layers for s in getattr(layer.ffn, "shards", [])], "MoE layers run"
    with torch.no_grad():
        ref = _dequantized_reference(path, fmt)(torch.tensor([PROMPT])).logits[0]
        plain = kt_core.Engine.from_pretrained(path, overrides=FP32).logits(PROMPT)
    ours = engine.logits(PROMPT)
    err = float(((ours - ref).abs().amax(-1) / ref.abs().max()).median())
    assert err <= BOUND[fmt], f"{name} {fmt}: median error {err:.2e} against the decoded weights"
    assert float((ours - plain).abs().max()) > 0, "the experts really are quantized"


@pytest.mark.parametrize("name", ARCHS)
def test_hybrid_placement_matches_one_device(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    ov = [*FP32, "quant=int8"]
    one = kt_core.Engine.from_pretrained(path, overrides=ov)
    two = kt_core.Engine.from_pretrained(path, overrides=[*ov, "topology=hybrid_cpu", "device.cpu.threads=2",
                                                          "topology.expert_policy.fraction=0.5"])
    split = [layer.ffn for layer in two.model.layers if len(getattr(layer.ffn, "shards", [])) == 2]
    assert split, "half the experts of each MoE layer go to each device"
    want = one.logits(PROMPT)
    assert float((two.logits(PROMPT) - want).abs().max() / want.abs().max()) < 1e-4
    assert two.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids == \
        one.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids


def test_kimi_k25_text_backbone_under_its_released_name(tiny_checkpoint, tmp_path):
    """The released config names the class KimiK25ForConditionalGeneration (transformers: Kimi_K25...);
    only language_model.* is read, under the plain names, and a config without text_config is refused."""
    import json
    import shutil

    from kt_core.errors import KtError
    from kt_core.weights.checkpoint import Checkpoint

    src = tiny_checkpoint("kimi_k25")
    dst = tmp_path / "k25"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["KimiK25ForConditionalGeneration"]
    (dst / "config.json").write_text(json.dumps(cfg))
    ck = Checkpoint(dst)
    assert "model.layers.1.mlp.gate.weight" in ck and "lm_head.weight" in ck
    assert not [k for k in ck.keys() if "vision" in k or "mm_projector" in k or k.startswith("language_model.")]
    want = kt_core.Engine.from_pretrained(src, overrides=FP32).logits(PROMPT)
    got = kt_core.Engine.from_pretrained(dst, overrides=FP32).logits(PROMPT)
    assert float((got - want).abs().max()) == 0.0
    del cfg["text_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="text_config"):
        kt_core.Engine.from_pretrained(dst, overrides=FP32)


def test_llama4_multimodal_checkpoint_runs_its_language_model(tmp_path):
    """Llama 4's released checkpoints are Llama4ForConditionalGeneration: the text model under
    language_model.* beside a vision encoder. (transformers 5.24's own multimodal forward fails on a
    text-only call, so the reference is its language model, loaded from the same folder.)"""
    import torch
    import transformers

    text = dict(vocab_size=96, hidden_size=64, intermediate_size=64, intermediate_size_mlp=80, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                attention_chunk_size=8, no_rope_layer_interval=2, floor_scale=4, interleave_moe_layer_step=2,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    cfg = transformers.Llama4Config(text_config=text, vision_config=vision)
    cfg.text_config.initializer_range = 0.08
    transformers.Llama4ForConditionalGeneration(cfg).save_pretrained(tmp_path / "l4")
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "l4").eval()
    with torch.no_grad():
        ref = hf.language_model(torch.tensor([PROMPT])).logits[0]
    engine = kt_core.Engine.from_pretrained(tmp_path / "l4", overrides=FP32)
    assert [i for i in range(3) if engine.model.spec.is_moe(i)] == [1]
    assert float((engine.logits(PROMPT) - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_qwen3_5_moe_multimodal_checkpoint_runs_its_language_model(tmp_path):
    """Qwen3.5-MoE's released checkpoints are Qwen3_5MoeForConditionalGeneration: the language model
    under model.language_model.*, lm_head at the top, a vision tower under model.visual.*."""
    import torch
    import transformers

    text = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=8, num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=48, initializer_range=0.08)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2)
    torch.manual_seed(0)
    transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path / "q")
    hf = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([PROMPT])).logits[0]
    engine = kt_core.Engine.from_pretrained(tmp_path / "q", overrides=FP32)
    assert engine.model.spec.linear_layers == [0, 2]
    assert float((engine.logits(PROMPT) - ref).abs().max() / ref.abs().max()) <= 1e-4
