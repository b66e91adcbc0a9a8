"""The device contract, its torch reference implementation and the plugin registry."""
from kt_core.backend.contract import Backend, DeviceInfo, MemoryInfo, Op, ProbeResult, Quant
from kt_core.backend.registry import PluginStatus, Registry, get_backend, registry
from kt_core.backend.torch_backend import TorchBackend

__all__ = ["Backend", "DeviceInfo", "MemoryInfo", "Op", "PluginStatus", "ProbeResult", "Quant",
           "Registry", "TorchBackend", "get_backend", "registry"]
