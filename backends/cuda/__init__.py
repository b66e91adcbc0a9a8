"""The built-in ``cuda`` device plugin. Its class (in ``backend.py``) imports torch, so it loads on
first use; ``probe.py`` answers ``kt devices`` and ``kt config`` without torch where it can."""
import importlib

_LAZY = ("Backend", "CudaBackend")  # the rest of the package (probe, native_lib) is importable without torch


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'kt_backends.cuda' has no attribute {name!r}")
    return getattr(importlib.import_module("kt_backends.cuda.backend"), name)
