"""What a plugin reports about its devices: torch-free, so the plugins' quick probes
(``kt devices``, ``kt config``) and the contract share them without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProbeResult:
    """Whether a device kind is usable here, and why (always a reason, also when usable)."""

    available: bool
    reason: str
    device_count: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    total_bytes: int
