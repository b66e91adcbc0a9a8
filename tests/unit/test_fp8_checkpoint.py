"""Float8 e4m3 checkpoints with block scales (DeepSeek-V3's native format): read as they are,
dequantized for dense layers, kept as fp8 codes for experts under quant=fp8."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kt_core
from kt_core.weights.quant import Quant

BLOCK = 16  # the tiny model's dims are multiples of 16 (real checkpoints use 128)
KEEP = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight", "layernorm")


def _fp8_blocks(w: torch.Tensor):
    rows, cols = w.shape
    rb = (rows + BLOCK - 1) // BLOCK
    pad = torch.zeros(rb * BLOCK, cols)
    pad[:rows] = w
    blocks = pad.reshape(rb, BLOCK, cols // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0  # [rb, cb]
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (codes.float() * scale[:, None, :, None]).reshape(rb * BLOCK, cols)[:rows]
    return codes.reshape(rb * BLOCK, cols)[:rows].contiguous(), scale, deq


@pytest.fixture(scope="module")
def fp8_pair(tiny_checkpoint, tmp_path_factory):
    """(fp8 checkpoint, float32 checkpoint holding exactly the fp8 values)."""
    src = tiny_checkpoint("deepseek_v3")
    root = tmp_path_factory.mktemp("fp8")
    fp8, ref = root / "fp8", root / "ref"
    shutil.copytree(src, fp8)
    shutil.copytree(src, ref)
    (f,) = list(src.glob("*.safetensors"))
    state = load_file(f)
    q, r = {}, {}
    for name, t in state.items():
        if t.dim() == 2 and name.endswith(".weight") and not any(k in name for k in KEEP):
            codes, scale, deq = _fp8_blocks(t.float())
            q[name], q[name + "_scale_inv"], r[name] = codes, scale, deq
        else:
            q[name] = r[name] = t
    save_file(q, fp8 / f.name, metadata={"format": "pt"})
    save_file(r, ref / f.name, metadata={"format": "pt"})
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK, BLOCK]}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    return fp8, ref


IDS = [3, 17, 42, 5, 88, 1, 60, 7]


def test_fp8_checkpoint_reads_like_its_dequantized_values(fp8_pair):
    from transformers import AutoModelForCausalLM

    fp8, ref = fp8_pair
    ours = kt_core.Engine.from_pretrained(fp8, overrides=["model.dtype=float32"]).logits(IDS)
    hf = AutoModelForCausalLM.from_pretrained(ref, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    assert float((ours - want).abs().max() / want.abs().max()) < 1e-4


def test_fp8_experts_stay_fp8_codes_under_quant_fp8(fp8_pair):
    fp8, ref = fp8_pair
    plain = kt_core.Engine.from_pretrained(ref, overrides=["model.dtype=float32"]).logits(IDS)
    engine = kt_core.Engine.from_pretrained(fp8, overrides=["model.dtype=float32", "quant=fp8"])
    moe = next(layer.ffn for layer in engine.model.layers if hasattr(layer.ffn, "shards"))
    held = moe.shards[0][2]
    fmt = held.fmt if hasattr(held, "fmt") else held.format.value
    assert fmt == Quant.FP8.value and (getattr(held, "group", None) in (None, BLOCK))
    out = engine.logits(IDS)
    assert float((out - plain).abs().max() / plain.abs().max()) < 1e-4


def test_fp8_without_scales_is_refused(fp8_pair, tmp_path):
    fp8, _ = fp8_pair
    broken = tmp_path / "b"
    shutil.copytree(fp8, broken)
    (f,) = list(broken.glob("*.safetensors"))
    state = load_file(f)
    victim = next(k for k in state if k.endswith("_scale_inv"))
    del state[victim]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(kt_core.errors.KtError, match="has no .*_scale_inv"):
        kt_core.Engine.from_pretrained(broken, overrides=["model.dtype=float32"])
