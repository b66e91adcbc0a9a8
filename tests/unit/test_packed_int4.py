"""compressed-tensors pack-quantized int4 checkpoints (Kimi-K2-Thinking / K2.5 ship their routed experts
so): the experts are written with compressed-tensors' own packer and kept as kt-core int4, and the
model matches transformers running the same weights decoded in the test from the codes and scales."""
import json
import shutil

import pytest
import torch

import kt_core
from kt_core.errors import KtError
from kt_core.weights.quant import Quant
from tests.parity.tiny import hf_model

pack_to_int32 = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers").pack_to_int32
PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88, 19, 27, 50, 61, 1, 9, 30, 77]
GROUP = 32
QCONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
           "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                         "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                     "strategy": "group", "group_size": GROUP, "dynamic": False}}},
           "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"]}


def _quantize(w):
    """Symmetric int4 codes in groups of GROUP inputs and their bf16 scales (the test's own rule)."""
    g = w.float().view(w.shape[0], -1, GROUP)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-8).to(torch.bfloat16)
    q = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).view(w.shape)
    return q, scale


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint with its routed experts pack-quantized, and the transformers model
    with those experts replaced by q * scale."""
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("deepseek_v3")
    dst = tmp_path_factory.mktemp("packed") / "m"
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    decoded = {}
    for name in [n for n in sd if ".mlp.experts." in n and n.endswith(".weight")]:
        q, scale = _quantize(sd.pop(name))
        base = name[: -len("weight")]
        sd[base + "weight_packed"] = pack_to_int32(q, 4)
        sd[base + "weight_scale"] = scale
        sd[base + "weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int32)
        decoded[name] = (q.float().view(q.shape[0], -1, GROUP) * scale.float()[..., None]).view(q.shape)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = QCONFIG
    (dst / "config.json").write_text(json.dumps(cfg))
    hf = hf_model(src)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if ".experts." in pname and p.dim() == 3:  # [E, out, in]; gate_up holds gate then up
                prefix = pname.replace("model.layers.", "model.layers.", 1).rsplit(".", 1)[0]
                for j in range(p.shape[0]):
                    if pname.endswith("gate_up_proj"):
                        p[j] = torch.cat([decoded[f"{prefix}.{j}.{w}_proj.weight"] for w in ("gate", "up")])
                    else:
                        p[j] = decoded[f"{prefix}.{j}.down_proj.weight"]
    return dst, hf


def test_experts_are_kept_as_int4_and_match_transformers(packed):
    path, hf = packed
    engine = kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32"])
    shards = [s for layer in engine.model.layers for s in getattr(layer.ffn, "shards", [])]
    # the native kernels' packed experts name their format; the torch path keeps the QuantizedWeight
    kept = [(e.fmt, e.group) if hasattr(e, "fmt") else (e.gate.format.value, e.gate.group_size)
            for _, _, e in shards]
    assert kept and set(kept) == {(Quant.INT4.value, GROUP)}
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    err = float(((engine.logits(PROMPT) - ref).abs().amax(-1) / ref.abs().max()).median())
    assert err <= 2e-4, f"median error {err:.2e} against transformers on the decoded weights"


def test_broken_or_unsupported_packing_is_a_clear_error(packed, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = packed
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    sd = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_packed"
    sd[name] = sd[name][:, :-1].contiguous()  # a truncated row
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KtError, match="weight_packed is torch.int32"):
        kt_core.Engine.from_pretrained(bad, overrides=["model.dtype=float32"])
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="'num_bits': 8.* is not supported"):
        kt_core.Engine.from_pretrained(bad, overrides=["model.dtype=float32"])


def test_kt_plan_counts_the_kept_int4_bytes(packed):
    from kt_core.commands.plan import stored_tensors, model_spec
    from kt_core.config import compose

    path, _ = packed
    cfg = compose([f"model.path={path}"])
    tensors = stored_tensors(cfg, model_spec(cfg))
    experts = [t for t in tensors if t.group == "experts"]
    assert experts and all(t.stored == t.numel // 2 + t.numel // GROUP * 4 for t in experts)
    assert all(t.stored is None for t in tensors if t.group != "experts")
    with_int8 = stored_tensors(compose([f"model.path={path}", "quant=int8"]), model_spec(cfg))
    assert all(t.stored is None for t in with_int8), "quant.experts set: requantized, not kept"
