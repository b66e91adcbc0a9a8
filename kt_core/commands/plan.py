"""kt plan: the placement plan and memory table for the machine the config describes."""
from __future__ import annotations

import json

HELP = "plan placement + memory per device for the described machine (no weights, no devices needed)"
USAGE = """kt plan [model=NAME | model.path=DIR] [topology=...] [device.<name>.memory_gb=N] [plan.format=json]

  kt plan model=qwen3_30b_a3b topology=hybrid_1gpu device.cuda.memory_gb=12 device.cpu.memory_gb=64 quant=int4
  kt plan model=deepseek_v3 topology=hybrid_1gpu device.cuda.memory_gb=24 device.cpu.memory_gb=512 quant=int4 quant.dense=int8
  kt plan model=mixtral_8x7b topology=cpu_only device.cpu.memory_gb=128 plan.format=json

Shipped model configs (config.json copies): deepseek_v3, qwen3_235b_a22b, qwen3_30b_a3b, mixtral_8x7b.
Without device.<name>.memory_gb a device present here is planned with its memory (the CPU: all its RAM).
A plan that cannot fit exits 2 naming every device over its budget and one set of overrides that fits
them all (checked by planning again); plan.format=json then carries "fits": false and the "error"."""


def model_spec(cfg):
    from omegaconf import OmegaConf

    from kt_core.models.spec import parse_config
    from kt_core.jsonfile import read_json

    if cfg.model.hf_config is not None:
        return parse_config(OmegaConf.to_container(cfg.model.hf_config, resolve=True))
    if cfg.model.path is not None:
        from pathlib import Path

        from kt_core.weights.paths import is_gguf

        if is_gguf(cfg.model.path):  # the header only: metadata and tensor shapes, no tensor read
            from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

            return parse_config(GGUFCheckpoint(cfg.model.path).config)
        return parse_config(read_json(Path(cfg.model.path).expanduser() / "config.json", "config.json"))
    from kt_core.models.synthetic import DEFAULT_PRESET, build_config

    return parse_config(build_config(None, DEFAULT_PRESET, None))


def stored_tensors(cfg, spec):
    """For a GGUF model.path, or a folder of pack-quantized int4 weights: the planner's tensors with the
    sizes of what its files keep quantized (None: sizes follow the quant config)."""
    from kt_core.weights.paths import is_gguf

    if cfg.model.path is None:
        return None
    from kt_core.models.shapes import model_tensors
    from kt_core.weights.keep import kept_groups

    if is_gguf(cfg.model.path):
        from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(cfg.model.path).plan_tensors(model_tensors(spec), kept_groups(cfg.quant))
    from pathlib import Path

    from kt_core.jsonfile import read_json
    from kt_core.weights import packed_int4

    folder = Path(cfg.model.path).expanduser()
    config = read_json(folder / "config.json", "config.json")
    from kt_core.weights import deepseek_release

    if deepseek_release.fp4_experts(config):  # DeepSeek-V4's release: FP4 experts kept as int8 g32
        return deepseek_release.plan_tensors(model_tensors(spec), None, kept_groups(cfg.quant))
    pack = packed_int4.scheme(config)
    if pack is None:
        return None
    return packed_int4.plan_tensors(model_tensors(spec), packed_int4.packed_names(folder), pack.group_size,
                                    kept_groups(cfg.quant))


def run(overrides, flags) -> int:
    from kt_core.config import compose
    from kt_core.config.schema import choice
    from kt_core.config.validate import resolve_topology
    from kt_core.placement.plan import describe, fit_error, make_plan

    cfg = compose(overrides)
    topo = resolve_topology(cfg, check_devices=False)
    spec = model_spec(cfg)
    plan = make_plan(spec, cfg, topo, enforce_fit=False, tensors=stored_tensors(cfg, spec))
    problem = fit_error(plan, cfg)
    if choice(cfg.plan.format) == "json":
        data = {**plan.as_json(), "fits": problem is None, "error": str(problem) if problem else None,
                "fix_overrides": problem.overrides if problem else None}
        print(json.dumps(data, indent=2))
    else:
        print(describe(plan))
    if problem:  # the table is printed either way; a plan that cannot fit is an error
        raise problem
    return 0
