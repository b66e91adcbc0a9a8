"""Discovers device plugins through the ``kt_core.backends`` entry-point group.

Built-in plugins register exactly like a vendor's separate wheel would
(``setup.py`` declares them). Several plugins are active at once; the topology
decides which ones a run uses. A plugin that fails to import, or whose probe
raises, is recorded with its error and never breaks the core. When two entry
points share a name (say a vendor's tuned ``cpu`` variant beside the built-in),
the one whose ``score()`` is highest wins and the others are listed as shadowed.
"""
from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Iterable, Optional

from kt_core.errors import DeviceUnavailable, KtError

if TYPE_CHECKING:  # the contract imports torch; listing plugin names must not
    from kt_core.backend.contract import Backend, ProbeResult

log = logging.getLogger(__name__)
GROUP = "kt_core.backends"


@dataclass
class PluginStatus:
    name: str
    source: str  # "module:attr" of the entry point
    cls: Optional[type[Backend]] = None
    error: Optional[str] = None  # import or probe failure, one line
    probe: Optional[ProbeResult] = None
    score: int = 0
    shadowed: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.error is None and self.probe is not None and self.probe.available

    @property
    def reason(self) -> str:
        if self.error is not None:
            return self.error
        return self.probe.reason if self.probe else "not probed"


def _one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


def _load(ep: EntryPoint) -> PluginStatus:
    from kt_core.backend.contract import Backend

    status = PluginStatus(ep.name, ep.value)
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not break the core
        status.error = f"plugin failed to import ({ep.value}): {_one_line(exc)}"
        log.warning("backend plugin %s failed to import: %s", ep.name, status.error)
        return status
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        status.error = f"{ep.value} is not a kt_core Backend subclass"
        return status
    status.cls = cls
    try:
        status.probe = cls.probe()
        status.score = cls.score() if status.probe.available else 0
    except Exception as exc:
        status.error = f"probe raised: {_one_line(exc)}"
    return status


class Registry:
    """The plugins of one process. ``Registry(eps)`` takes explicit entry points (tests)."""

    def __init__(self, eps: Optional[Iterable[EntryPoint]] = None) -> None:
        self._eps = list(eps) if eps is not None else None
        self._plugins: Optional[dict[str, PluginStatus]] = None
        self._instances: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def _entry_points(self) -> list[EntryPoint]:
        return self._eps if self._eps is not None else list(entry_points(group=GROUP))

    def plugins(self) -> dict[str, PluginStatus]:
        """Every registered plugin by name, loaded and probed once."""
        with self._lock:
            if self._plugins is None:
                best: dict[str, PluginStatus] = {}
                for ep in self._entry_points():
                    st = _load(ep)
                    prev = best.get(ep.name)
                    if prev is None:
                        best[ep.name] = st
                        continue
                    win, lose = (st, prev) if st.score > prev.score else (prev, st)
                    win.shadowed.extend([lose.source, *lose.shadowed])
                    best[ep.name] = win
                self._plugins = dict(sorted(best.items()))
            return self._plugins

    def names(self) -> list[str]:
        return list(self.plugins())

    @property
    def loaded(self) -> bool:
        """Whether the plugins have been imported and probed already."""
        return self._plugins is not None

    def declared(self) -> dict[str, list[str]]:
        """The entry points ("module:attr") registered under each plugin name, read without
        importing any plugin (so without torch)."""
        out: dict[str, list[str]] = {}
        for ep in self._entry_points():
            out.setdefault(ep.name, []).append(ep.value)
        return out

    def status(self, name: str) -> PluginStatus:
        plugins = self.plugins()
        if name not in plugins:
            known = ", ".join(plugins) or "none (is kt-core installed? run: pip install -e .)"
            raise KtError(f"unknown device backend '{name}'; registered backends: {known}")
        return plugins[name]

    def get(self, name: str) -> Backend:
        """The (single, cached) instance of plugin ``name``; raises if it is unavailable."""
        st = self.status(name)
        if not st.available:
            raise DeviceUnavailable(name, st.reason)
        with self._lock:
            if name not in self._instances:
                assert st.cls is not None
                self._instances[name] = st.cls()
            return self._instances[name]

    def available(self) -> list[str]:
        return [n for n, st in self.plugins().items() if st.available]


_default: Optional[Registry] = None


def registry() -> Registry:
    """The process-wide registry over the installed entry points."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def get_backend(name: str) -> Backend:
    return registry().get(name)
