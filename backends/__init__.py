"""Built-in device plugins (installed as ``kt_backends``), registered through the
``kt_core.backends`` entry-point group exactly as an external vendor wheel would be."""

import importlib


def lazy_plugin(package: str, names: tuple):
    """A plugin package's module ``__getattr__``: ``names`` (its Backend class) load from
    ``<package>.backend`` on first use, which imports torch; the rest of the package (its
    torch-free ``probe`` module) imports without it."""
    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.backend"), name)
    return __getattr__
