"""Whether this torch build can drive Intel GPUs, told without importing torch where the build
strings settle it (a CUDA, ROCm or ``+cpu`` build); otherwise the plugin class probes."""
from __future__ import annotations

from typing import Optional

from kt_core.backend.torch_build import torch_build
from kt_core.backend.types import ProbeResult


def not_compiled(version: str) -> str:
    return f"torch {version} was built without XPU support; install torch from the XPU wheel index"


def probe() -> Optional[ProbeResult]:
    build = torch_build()
    if build is None or build.xpu is not None:
        return None
    if build.cuda is not None or build.hip is not None or build.version.endswith("+cpu"):
        return ProbeResult(False, not_compiled(build.version))
    return None
