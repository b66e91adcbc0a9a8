"""Whether this torch build can drive NVIDIA (or, for the ROCm plugin, AMD) GPUs, told from
torch's build strings without importing torch. Counting the GPUs needs torch: then the quick
probe answers None and the plugin class probes."""
from __future__ import annotations

from typing import Optional

from kt_core.backend.torch_build import TorchBuild, torch_build
from kt_core.backend.types import ProbeResult


def build_mismatch(build: TorchBuild, hip: bool) -> Optional[str]:
    """Why this torch build cannot drive the plugin's GPUs (``hip``: the ROCm plugin), or None."""
    ver = build.version
    if hip and build.hip is None:
        return (f"torch {ver} is not a ROCm build (torch.version.hip is None); "
                "install torch from the ROCm wheel index")
    if not hip and build.hip is not None:
        return f"torch {ver} is a ROCm build; use device=rocm"
    if not hip and build.cuda is None:
        return (f"torch {ver} is a CPU-only build (torch.version.cuda is None); "
                "install a CUDA build of torch")
    return None


def quick_probe(hip: bool) -> Optional[ProbeResult]:
    build = torch_build()
    why = build_mismatch(build, hip) if build is not None else None
    return ProbeResult(False, why) if why else None


def probe() -> Optional[ProbeResult]:
    return quick_probe(hip=False)
