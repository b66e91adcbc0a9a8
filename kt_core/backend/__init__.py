"""The device contract, its torch reference implementation and the plugin registry.

The names below load on first use, so importing a torch-free submodule (``cpuinfo``,
``registry`` to list plugin names) does not import torch.
"""
import importlib

_EXPORTS = {"Backend": "contract", "DeviceInfo": "contract", "MemoryInfo": "contract", "Op": "contract",
            "ProbeResult": "contract", "Quant": "contract", "PluginStatus": "registry", "Registry": "registry",
            "get_backend": "registry", "registry": "registry", "TorchBackend": "torch_backend"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kt_core.backend.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kt_core.backend' has no attribute {name!r}")


__all__ = ["Backend", "DeviceInfo", "MemoryInfo", "Op", "PluginStatus", "ProbeResult", "Quant",
           "Registry", "TorchBackend", "get_backend", "registry"]
