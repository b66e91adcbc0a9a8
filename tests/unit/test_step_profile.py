"""The per-part step profiler: it sees every part, adds up to the step, and leaves no trace."""
import pytest

import kt_core
from kt_core.models.synthetic import synthesize
from kt_core.runtime.step_profile import PARTS, StepProfiler, weight_bytes_per_token

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=256)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "m"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=16, tokenizer="deepseek")
    return kt_core.Engine.from_pretrained(path, overrides=["model.dtype=float32"])


def test_profile_covers_the_parts_and_restores_the_model(engine):
    ids = list(range(10, 40))
    before = engine.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    prof = StepProfiler(engine)
    with prof.active():
        during = engine.generate(ids, max_new_tokens=6, ignore_eos=True).token_ids
    assert during == before  # profiling changes timing, never results
    assert "forward" not in vars(engine.model)  # every wrapper is gone
    assert all(not callable(vars(layer.be).get("linear")) for layer in engine.model.layers)
    assert prof.steps == {"prefill": 1, "decode": 5}
    for phase in ("prefill", "decode"):
        rows = {r["part"]: r for r in prof.report(phase, bandwidth_gbps=10.0)}
        assert set(PARTS) <= set(rows)
        for part in ("attn_proj", "attention", "moe", "router", "lm_head", "norm_rope"):
            assert rows[part]["ms_per_step"] > 0, (phase, part)
        assert sum(rows[p]["ms_per_step"] for p in PARTS) == pytest.approx(rows["step"]["ms_per_step"], rel=1e-2)
    dec = {r["part"]: r for r in prof.report("decode", bandwidth_gbps=10.0)}
    assert sum(dec[p]["roofline_share"] for p in PARTS) == pytest.approx(1.0, abs=1e-2)


def test_weight_bytes_count_top_k_experts_per_token(engine):
    b = weight_bytes_per_token(engine.model)
    layer = engine.model.layers[0]
    qkv = layer.attn.w["qkv"]  # q / k / v fused at load
    assert b["attn_proj"] >= 2 * qkv.numel() * qkv.element_size()
    assert b["lm_head"] == engine.model.lm_head.numel() * engine.model.lm_head.element_size()
    per_expert = 3 * 32 * 64 * 4  # gate, up, down of one tiny expert in float32
    assert b["moe"] == 2 * 2 * per_expert  # 2 layers x top-2


def test_fused_decode_layers_are_one_part_with_their_bytes(tmp_path):
    from kt_backends.cpu import native_layer

    if not native_layer.enabled():
        pytest.skip("the native decode layers are not built (or KT_FUSED_DECODE=0)")
    synthesize(tmp_path / "m", preset="tiny-qwen3-moe", layers=2, shape=SHAPE, sample_tokens=16, tokenizer="deepseek")
    engine = kt_core.Engine.from_pretrained(tmp_path / "m", overrides=["model.dtype=bfloat16"])
    prof = StepProfiler(engine)
    with prof.active():
        engine.generate(list(range(10, 40)), max_new_tokens=6, ignore_eos=True)
    dec = {r["part"]: r for r in prof.report("decode", bandwidth_gbps=10.0)}
    assert dec["layers"]["ms_per_step"] > 0 and dec["moe"]["ms_per_step"] == 0  # the layers ran in one call
    inside = weight_bytes_per_token(engine.model)
    assert dec["layers"]["weight_mb_per_token"] == pytest.approx(
        sum(inside.get(p, 0) for p in ("attn_proj", "router", "moe", "dense_mlp")) / 1e6, abs=0.01)
    assert sum(dec[p]["ms_per_step"] for p in PARTS) == pytest.approx(dec["step"]["ms_per_step"], rel=1e-2)
    assert "decode_plan" not in vars(engine.model.layers[0].be)  # the wrapper is gone
