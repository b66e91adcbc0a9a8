"""kt quantize: experts quantized once, saved with a checked header, reloaded; stale files refused."""
import json

import pytest
import torch

import kt_core
from kt_core.cli import main
from kt_core.errors import KtError
from kt_core.models.synthetic import synthesize

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, max_position_embeddings=256)
IDS = [5, 9, 30, 2, 77, 41, 8]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=32)
    return path


def load(path, *ov):
    return kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32", *ov])


def test_quantize_once_then_reload_gives_the_same_model(model):
    fresh = load(model, "quant=int4", "quant.group_size=32").logits(IDS)
    assert main(["quantize", f"model.path={model}", "quant=int4", "quant.group_size=32"]) == 0
    saved = model / "kt-experts-int4-g32-sym.ktq"
    assert saved.is_file() and not list(model.glob("*.tmp")) and not list(model.glob("*.part"))
    engine = load(model, "quant=int4", "quant.group_size=32")
    assert engine.model.prequant is not None and engine.model.prequant.path == saved
    assert torch.equal(engine.logits(IDS), fresh)
    # another group size does not pick this file up
    assert load(model, "quant=int4", "quant.group_size=64").model.prequant is None


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "fp8"])
def test_every_quantized_format_round_trips(model, tmp_path, fmt):
    out = tmp_path / f"{fmt}.ktq"
    g = "quant.group_size=32"
    assert main(["quantize", f"model.path={model}", f"quant={fmt}", g, f"out={out}"]) == 0
    want = load(model, f"quant={fmt}", g).logits(IDS)
    got = load(model, f"quant={fmt}", g, f"quant.prepacked={out}")
    assert got.model.prequant is not None and torch.equal(got.logits(IDS), want)


def test_stale_or_mismatched_files_are_refused(model, tmp_path):
    out = tmp_path / "e.ktq"
    assert main(["quantize", f"model.path={model}", "quant=int4", "quant.group_size=32", f"out={out}"]) == 0
    with pytest.raises(KtError, match="holds int4-g32-sym experts, the config asks for int4-g64-sym"):
        load(model, "quant=int4", "quant.group_size=64", f"quant.prepacked={out}")
    with pytest.raises(KtError, match="does not exist"):
        load(model, "quant=int4", f"quant.prepacked={tmp_path / 'nope.ktq'}")
    cut = tmp_path / "cut.ktq"
    cut.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(KtError, match="truncated"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={cut}")
    junk = tmp_path / "junk.ktq"
    junk.write_bytes(b"not a model")
    with pytest.raises(KtError, match="not a kt-core quantized experts file"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={junk}")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5  # the checkpoint changed after quantizing
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="stale: it was made from a different checkpoint"):
        load(model, "quant=int4", "quant.group_size=32", f"quant.prepacked={out}")


def test_quantize_needs_a_quantized_format_and_a_fitting_group(model, capsys):
    assert main(["quantize", f"model.path={model}"]) == 2
    assert "needs a quantized expert format" in capsys.readouterr().err
    assert main(["quantize", f"model.path={model}", "quant=fp8", "quant.group_size=128"]) == 2
    assert "quant.group_size=128 must divide the input dim 64" in capsys.readouterr().err
    assert not list(model.glob("*.ktq*")), "a failed run leaves no file behind"
