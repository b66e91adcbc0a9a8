"""The built-in ``cpu`` device plugin: its class (``backend.py``, torch) loads on first use; ``probe.py``
answers ``kt devices`` and ``kt config`` without torch where it can."""
from kt_backends import lazy_plugin

__getattr__ = lazy_plugin(__name__, ("Backend", "CpuBackend"))
