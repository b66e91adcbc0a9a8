"""Intel GPUs (Arc, Data Center GPU Max, Core Ultra iGPU) through stock ``torch.xpu``.
intel-extension-for-pytorch is end-of-life: used only if it is installed and imports."""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from kt_backends.xpu.probe import not_compiled
from kt_core.backend.contract import MemoryInfo, ProbeResult
from kt_core.backend.torch_backend import TorchBackend

log = logging.getLogger(__name__)


class XpuBackend(TorchBackend):
    name = "xpu"
    device_type = "xpu"
    dist_backend = "xccl"
    visible_devices_env = "ZE_AFFINITY_MASK"

    @classmethod
    def probe(cls) -> ProbeResult:
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu._is_compiled():
            return ProbeResult(False, not_compiled(str(torch.__version__)))
        n = xpu.device_count()
        if n == 0:
            env = cls.visible_devices_env
            return ProbeResult(False, f"no Intel GPU visible ({env}={os.environ.get(env, 'unset')}); "
                                      "check the GPU driver and Level Zero runtime (sycl-ls)")
        return ProbeResult(True, f"{n} Intel GPU(s), torch {torch.__version__}", n)

    def __init__(self) -> None:
        super().__init__()
        self.ipex_version = None
        if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
            try:
                import intel_extension_for_pytorch as ipex

                self.ipex_version = ipex.__version__
            except Exception as exc:  # EOL package, often mismatched: stock torch.xpu suffices
                log.warning("intel_extension_for_pytorch is installed but failed to import (%s); "
                            "using stock torch.xpu", exc)

    def memory_info(self, index: int = 0) -> MemoryInfo:
        if hasattr(torch.xpu, "mem_get_info"):
            return super().memory_info(index)
        total = torch.xpu.get_device_properties(index).total_memory
        return MemoryInfo(int(total - torch.xpu.memory_reserved(index)), int(total))


Backend = XpuBackend
