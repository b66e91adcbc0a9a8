"""q / k / v and gate / up are loaded as one weight each for inference (one product instead of
three or two): the same logits as the projections apart, in every dense format that has row scales;
training keeps them apart (LoRA adapts each)."""
import pytest
import torch

import kt_core
from kt_backends.cpu.backend import CpuBackend
from tests.unit.test_lora import PROMPT


@pytest.mark.parametrize("name,dense", [("qwen2", "none"), ("qwen3_next", "none"), ("qwen2_moe", "int8"),
                                        ("llama", "int4")])
def test_fused_projections_give_the_logits_of_separate_ones(name, dense, tiny_checkpoint, monkeypatch):
    ov = ["model.dtype=float32", f"quant.dense={dense}", "quant.group_size=32"]
    fused = kt_core.Engine.from_pretrained(tiny_checkpoint(name), overrides=ov)
    attn = next(layer.attn for layer in fused.model.layers if hasattr(layer.attn, "w") and "o" in layer.attn.w)
    assert "qkv" in attn.w and "q" not in attn.w
    mlps = [m for layer in fused.model.layers for m in (layer.ffn, getattr(layer.ffn, "shared", None))
            if m is not None and hasattr(m, "gate_up")]
    assert mlps and all(m.gate_up is not None and m.gate is None for m in mlps)
    monkeypatch.setattr(CpuBackend, "fuse_projections", False, raising=False)
    apart = kt_core.Engine.from_pretrained(tiny_checkpoint(name), overrides=ov)
    assert "q" in next(layer.attn for layer in apart.model.layers if hasattr(layer.attn, "w") and "o" in layer.attn.w).w
    want = apart.logits(PROMPT)
    assert float((fused.logits(PROMPT) - want).abs().max() / want.abs().max()) <= 1e-5


def test_training_keeps_projections_apart(tiny_checkpoint):
    from tests.unit.test_train_lora import load

    lora = load(tiny_checkpoint("qwen2"), ["q_proj", "gate_proj"])
    assert any(m.endswith("q_proj") for m in lora.modules) and any(m.endswith("gate_proj") for m in lora.modules)
