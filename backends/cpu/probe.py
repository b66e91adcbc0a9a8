"""The host CPU's probe, score and inventory, torch-free (CPU flags, the native library through
ctypes, RAM through psutil). The plugin class answers with these same functions."""
from __future__ import annotations

import psutil

from kt_backends.cpu import native_lib
from kt_core.backend.cpuinfo import VARIANT_SCORE, cpu_info
from kt_core.backend.types import DeviceInfo, MemoryInfo, ProbeResult


def probe() -> ProbeResult:
    info = cpu_info()
    return ProbeResult(
        True,
        f"{info.model or info.arch}: {info.physical_cores} cores, ISA {info.isa_summary()}; "
        f"expert kernels: {native_lib.status()}",
        info.physical_cores,  # logical CPU devices it can be split into (device.cpu.count)
        {"variant": info.variant, "flags_source": info.source, "kernels": native_lib.status()},
    )


def score() -> int:
    return VARIANT_SCORE[cpu_info().variant]


def inventory(logical: int = 1) -> list[tuple[DeviceInfo, MemoryInfo]]:
    """The logical CPU devices (device.cpu.count splits the host's RAM between them)."""
    info = cpu_info()
    name = info.model or info.arch
    vm = psutil.virtual_memory()
    total, free = int(vm.total) // logical, int(vm.available) // logical
    return [(DeviceInfo(i, f"{name} (part {i})" if logical > 1 else name, total), MemoryInfo(free, total))
            for i in range(logical)]
