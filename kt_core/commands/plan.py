"""kt plan: the placement plan and memory table for the machine the config describes."""
from __future__ import annotations

import json

HELP = "plan placement + memory per device for the described machine (no weights, no devices needed)"
USAGE = """kt plan [model=NAME | model.path=DIR] [topology=...] [device.<name>.memory_gb=N] [plan.format=json]

  kt plan model=deepseek_v3 topology=hybrid_1gpu device.cuda.memory_gb=24
  kt plan model=qwen3_30b_a3b topology=hybrid_1gpu device.cuda.memory_gb=12 quant=int4
  kt plan model.path=/models/Mixtral-8x7B topology=cpu_only plan.format=json

Shipped model configs (config.json copies): deepseek_v3, qwen3_235b_a22b, qwen3_30b_a3b, mixtral_8x7b.
A plan that cannot fit fails naming the device, the shortfall and overrides that would fit."""


def model_spec(cfg):
    from omegaconf import OmegaConf

    from kt_core.models.spec import parse_config
    from kt_core.weights.checkpoint import read_json

    if cfg.model.hf_config is not None:
        return parse_config(OmegaConf.to_container(cfg.model.hf_config, resolve=True))
    if cfg.model.path is not None:
        from pathlib import Path

        return parse_config(read_json(Path(cfg.model.path).expanduser() / "config.json", "config.json"))
    from kt_core.models.synthetic import DEFAULT_PRESET, build_config

    return parse_config(build_config(None, DEFAULT_PRESET, None))


def run(overrides, flags) -> int:
    from kt_core.config import compose
    from kt_core.config.validate import resolve_topology
    from kt_core.placement.plan import describe, make_plan

    from kt_core.placement.plan import fit_error

    cfg = compose(overrides)
    topo = resolve_topology(cfg, check_devices=False)
    plan = make_plan(model_spec(cfg), cfg, topo, enforce_fit=False)
    from kt_core.config.schema import choice

    fmt = choice(cfg.plan.format)
    print(json.dumps(plan.as_json(), indent=2) if fmt == "json" else describe(plan))
    problem = fit_error(plan, cfg)
    if problem:  # the table is printed either way; a plan that cannot fit is an error
        raise problem
    return 0
