import json

import pytest

from kt_core.cli import main
from kt_core.models.synthetic import synthesize

SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("prof") / "m", preset="tiny-qwen3-moe", layers=2, shape=SHAPE,
                      sample_tokens=48).path


def test_profile_counts_every_route_and_feeds_the_planner(model, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The quick brown fox\n\ndef f(x): return x\nnumbers 1 2 3 4 5\n")
    out = tmp_path / "stats.json"
    rc = main(["profile", f"model.path={model}", f"profile.prompts={prompts}", f"profile.out={out}",
               "profile.max_new_tokens=3", "model.dtype=float32"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["num_experts"] == 16 and data["top_k"] == 4 and set(data["layers"]) == {"0", "1"}
    for counts in data["layers"].values():
        assert sum(counts) == data["tokens"] * 4
    rc = main(["plan", f"model.path={model}", "topology=hybrid_1gpu", "device.cuda.memory_gb=8",
               "topology.expert_policy.strategy=frequency", f"topology.expert_policy.stats_file={out}",
               "topology.expert_policy.per_device=2", "plan.format=json"])
    assert rc == 0
    from kt_core.commands.plan import model_spec
    from kt_core.config import compose
    from kt_core.config.validate import resolve_topology
    from kt_core.placement.plan import make_plan

    cfg = compose([f"model.path={model}", "topology=hybrid_1gpu", "device.cuda.memory_gb=8",
                   "topology.expert_policy.strategy=frequency", f"topology.expert_policy.stats_file={out}",
                   "topology.expert_policy.per_device=2"])
    p = make_plan(model_spec(cfg), cfg, resolve_topology(cfg, check_devices=False))
    hottest = {int(k): sorted(range(16), key=lambda e: -v[e]) for k, v in data["layers"].items()}
    on_gpu = [(layer, e) for layer in (0, 1) for e in p.experts_of("cuda:0", layer)]
    assert len(on_gpu) == 4 and all(e in hottest[layer][:4] for layer, e in on_gpu)


def test_profile_errors(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["profile", f"model.path={model}", f"profile.prompts={bad}"]) == 2
    assert main(["profile", f"model.path={model}", f"profile.prompts={tmp_path / 'none.txt'}"]) == 2
