"""kt config: compose the configuration, check it against this machine, print it as YAML."""
from __future__ import annotations

HELP = "print the composed configuration as YAML (validated against this machine)"
USAGE = """kt config [overrides] [--no-device-check]

  kt config topology=hybrid_1gpu device.cuda.memory_gb=24
  kt config topology=hybrid_1gpu device=rocm
  kt config quant=int4 quant.group_size=64

Checks every value before printing: model.path exists, generate.* sampling values, sizes,
the topology's devices (and, unless --no-device-check, that they are here).

--no-device-check  describe a machine whose devices are not here (skips probes and budgets)"""
FLAGS = ("--no-device-check",)


def run(overrides, flags) -> int:
    from kt_core.config import compose, to_yaml
    from kt_core.config.validate import check_generate, resolve_topology

    cfg = compose(overrides)
    topo = resolve_topology(cfg, check_devices="--no-device-check" not in flags)  # model.path, sizes, devices
    check_generate(cfg)
    print(to_yaml(cfg), end="")
    print("# resolved devices per role:")
    for role, slots in topo.roles.items():
        print(f"#   {role}: {', '.join(s.label for s in slots)}")
    return 0
