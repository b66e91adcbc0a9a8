"""DeepSeek-V4 beyond one-shot parity (tests/parity/test_models.py): compressor windows that straddle
prefill chunks and decode steps, sequences joining a running batch, and clear refusals of what the
kernels do not implement."""
import json

import pytest
import torch

import kt_core
from kt_core.errors import KtError
from kt_core.models.spec import parse_config
from tests.parity.tiny import hf_model
from tests.unit.test_scheduler import _run

OV = ["model.dtype=float32", "model.max_seq_len=128"]


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 95, (n,), generator=g).tolist() for n in (37, 6, 23)]


def test_chunked_prefill_and_joining_requests_match_transformers(tiny_checkpoint):
    """Chunks of 3 tokens cut every 4-token (csa) and 8-token (hca) window, requests join a running
    batch; each sequence's greedy tokens are transformers' own."""
    path = tiny_checkpoint("deepseek_v4")
    hf = hf_model(path)
    want = []
    for p in _prompts():
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
    engine = kt_core.Engine.from_pretrained(path, overrides=OV)
    got, _ = _run(engine, _prompts(), chunk=3, max_batch=2)
    assert got == want
    assert engine.cache.used_blocks == 0


def test_compressed_entries_sit_at_each_windows_last_token(tiny_checkpoint):
    """The hca layer's entry for window w is written at position 8w + 7 and nowhere else."""
    engine = kt_core.Engine.from_pretrained(tiny_checkpoint("deepseek_v4"), overrides=OV)
    attn = engine.model.layers[2].attn
    assert attn.kind == "hca" and attn.rate == 8
    engine.generate(_prompts()[0][:20], max_new_tokens=1, ignore_eos=True)  # 21 positions: windows 0 and 1
    extra = engine.cache.idx[2]
    rows = extra.view(-1, extra.shape[-1])[:, attn.compressor.entry: attn.compressor.entry + attn.compressor.dim]
    written = rows.abs().sum(-1).nonzero().flatten().tolist()
    assert len(written) == 2 and [s % engine.cache.block_size for s in written] == [7, 15]




def test_unsupported_settings_are_refused_by_name(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint("deepseek_v4") / "config.json").read_text())
    with pytest.raises(KtError, match="swiglu_limit=7.0.*clamp at DeepSeek-V4's 10"):
        parse_config({**cfg, "swiglu_limit": 7.0})
    with pytest.raises(KtError, match="layer_types must name one of"):
        parse_config({**cfg, "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                                             "sliding_attention"]})
    with pytest.raises(KtError, match="scoring_func sqrtsoftplus"):
        parse_config({**cfg, "scoring_func": "softmax"})
    with pytest.raises(KtError, match="o_groups=3 must divide"):
        parse_config({**cfg, "o_groups": 3})
    legacy = {k: v for k, v in cfg.items() if k not in ("layer_types", "compress_rates")}
    spec = parse_config({**legacy, "compress_ratios": [0, 4, 128, 4]})  # the release's spelling
    assert spec.v4.kinds == ["sliding", "csa", "hca", "csa"] and spec.v4.rates == {"csa": 4, "hca": 128}


def test_expert_deferral_is_refused(tiny_checkpoint):
    with pytest.raises(KtError, match="expert deferral does not apply.*deferred_experts=0"):
        kt_core.Engine.from_pretrained(tiny_checkpoint("deepseek_v4"), overrides=[*OV, "topology.deferred_experts=1"])


def test_quantized_dense_weights_and_the_plan_agree(tiny_checkpoint):
    """quant.dense reaches every projection (the grouped output's groups too) and kt plan sizes what
    the load holds."""
    from kt_backends.cpu import native_linear
    from tests.unit.test_plan import plan_for

    path = tiny_checkpoint("deepseek_v4")
    ov = [f"model.path={path}", "model.dtype=float32", "quant=int4", "quant.dense=int8", "quant.group_size=32"]
    engine = kt_core.Engine.from_pretrained(path, overrides=ov[1:])
    for layer in engine.model.layers:
        w = layer.attn.w
        assert all(isinstance(w[k], native_linear.PackedLinear) for k in ("wq_a", "wq_b", "wkv", "wo_b"))
        assert all(isinstance(g, native_linear.PackedLinear) for g in w["wo_a"])
    planned = plan_for(*ov).devices["cpu:0"].weights_bytes
    actual = engine.model.weight_bytes()
    assert abs(planned - actual) / actual < 0.05, (planned, actual)
