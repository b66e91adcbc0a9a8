"""Whether ``torch_npu`` may be imported here (installed, and its version matches torch's), told
without importing torch or torch_npu; the plugin class imports it and counts the NPUs."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
from typing import Optional

from kt_core.backend.torch_build import torch_build
from kt_core.backend.types import ProbeResult


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


def mismatch(torch_version: str) -> Optional[str]:
    """Why torch_npu must not be imported beside torch ``torch_version``, or None."""
    want = _major_minor(torch_version)
    if not torch_npu_installed():
        return (f"torch_npu is not installed; install the CANN toolkit and "
                f"torch-npu=={want}.* (it must match torch {torch_version})")
    have = torch_npu_version()
    if have is None or _major_minor(have) != want:
        return (f"torch_npu {have or '(unknown version)'} does not match torch {torch_version}: "
                f"importing it would break torch; install torch-npu=={want}.*")
    return None


def probe() -> Optional[ProbeResult]:
    build = torch_build()
    why = mismatch(build.version) if build is not None else None
    return ProbeResult(False, why) if why else None
