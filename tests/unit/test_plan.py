"""The planner: parameter totals, placement strategies, the memory table against a loaded model,
fit errors, and kt plan's output."""
import json

import pytest

import kt_core
from kt_core.cli import main
from kt_core.config import compose
from kt_core.config.validate import resolve_topology
from kt_core.errors import KtError
from kt_core.models.shapes import model_tensors
from kt_core.models.spec import parse_config
from kt_core.placement.plan import PlanDoesNotFit, count_params, make_plan
from tests.parity.tiny import CONFIGS, build

# published totals (GLM-4.5's 355B and MiniMax-M2's 230B include multi-token-prediction layers kt-core does not load)
HAND_COUNTS = {"deepseek_v3": 671e9, "qwen3_235b_a22b": 235e9, "qwen3_30b_a3b": 30.5e9, "mixtral_8x7b": 46.7e9,
               "glm4_5": 355e9, "glm4_5_air": 106e9, "minimax_m2": 230e9,
               # Moonshot publishes "1T"; by hand from the config: 60 MoE layers x 384 experts x 3 x 7168 x 2048
               # (1014.7B) + shared experts 2.6B + attention 61 x 101M (6.2B) + embeddings and head 2.35B + the
               # dense layer 0.4B + routers 0.17B = 1026.4B
               "kimi_k2": 1026.4e9, "llama4_maverick": 400e9,
               # Meta's 109B counts the vision encoder (~0.8B), which kt-core does not load; by hand: 48 layers x 16
               # experts x 3 x 5120 x 8192 (96.64B) + shared experts 6.04B + attention 48 x 62.9M (3.02B) +
               # embeddings and head 2.07B = 107.77B
               "llama4_scout": 107.77e9, "qwen3_next_80b_a3b": 80e9, "qwen3_5_35b_a3b": 35e9,
               "deepseek_v32": 671e9, "glm5": 744e9, "deepseek_v4_flash": 284e9}


def plan_for(*overrides, check=False):
    from kt_core.commands.plan import model_spec

    cfg = compose(list(overrides))
    return make_plan(model_spec(cfg), cfg, resolve_topology(cfg, check_devices=check))


@pytest.mark.parametrize("model,expected", list(HAND_COUNTS.items()))
def test_shipped_configs_total_matches_the_published_count(model, expected):
    plan = plan_for(f"model={model}", "device.cpu.memory_gb=4096")
    assert abs(plan.total_params - expected) / expected < 0.01, plan.total_params


@pytest.mark.parametrize("name", ["llama", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                                  "mixtral", "qwen2_tied_mha", "glm4_moe", "minimax_m2", "llama4",
                                  "llama4_interleaved", "qwen3_next", "qwen3_5_moe", "deepseek_v32",
                                  "glm_moe_dsa", "deepseek_v4"])
def test_parameter_count_equals_transformers(name, tmp_path):
    import transformers

    cfg_cls, model_cls, extra = CONFIGS[name]
    from tests.parity.tiny import BASE

    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**BASE, **extra}))
    theirs = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "e_score_correction_bias" in n or "tid2eid" in n)
    spec = parse_config(json.loads(model.config.to_json_string()))
    assert count_params(spec) == theirs
    path = build(name, tmp_path / name)  # the names a saved checkpoint really has
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    names = {t.name for t in model_tensors(parse_config(json.loads((path / "config.json").read_text())))}
    assert names == saved - {"lm_head.weight"} if spec.tie_embeddings else names == saved


def test_hybrid_strategies_partition_the_experts():
    base = ["model=qwen3_30b_a3b", "topology=hybrid_1gpu", "device.cuda.memory_gb=12", "quant=int4",
            "device.cpu.memory_gb=64"]
    for strategy, extra in [("auto", []), ("uniform", ["topology.expert_policy.per_device=16"]),
                            ("front_loading", [])]:
        plan = plan_for(*base, f"topology.expert_policy.strategy={strategy}", *extra)
        gpu = plan.devices["cuda:0"]
        for layer in range(48):
            held = sorted(plan.experts_of("cuda:0", layer) + plan.experts_of("cpu:0", layer))
            assert held == list(range(128)), (strategy, layer)
        assert gpu.total_bytes <= gpu.budget_bytes
        if strategy == "uniform":
            assert all(len(plan.experts_of("cuda:0", layer)) == 16 for layer in range(48))
        if strategy == "front_loading":
            counts = [len(plan.experts_of("cuda:0", layer)) for layer in range(48)]
            assert counts[0] == 128 and counts == sorted(counts, reverse=True)
    assert plan.est_decode_tokens_per_s > 0 and plan.bound_by in ("cuda:0", "cpu:0")


