"""NVIDIA GPUs through ``torch.cuda``; the ROCm plugin reuses this class (HIP builds of
torch expose the same ``torch.cuda`` API), switching on ``torch.version.hip``."""
from __future__ import annotations

import os
from typing import ClassVar

import torch

from kt_backends.cuda.probe import build_mismatch
from kt_core.backend.contract import ProbeResult
from kt_core.backend.torch_build import torch_build
from kt_core.backend.torch_backend import TorchBackend


class CudaBackend(TorchBackend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    #: True for the plugin that serves HIP (ROCm) builds of torch
    hip: ClassVar[bool] = False
    vendor: ClassVar[str] = "NVIDIA"
    smi: ClassVar[str] = "nvidia-smi"

    @classmethod
    def build_mismatch(cls) -> str | None:
        """Why this torch build cannot drive this plugin's GPUs, or None."""
        return build_mismatch(torch_build(), cls.hip)

    @classmethod
    def probe(cls) -> ProbeResult:
        mismatch = cls.build_mismatch()
        if mismatch:
            return ProbeResult(False, mismatch)
        # device_count() asks the driver (NVML where possible) and creates no context
        n = torch.cuda.device_count()
        env = cls.visible_devices_env
        if n == 0:
            return ProbeResult(False, f"no {cls.vendor} GPU visible ({env}={os.environ.get(env, 'unset')}); "
                                      f"check the driver with {cls.smi}")
        runtime = f"HIP {torch.version.hip}" if cls.hip else f"CUDA {torch.version.cuda}"
        return ProbeResult(True, f"{n} {cls.vendor} GPU(s), torch {torch.__version__} {runtime}", n)


Backend = CudaBackend
