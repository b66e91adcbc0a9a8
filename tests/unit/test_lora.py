"""LoRA adapters made by peft itself, run by kt-core (``lora.path``), against peft's PeftModel on
transformers: attention (MHA/GQA and MLA), dense MLPs and shared experts, rsLoRA scaling."""
import json

import pytest
import torch

import kt_core
from kt_core.errors import KtError
from tests.parity.tiny import hf_model

peft = pytest.importorskip("peft")
PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88, 19, 27, 50, 61, 1, 9, 30, 77]
TARGETS = {
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],  # incl. dense and shared experts
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],  # MLA
}


def make_adapter(base, out, targets, rslora=False, seed=0, params=None):
    """peft's adapter with random B (peft starts B at zero: an adapter that changes nothing);
    ``params``: target_parameters (LoRA on the routed experts' fused tensors)."""
    hf = hf_model(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                          **({"target_parameters": params} if params else {}))
    model = random_b(peft.get_peft_model(hf, cfg), seed)
    model.save_pretrained(out, safe_serialization=True)
    return model.eval()


def random_b(model, seed: int):
    """``model`` (a peft model) with every lora_B set to N(0, 0.3^2) draws of seed ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def check_against_peft(base, ref_model, adapter, what):
    """kt-core with ``lora.path=adapter`` gives peft's logits (1e-4), and the adapter changes the model."""
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0]
        plain = hf_model(base)(torch.tensor([PROMPT])).logits[0]
    assert float((ref - plain).abs().max()) > 1e-2, "the adapter changes the model"
    engine = kt_core.Engine.from_pretrained(base, overrides=["model.dtype=float32", f"lora.path={adapter}"])
    err = float((engine.logits(PROMPT) - ref).abs().max() / ref.abs().max())
    assert err <= 1e-4, f"{what}: logits differ from peft's by {err:.2e}"


@pytest.mark.parametrize("name", list(TARGETS))
def test_adapter_matches_peft(name, tiny_checkpoint, tmp_path):
    base = tiny_checkpoint(name)
    ref_model = make_adapter(base, tmp_path / "adapter", TARGETS[name], rslora=name == "qwen2_moe")
    check_against_peft(base, ref_model, tmp_path / "adapter", name)


def test_adapter_for_another_model_or_of_another_kind_is_refused(tiny_checkpoint, tmp_path):
    make_adapter(tiny_checkpoint("qwen3_moe"), tmp_path / "a", TARGETS["qwen3_moe"])
    with pytest.raises(KtError, match="made for another base model"):  # llama's q_proj has another shape
        kt_core.Engine.from_pretrained(tiny_checkpoint("deepseek_v3"), overrides=[f"lora.path={tmp_path / 'a'}"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="use_dora=true"):
        kt_core.Engine.from_pretrained(tiny_checkpoint("qwen3_moe"), overrides=[f"lora.path={tmp_path / 'a'}"])
    with pytest.raises(KtError, match="no adapter_config.json"):
        kt_core.Engine.from_pretrained(tiny_checkpoint("qwen3_moe"), overrides=[f"lora.path={tmp_path}"])
    cfg["use_dora"] = False
    for key, value, match in (("use_rslora", "false", "use_rslora is 'false'"),  # a string read as true
                              ("target_parameters", 5, "must be a list")):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(KtError, match=match):
            kt_core.Engine.from_pretrained(tiny_checkpoint("qwen3_moe"), overrides=[f"lora.path={tmp_path / 'a'}"])


def test_kt_merge_writes_the_merged_checkpoint(tiny_checkpoint, tmp_path):
    from kt_core.cli import main

    base = tiny_checkpoint("deepseek_v3")
    ref_model = make_adapter(base, tmp_path / "adapter", TARGETS["deepseek_v3"])
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0]
    assert main(["merge", f"model.path={base}", f"lora.path={tmp_path / 'adapter'}", f"out={tmp_path / 'merged'}"]) == 0
    with torch.no_grad():  # transformers alone reads the merged folder as peft ran the adapter
        merged = hf_model(tmp_path / "merged")(torch.tensor([PROMPT])).logits[0]
    assert float((merged - ref).abs().max() / ref.abs().max()) <= 1e-5
    engine = kt_core.Engine.from_pretrained(tmp_path / "merged", overrides=["model.dtype=float32"])
    assert float((engine.logits(PROMPT) - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert main(["merge", f"model.path={base}", f"lora.path={tmp_path / 'adapter'}", f"out={tmp_path / 'merged'}"]) == 2
    # on DeepSeek-V3 peft adapts gate / up as transformers 5's fused expert tensors (target_parameters)
    make_adapter(base, tmp_path / "experts", ["q_a_proj", "gate_proj", "up_proj"])
    with pytest.raises(KtError, match="target_parameters"):
        kt_core.Engine.from_pretrained(base, overrides=[f"lora.path={tmp_path / 'experts'}"])


@pytest.mark.slow  # three loads of a tiny model: ~6 s on 2 cores
def test_an_adapter_on_weights_quantized_a_block_of_rows_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """With quant.dense and every dense weight read a block of rows at a time (reader.STREAM_BYTES 0),
    the adapted weights are still merged (read whole), the others streamed: the logits of the whole-tensor
    load, bit for bit, and not the base model's."""
    from kt_core.models import reader

    base = tiny_checkpoint("qwen2_moe")
    make_adapter(base, tmp_path / "adapter", ["q_proj", "gate_proj"])
    ov = ["model.dtype=float32", "quant.dense=int8", f"lora.path={tmp_path / 'adapter'}"]
    whole = kt_core.Engine.from_pretrained(base, overrides=ov).logits(PROMPT)
    monkeypatch.setattr(reader, "STREAM_BYTES", 0)
    monkeypatch.setattr(reader, "STREAM_BLOCK_BYTES", 256)
    streamed = kt_core.Engine.from_pretrained(base, overrides=ov).logits(PROMPT)
    plain = kt_core.Engine.from_pretrained(base, overrides=ov[:2]).logits(PROMPT)
    assert torch.equal(streamed, whole) and not torch.equal(streamed, plain)