def test_frequency_strategy_takes_the_hottest_experts(tmp_path):
    stats = {"layers": {str(layer): [0.0] * 128 for layer in range(48)}}
    stats["layers"]["5"][77] = 1000.0
    stats["layers"]["9"][3] = 900.0
    f = tmp_path / "stats.json"
    f.write_text(json.dumps(stats))
    plan = plan_for("model=qwen3_30b_a3b", "topology=hybrid_1gpu", "device.cuda.memory_gb=12", "quant=int4",
                    "device.cpu.memory_gb=64", "topology.expert_policy.strategy=frequency",
                    f"topology.expert_policy.stats_file={f}", "topology.expert_policy.per_device=1")
    gpu = {layer: ids for layer, ids in plan.devices["cuda:0"].experts.items() if ids}
    assert 77 in gpu[5] and 3 in gpu[9]
    f.write_text(json.dumps({"layers": {"0": [1, 2]}}))
    with pytest.raises(KtError, match="belongs to another model"):
        plan_for("model=qwen3_30b_a3b", "topology=hybrid_1gpu", "device.cuda.memory_gb=12",
                 "topology.expert_policy.strategy=frequency", f"topology.expert_policy.stats_file={f}")


def test_explicit_lists():
    plan = plan_for("model=mixtral_8x7b", "topology=hybrid_1gpu", "device.cuda.memory_gb=24", "quant=int4",
                    "device.cpu.memory_gb=128", "topology.expert_policy.strategy=explicit",
                    '+topology.expert_policy.layers={0:[1,5],31:[7]}')
    assert plan.experts_of("cuda:0", 0) == [1, 5] and plan.experts_of("cuda:0", 31) == [7]
    assert plan.experts_of("cuda:0", 3) == [] and len(plan.experts_of("cpu:0", 0)) == 6


def test_plan_that_cannot_fit_names_device_shortfall_and_fixes():
    with pytest.raises(PlanDoesNotFit) as err:
        plan_for("model=deepseek_v3", "topology=hybrid_1gpu", "device.cuda.memory_gb=24", "device.cpu.memory_gb=4096")
    msg = str(err.value)
    assert "cuda:0 needs" in msg and "GiB short" in msg and "quant.dense=int8" in msg and "\n" not in msg
    assert err.value.over == ["cuda:0"] and "cpu:0 needs" not in msg  # only devices over budget are named
    assert err.value.overrides == ["quant.dense=int8"]  # the least the planner found: the experts stay as they are
    with pytest.raises(KtError, match="give the budget of each cuda device with device.cuda.memory_gb"):
        plan_for("model=deepseek_v3", "topology=hybrid_1gpu")


@pytest.mark.parametrize("overrides,over", [
    # accelerator short of room for dense weights and the CPU short of RAM for the experts: both named
    (["model=deepseek_v3", "topology=hybrid_1gpu", "device.cuda.memory_gb=24", "device.cpu.memory_gb=64"],
     ["cuda:0", "cpu:0"]),
    # a fixed expert count per accelerator that does not fit
    (["model=qwen3_30b_a3b", "topology=hybrid_1gpu", "device.cuda.memory_gb=12", "device.cpu.memory_gb=64",
      "topology.expert_policy.strategy=uniform", "topology.expert_policy.per_device=128"], ["cuda:0"]),
    # the whole model on one GPU, too small even with every software fix: a bigger budget is named
    (["model=qwen3_235b_a22b", "topology=single_gpu", "device.cuda.memory_gb=24", "device.cpu.memory_gb=64"],
     ["cuda:0"]),
    # two logical CPU devices, both short
    (["model=mixtral_8x7b", "topology=hybrid_cpu", "device.cpu.memory_gb=16"], ["cpu:0", "cpu:1"]),
])
def test_a_plan_that_does_not_fit_names_every_device_and_overrides_that_fit_them_all(overrides, over):
    with pytest.raises(PlanDoesNotFit) as err:
        plan_for(*overrides)
    msg = str(err.value)
    assert err.value.over == over and "\n" not in msg
    for label in over:
        assert f"{label} needs" in msg
    fix = err.value.overrides
    assert fix and f"these overrides fit every device: {' '.join(fix)}" in msg
    plan = plan_for(*overrides, *fix)  # raises if any device is still over its budget
    assert all(d.total_bytes <= d.budget_bytes for d in plan.devices.values())


def test_kt_plan_help_examples_run_and_fit(capsys):
    from kt_core.commands.plan import USAGE

    examples = [line.split("#")[0].split()[2:] for line in USAGE.splitlines() if line.startswith("  kt plan ")]
    assert len(examples) >= 3
    for args in examples:
        rc = main(["plan", *args])
        out, err = capsys.readouterr()
        assert rc == 0, (args, err)
        if "plan.format=json" in args:
            data = json.loads(out)
            assert data["fits"] is True and data["error"] is None and data["fix_overrides"] is None
        else:
            assert "OVER BUDGET" not in out and "estimated decode" in out


