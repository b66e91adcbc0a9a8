"""kt devices: one row per registered device plugin."""
from __future__ import annotations

import json

HELP = "list device plugins: available or why not, devices, memory, CPU ISA"
USAGE = """kt devices [--json]

Every plugin registered under the kt_core.backends entry point gets a row, also
those that failed to import (with the error). --json prints one object."""
FLAGS = ("--json",)
GIB = 1 << 30


def collect() -> dict:
    from kt_core.backend.cpuinfo import cpu_info
    from kt_core.backend.registry import registry

    rows = []
    for name, st in registry().plugins().items():
        row = {"backend": name, "available": st.available, "reason": st.reason, "source": st.source,
               "score": st.score, "devices": [], "shadowed": st.shadowed}
        if st.available:
            if st.inventory is not None:  # the plugin's torch-free answer
                found = st.inventory()
            else:
                backend = registry().get(name)
                found = [(d, backend.memory_info(d.index)) for d in backend.devices()]
            for d, mem in found:
                row["devices"].append({"index": d.index, "name": d.name, "free_bytes": mem.free_bytes,
                                       "total_bytes": mem.total_bytes})
        rows.append(row)
    info = cpu_info()
    cpu = {"model": info.model, "arch": info.arch, "physical_cores": info.physical_cores,
           "logical_cores": info.logical_cores, "isa": info.isa_summary(), "variant": info.variant,
           "flags": {label: flag in info.flags for flag, label in _shown_flags().items()},
           "flags_source": info.source}
    return {"plugins": rows, "cpu": cpu}


def _shown_flags() -> dict:
    return {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
            "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}


def _memory(row: dict) -> str:
    if not row["devices"]:
        return "-"
    return ", ".join(f"{d['free_bytes'] / GIB:.1f}/{d['total_bytes'] / GIB:.1f} GiB" for d in row["devices"])


def run(overrides, flags) -> int:
    from kt_core.errors import KtError

    if overrides:
        raise KtError(f"kt devices takes no overrides (got {' '.join(overrides)})")
    data = collect()
    if "--json" in flags:
        print(json.dumps(data, indent=2))
        return 0
    table = [("backend", "status", "devices", "memory free/total", "details")]
    for r in data["plugins"]:
        names = ", ".join(d["name"] for d in r["devices"]) if r["devices"] else "-"
        table.append((r["backend"], "available" if r["available"] else "unavailable",
                      f"{len(r['devices'])}: {names}" if r["devices"] else "-", _memory(r), r["reason"]))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    cpu = data["cpu"]
    marks = "  ".join(f"{label} {'yes' if ok else 'no'}" for label, ok in cpu["flags"].items())
    print(f"\nCPU ISA: {marks}  (variant {cpu['variant']}; flags from {cpu['flags_source']})")
    return 0
