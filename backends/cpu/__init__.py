"""The host CPU as a device. Ops run on torch for now; the native expert kernels
(runtime ISA dispatch) plug in here when they are built."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import psutil
import torch

from kt_core.backend.contract import DeviceInfo, MemoryInfo, ProbeResult
from kt_core.backend.cpuinfo import VARIANT_SCORE, cpu_info
from kt_core.backend.torch_backend import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    @classmethod
    def probe(cls) -> ProbeResult:
        info = cpu_info()
        return ProbeResult(
            True,
            f"{info.model or info.arch}: {info.physical_cores} cores, ISA {info.isa_summary()}; "
            f"expert kernels: torch ({torch.backends.cpu.get_cpu_capability()})",
            1,
            {"variant": info.variant, "flags_source": info.source, "kernels": "torch"},
        )

    @classmethod
    def score(cls) -> int:
        return VARIANT_SCORE[cpu_info().variant]

    def devices(self) -> list[DeviceInfo]:
        info = cpu_info()
        return [DeviceInfo(0, info.model or info.arch, int(psutil.virtual_memory().total))]

    def memory_info(self, index: int = 0) -> MemoryInfo:
        vm = psutil.virtual_memory()
        return MemoryInfo(int(vm.available), int(vm.total))

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype)  # host memory is the device's own

    def new_stream(self, index: int = 0) -> Any:
        return torch.Stream(device="cpu")

    def new_event(self, index: int = 0) -> Any:
        return torch.Event(device="cpu")

    def synchronize(self, index: Optional[int] = None) -> None:
        return None  # CPU ops complete before they return


Backend = CpuBackend