def test_memory_table_matches_the_loaded_model(tmp_path):
    from kt_core.models.synthetic import synthesize

    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, vocab_size=152000)
    path = synthesize(tmp_path / "m", preset="tiny-qwen3-moe", layers=3, shape=shape, sample_tokens=32).path
    for quant, group in (("none", 32), ("int8", 32), ("int4", 32), ("int4", 0)):  # int4 0: one group a row
        overrides = [f"model.path={path}", f"quant={quant}", f"quant.group_size={group}"]
        plan = plan_for(*overrides, check=True)
        engine = kt_core.Engine.from_pretrained(path, overrides=overrides)
        actual = engine.model.weight_bytes()
        planned = plan.devices["cpu:0"].weights_bytes
        assert abs(planned - actual) / actual < 0.05, (quant, group, planned, actual)


def test_kt_plan_cli_table_and_json(capsys):
    rc = main(["plan", "model=qwen3_30b_a3b", "topology=hybrid_1gpu", "device.cuda.memory_gb=24",
               "device.cpu.memory_gb=64", "plan.format=json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["total_params"] > 30e9 and data["est_decode_tokens_per_s"] > 0
    for d in data["devices"].values():
        assert {"weights_bytes", "kv_bytes", "total_bytes", "budget_bytes"} <= set(d)
    assert data["fits"] is True and data["error"] is None
    assert all(d["fits"] for d in data["devices"].values())
    rc = main(["plan", "model=deepseek_v3", "topology=hybrid_1gpu", "device.cuda.memory_gb=24"])
    out, err = capsys.readouterr()
    assert rc == 2 and "OVER BUDGET" in out and "671.03B parameters" in out and "does not fit" in err
    rc = main(["plan", "model=deepseek_v3", "topology=hybrid_1gpu", "device.cuda.memory_gb=24",
               "device.cpu.memory_gb=64", "plan.format=json"])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert rc == 2 and data["fits"] is False and "does not fit" in err
    assert "cuda:0 needs" in data["error"] and "cpu:0 needs" in data["error"] and data["fix_overrides"]
    assert not data["devices"]["cuda:0"]["fits"] and not data["devices"]["cpu:0"]["fits"]


def test_engine_refuses_a_plan_that_does_not_fit_before_reading_weights(tmp_path, tiny_checkpoint):
    with pytest.raises(KtError, match="cpu:0 needs .* GiB short"):
        kt_core.Engine.from_pretrained(tiny_checkpoint("qwen3_moe"),
                                       overrides=["device.cpu.memory_gb=4.001", "device.cpu.reserve_gb=4"])
    with pytest.raises(KtError, match="is a config for kt plan only"):
        kt_core.Engine.from_pretrained(None, overrides=["model=mixtral_8x7b"])


@pytest.mark.parametrize("dense,head", [("int8", None), ("int4", "int8"), ("int8", "none"), ("none", "int4")])
def test_quant_head_is_its_own_choice_and_the_plan_counts_it(tmp_path, dense, head):
    from kt_backends.cpu import native_linear
    from kt_core.models.synthetic import synthesize
    from kt_core.weights.quant import QuantizedWeight

    shape = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, vocab_size=130000,
                 tie_word_embeddings=False)
    path = synthesize(tmp_path / "m", preset="tiny-qwen3-moe", layers=2, shape=shape, sample_tokens=16,
                      tokenizer="deepseek").path
    overrides = [f"model.path={path}", "quant=int8", f"quant.dense={dense}", "quant.group_size=32"]
    overrides += [] if head is None else [f"quant.head={head}"]
    engine = kt_core.Engine.from_pretrained(path, overrides=overrides)

    def fmt(w):
        return getattr(w, "fmt", None) or (w.format.value if isinstance(w, (QuantizedWeight,)) else "none")

    assert fmt(engine.model.lm_head) == (dense if head is None else head)
    assert fmt(engine.model.layers[0].attn.w["qkv"]) == dense  # q / k / v fused at load
    assert fmt(engine.model.embed) == "none"  # a lookup table: never quantized
    if fmt(engine.model.lm_head) != "none":
        assert isinstance(engine.model.lm_head, native_linear.PackedLinear)
    planned = plan_for(*overrides, check=True).devices["cpu:0"].weights_bytes
    actual = engine.model.weight_bytes()
    assert abs(planned - actual) / actual < 0.05, (planned, actual)
    assert engine.generate([5, 6, 7], max_new_tokens=2, ignore_eos=True).token_ids
