"""Huawei Ascend NPUs through ``torch_npu`` (device string ``npu``, HCCL).

``torch_npu`` is imported lazily, and only when its version matches torch's:
importing a mismatched torch_npu breaks torch itself (torch's backend autoload
imports it too, unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``; ``kt`` sets that).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from kt_backends.ascend import probe as _probe
from kt_core.backend.contract import ProbeResult
from kt_core.backend.torch_backend import TorchBackend


class AscendBackend(TorchBackend):
    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    @classmethod
    def mismatch(cls) -> Optional[str]:
        """Why torch_npu must not be imported here, or None."""
        return _probe.mismatch(str(torch.__version__))

    @classmethod
    def probe(cls) -> ProbeResult:
        why = cls.mismatch()
        if why:
            return ProbeResult(False, why)
        try:
            _probe.import_torch_npu()
        except Exception as exc:
            return ProbeResult(False, f"torch_npu failed to import: {exc}; check the CANN environment "
                                      "(source set_env.sh)")
        n = torch.npu.device_count()
        if n == 0:
            env = cls.visible_devices_env
            return ProbeResult(False, f"no Ascend NPU visible ({env}={os.environ.get(env, 'unset')}); "
                                      "check the driver with npu-smi info")
        return ProbeResult(True, f"{n} Ascend NPU(s), torch_npu {_probe.torch_npu_version()}", n)


Backend = AscendBackend
