"""Huawei Ascend NPUs through ``torch_npu`` (device string ``npu``, HCCL).

``torch_npu`` is imported lazily, and only when its version matches torch's:
importing a mismatched torch_npu breaks torch itself (torch's backend autoload
imports it too, unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; ``kt`` sets that).
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
from typing import Optional

import torch

from kt_core.backend.contract import ProbeResult
from kt_core.backend.torch_backend import TorchBackend


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def torch_npu_version() -> Optional[str]:
    for dist in ("torch-npu", "torch_npu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def torch_npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def import_torch_npu() -> None:
    importlib.import_module("torch_npu")


class AscendBackend(TorchBackend):
    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    @classmethod
    def mismatch(cls) -> Optional[str]:
        """Why torch_npu must not be imported here, or None."""
        want = _major_minor(torch.__version__)
        if not torch_npu_installed():
            return (f"torch_npu is not installed; install the CANN toolkit and "
                    f"torch-npu=={want}.* (it must match torch {torch.__version__})")
        have = torch_npu_version()
        if have is None or _major_minor(have) != want:
            return (f"torch_npu {have or '(unknown version)'} does not match torch {torch.__version__}: "
                    f"importing it would break torch; install torch-npu=={want}.*")
        return None

    @classmethod
    def probe(cls) -> ProbeResult:
        why = cls.mismatch()
        if why:
            return ProbeResult(False, why)
        try:
            import_torch_npu()
        except Exception as exc:
            return ProbeResult(False, f"torch_npu failed to import: {exc}; check the CANN environment "
                                      "(source set_env.sh)")
        n = torch.npu.device_count()
        if n == 0:
            env = cls.visible_devices_env
            return ProbeResult(False, f"no Ascend NPU visible ({env}={os.environ.get(env, 'unset')}); "
                                      "check the driver with npu-smi info")
        return ProbeResult(True, f"{n} Ascend NPU(s), torch_npu {torch_npu_version()}", n)


Backend = AscendBackend
