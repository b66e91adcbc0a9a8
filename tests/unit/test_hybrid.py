"""The hybrid executor on two real logical CPU devices (separate worker pools): every placement
gives the single-device result, and the plan's per-device memory matches what is loaded."""
import json

import pytest

import kt_core
from kt_backends.cpu import native
from kt_core.errors import KtError
from kt_core.models.synthetic import synthesize

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64)
PROMPT = list(range(200, 230))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("hyb") / "m", preset="tiny-qwen3-moe", layers=3, shape=SHAPE,
                      sample_tokens=48).path


# fp32 activations and int8 experts: both placements run the native kernels and differ only in
# the order partial sums are added (which can move an int16 activation code by one step, 3e-5)
EXACT = ["model.dtype=float32", "quant=int8"]


@pytest.fixture(scope="module")
def reference(model):
    engine = kt_core.Engine.from_pretrained(model, overrides=EXACT)
    return engine.logits(PROMPT), engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids


def hybrid(model, *overrides):
    return kt_core.Engine.from_pretrained(model, overrides=["topology=hybrid_cpu", "device.cpu.threads=2", *EXACT,
                                                            *overrides])


def close(a, b):
    return float((a - b).abs().max() / b.abs().max()) < 1e-4


@pytest.mark.parametrize("policy", [
    ["topology.expert_policy.fraction=0.5"],
    ["topology.expert_policy.fraction=0.0"],  # all experts on cpu:1
    ["topology.expert_policy.fraction=1.0"],  # all experts on cpu:0
    ["topology.expert_policy.strategy=front_loading", "topology.expert_policy.fraction=0.6"],
    ["topology.expert_policy.strategy=explicit", "+topology.expert_policy.layers={0:[1,2,3],2:[15]}"],
], ids=["half", "all-cold", "all-hot", "front", "explicit"])
def test_every_placement_matches_single_device(model, reference, policy):
    logits, tokens = reference
    engine = hybrid(model, *policy)
    devices = {str(s[1]) for layer in engine.model.layers for s in getattr(layer.ffn, "shards", [])}
    assert devices == {"cpu"}
    pools = {s[2].pool for layer in engine.model.layers for s in layer.ffn.shards if hasattr(s[2], "pool")}
    if native.available() and policy == ["topology.expert_policy.fraction=0.5"]:
        assert pools == {0, 1}, "the two logical devices must run on their own pools"
    assert close(engine.logits(PROMPT), logits)
    assert engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids == tokens


def test_frequency_placement_from_profile(model, reference, tmp_path):
    from kt_core.runtime.profiling import record_routing

    engine = kt_core.Engine.from_pretrained(model, overrides=EXACT)
    with record_routing(engine) as stats:
        engine.logits(PROMPT)
    f = tmp_path / "s.json"
    stats.write(f, engine.spec.arch, 4)
    hot = hybrid(model, "topology.expert_policy.strategy=frequency", f"topology.expert_policy.stats_file={f}",
                 "topology.expert_policy.per_device=4")
    assert close(hot.logits(PROMPT), reference[0])
    counts = json.loads(f.read_text())["layers"]
    for layer in range(3):
        on_hot = hot.model.plan.experts_of("cpu:0", layer)
        assert set(on_hot) <= set(sorted(range(16), key=lambda e: -counts[str(layer)][e])[:8])


def test_plan_memory_per_device_matches_loaded(model):
    engine = kt_core.Engine.from_pretrained(model, overrides=["topology=hybrid_cpu", "quant=int4",
                                                              "quant.group_size=32"])
    plan = engine.model.plan
    loaded = {0: 0, 1: 0}
    for layer in engine.model.layers:
        for _, _, experts in layer.ffn.shards:
            loaded[getattr(experts, "pool", 0)] += experts.nbytes()
    # cpu:1 holds experts only, so its planned weights are exactly its expert bytes
    planned = plan.devices["cpu:1"].weights_bytes
    assert loaded[1] and abs(planned - loaded[1]) / loaded[1] < 0.05, (planned, loaded)


def test_layers_split_over_two_devices(model, reference):
    """hybrid_multi_gpu's layout on logical CPU devices: layers split, hidden states move once."""
    engine = hybrid(model, "topology.attention=[cpu]", "topology.dense=[cpu]", "topology.experts=[cpu]")
    plan = engine.model.plan
    assert set(plan.layer_attention.values()) == {"cpu:0", "cpu:1"}
    assert close(engine.logits(PROMPT), reference[0])
    assert engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids == reference[1]


def test_unsupported_layouts_fail_clearly(model):
    with pytest.raises(KtError, match="keeps them together"):
        kt_core.Engine.from_pretrained(model, overrides=["topology=hybrid_cpu", "topology.dense=[cpu:1]"])
    with pytest.raises(KtError, match="device.cpu.count=2 logical CPU devices need at least 2 threads"):
        kt_core.Engine.from_pretrained(model, overrides=["topology=hybrid_cpu", "device.cpu.threads=1"])


def test_expert_deferral_changes_logits_measurably_and_only_when_on(model, reference):
    logits, tokens = reference
    off = hybrid(model, "topology.deferred_experts=0")
    assert close(off.logits(PROMPT), logits)
    on = hybrid(model, "topology.deferred_experts=1")
    deferred = on.logits(PROMPT)
    rel = float((deferred - logits).abs().max() / logits.abs().max())
    agree = float((deferred.argmax(-1) == logits.argmax(-1)).float().mean())
    print(f"expert deferral d=1 of top-4: max relative logit change {rel:.3f}, argmax agreement {agree:.2f}")
    assert 1e-4 < rel < 0.5, "deferral must change the result, by a bounded amount"
    assert on.generate(PROMPT, max_new_tokens=4, ignore_eos=True).finish_reason == "length"
    with pytest.raises(KtError, match="must be below the model's top-k"):
        hybrid(model, "topology.deferred_experts=4")
