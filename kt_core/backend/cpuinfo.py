"""What the host CPU can do: ISA flags that pick a CPU kernel variant, cores, memory.

Linux reads ``/proc/cpuinfo``; elsewhere torch's own CPU-capability probe gives a
coarser answer (AVX2 vs AVX-512), and the result says which source it came from.
Nothing here needs a compiler or an extension.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags we report, in the names Linux uses, with our display names.
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx_vnni": "AVX-VNNI",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}

# Variant ladder used for scoring: first fully-present entry wins.
VARIANTS = (
    ("amx", ("amx_tile", "amx_int8", "amx_bf16")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512", ("avx512f", "avx512bw")),
    ("avx2", ("avx2", "fma")),
)
VARIANT_SCORE = {"amx": 50, "avx512_bf16": 40, "avx512_vnni": 30, "avx512": 20, "avx2": 10, "generic": 1}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    logical_cores: int
    physical_cores: int
    flags: frozenset[str]
    source: str  # where the flags came from

    @property
    def variant(self) -> str:
        for name, needed in VARIANTS:
            if all(f in self.flags for f in needed):
                return name
        return "generic"

    def isa_summary(self) -> str:
        shown = [label for flag, label in ISA_FLAGS.items() if flag in self.flags]
        return " ".join(shown) if shown else "none of AVX2/AVX-512/AMX"


def parse_proc_cpuinfo(text: str) -> tuple[str, frozenset[str], int]:
    """(model name, flags, physical cores) from the text of /proc/cpuinfo."""
    model, flags, cores = "", frozenset(), set()
    phys = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        elif key == "physical id":
            phys = value
        elif key == "core id":
            core = value
        elif not line.strip() and core is not None:
            cores.add((phys, core))
            phys = core = None
    if core is not None:
        cores.add((phys, core))
    return model, flags, len(cores)


def _torch_flags() -> frozenset[str]:
    import torch

    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return frozenset({"avx2", "fma", "avx512f", "avx512bw"})
    if cap.startswith("AVX2"):
        return frozenset({"avx2", "fma"})
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except Exception:  # psutil missing on an odd platform: count logical cores
        physical = logical
    proc = Path("/proc/cpuinfo")
    if proc.is_file():
        model, flags, n = parse_proc_cpuinfo(proc.read_text(errors="replace"))
        return CpuInfo(model or platform.processor(), platform.machine(), logical,
                       n or physical, flags, "/proc/cpuinfo")
    return CpuInfo(platform.processor() or platform.machine(), platform.machine(), logical, physical,
                   _torch_flags(), "torch cpu capability (coarse: VNNI/BF16/AMX not detected)")
