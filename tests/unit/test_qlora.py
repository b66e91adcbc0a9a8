"""QLoRA: LoRA trained on a base whose experts stay quantized (quant=int4 / int8 / fp8, frozen). The
gradients equal transformers + peft autograd's on the same model with those experts decoded from
their codes (the conformance suite's decoders), and kt sft takes the quant group."""
import json

import pytest
import torch

from tests.unit.test_arch_features import _dequantized_reference
from tests.unit.test_lora import random_b
from tests.unit.test_train_lora import check_grads, peft_grads, tiny_sft_run

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj"]  # attention, a dense layer, shared experts


@pytest.mark.parametrize("native_experts", [False, True], ids=["torch-experts", "native-experts"])
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_lora_gradients_on_quantized_experts_equal_peft_on_the_decoded_ones(fmt, native_experts, tiny_checkpoint,
                                                                             tmp_path):
    """Either expert path: the torch reference, or the native kernels forward and backward (the
    transposed products on the packed panels; train/native_experts.py)."""
    from kt_core.models.model import CausalLM, QuantPlan
    from kt_core.models.spec import parse_config
    from kt_core.train.lora_model import AutogradBackend, LoraModel
    from kt_core.weights.checkpoint import Checkpoint
    from kt_core.weights.quant import Quant

    base = tiny_checkpoint("qwen2_moe")
    ref = peft.get_peft_model(_dequantized_reference(base, fmt),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    random_b(ref, 1)
    ref.save_pretrained(tmp_path / "a", safe_serialization=True)
    want = peft_grads(ref)
    ck = Checkpoint(base)
    if native_experts:
        from kt_backends.cpu import native

        if not native.available():
            pytest.skip("native CPU kernels not built")
    model = CausalLM.load(ck, parse_config(ck.config), AutogradBackend(native_experts), torch.float32,
                          QuantPlan(experts=Quant(fmt), group_size=32))
    held = [s[2] for layer in model.layers for s in getattr(layer.ffn, "shards", [])]
    assert held and all(getattr(e, "format", None) is Quant(fmt) or getattr(e, "fmt", None) == fmt
                        for e in held), "the experts stay quantized"
    assert all(type(e).__name__ == ("PackedExperts" if native_experts else "ExpertWeights") for e in held)
    check_grads(LoraModel(model, TARGETS, r=4, alpha=8, init=tmp_path / "a"), want, fmt)


def test_kt_sft_trains_on_int4_experts(tmp_path):
    from kt_core.cli import main

    path, data = tiny_sft_run(tmp_path)
    assert main(["sft", f"model.path={path}", f"train.data={data}", f"train.output={tmp_path / 'run'}",
                 "train.max_steps=2", "train.lora.r=2", "model.dtype=float32", "quant=int4",
                 "quant.group_size=32", "train.batch=2", "train.packing=true"]) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run.metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(x == x for x in losses)
