"""DeepSeek-V4 as DeepSeek ships it: the release's tensor names, FP8 (e4m3) dense weights with UE8M0
block scales and MXFP4 routed experts (e2m1 pairs, a UE8M0 scale per 32 inputs). The tiny transformers
checkpoint is re-encoded here from the formats' definitions; transformers running the same weights,
decoded here, is the reference. The experts stay as int8 with groups of 32, which holds MXFP4 exactly."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kt_core
from kt_core.weights.checkpoint import Checkpoint
from tests.parity.tiny import hf_model
from tests.unit.test_arch_features import BOUND

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88, 19, 27, 50, 61, 1, 9, 30, 77]
DENSE = ("attn.wq_a.", "attn.wq_b.", "attn.wkv.", "attn.wo_a.", "attn.wo_b.", "attn.indexer.wq_b.", "shared_experts.")


def _mxfp4(w):
    """(packed codes [out, in/2] uint8, scale bytes [out, in/32], the decoded weight)."""
    out, k = w.shape
    g = w.reshape(out, k // 32, 32)
    amax = g.abs().amax(-1).clamp_min(1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = (g / torch.exp2(e)[..., None]).abs()
    mag = (scaled[..., None] - E2M1).abs().argmin(-1)  # nearest magnitude
    code = (mag + 8 * (g < 0)).reshape(out, k).to(torch.uint8)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    value = E2M1[mag] * torch.where(g < 0, -1.0, 1.0) * torch.exp2(e)[..., None]
    return packed, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu), value.reshape(out, k)


def _fp8(w, block=16):
    """(e4m3 codes, UE8M0 block scales, the decoded weight)."""
    out, k = w.shape
    rb, cb = math.ceil(out / block), math.ceil(k / block)
    pad = torch.zeros(rb * block, cb * block)
    pad[:out, :k] = w
    blocks = pad.reshape(rb, block, cb, block)
    e = torch.ceil(torch.log2(blocks.abs().amax(dim=(1, 3)).clamp_min(1e-30) / 448.0))
    s = torch.exp2(e)[:, None, :, None]
    codes = (blocks / s).to(torch.float8_e4m3fn)
    value = (codes.float() * s).reshape(rb * block, cb * block)[:out, :k].contiguous()
    return codes.reshape(rb * block, cb * block)[:out, :k].contiguous(), (e + 127).to(torch.uint8).view(
        torch.float8_e8m0fnu), value


def _release_name(n):
    glob = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
            "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
            "model.hc_head.hc_scale": "hc_head_scale"}
    return glob.get(n, n[len("model."):] if n.startswith("model.layers.") else n)


@pytest.fixture(scope="module")
def release(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("deepseek_v4")
    root = tmp_path_factory.mktemp("v4_release")
    rel, ref = root / "release", root / "reference"
    shutil.copytree(src, ref)
    rel.mkdir()
    sd = load_file(src / "model.safetensors")
    out, decoded = {}, {}
    for n, w in sd.items():
        r = _release_name(n)
        if ".ffn.experts." in n:
            packed, scale, decoded[n] = _mxfp4(w.float())
            out[r], out[r[: -len(".weight")] + ".scale"] = packed, scale
        elif n.endswith(".weight") and any(d in n for d in DENSE):
            codes, scale, decoded[n] = _fp8(w.float())
            out[r], out[r[: -len(".weight")] + ".scale"] = codes, scale
        else:
            out[r], decoded[n] = w, w
    out["mtp.0.ffn.experts.0.w1.weight"] = torch.zeros(3, 3)  # the release's extra layer: not read
    save_file(out, rel / "model.safetensors")
    save_file(decoded, ref / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(expert_dtype="fp4", quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                        "weight_block_size": [16, 16]})
    (rel / "config.json").write_text(json.dumps(cfg))
    return rel, ref


def test_release_checkpoint_matches_transformers_on_its_decoded_weights(release):
    rel, ref = release
    engine = kt_core.Engine.from_pretrained(rel, overrides=["model.dtype=float32"])
    hf = hf_model(ref)
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
        theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    got = engine.logits(PROMPT)
    # the int8 experts multiply int16-quantized activations (tests/unit/test_arch_features.py's bound)
    err = float(((got - want).abs().amax(-1) / want.abs().max()).median())
    assert err <= BOUND["int8"], err
    assert engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids == theirs


def test_fp4_experts_are_kept_as_int8_groups_of_32(release):
    from kt_core.weights.quant import Quant, dequantize

    rel, ref = release
    ck = Checkpoint(rel)
    name = "model.layers.1.ffn.experts.3.w2.weight"
    assert ck.keeps(name) and "model.embed_tokens.weight" in ck and "mtp.0.ffn.experts.0.w1.weight" not in ck
    q = ck.quantized(name, (64, 96))  # hidden 64, expert width 96
    assert q.format is Quant.INT8 and q.group_size == 32 and int(q.qdata.abs().max()) <= 12
    assert torch.equal(dequantize(q, torch.float32), load_file(ref / "model.safetensors")[name])


def test_plan_sizes_the_fp4_experts_as_kept(release):
    """kt plan (no tensor read) counts the release's experts at int8 g32: a byte a weight and a float32
    scale per 32, not the 2 bytes of bf16."""
    from kt_core.commands.plan import model_spec, stored_tensors
    from kt_core.config import compose

    rel, _ = release
    cfg = compose([f"model.path={rel}"])
    sized = {t.name: t for t in stored_tensors(cfg, model_spec(cfg))}
    t = sized["model.layers.2.ffn.experts.5.w1.weight"]
    assert t.stored == t.numel + t.numel // 32 * 4
    assert sized["model.layers.2.attn.wq_a.weight"].stored is None  # read as floats
