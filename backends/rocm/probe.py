"""The ROCm plugin's torch-free probe: the CUDA plugin's, for HIP builds of torch."""
from __future__ import annotations

from typing import Optional

from kt_backends.cuda.probe import quick_probe
from kt_core.backend.types import ProbeResult


def probe() -> Optional[ProbeResult]:
    return quick_probe(hip=True)
