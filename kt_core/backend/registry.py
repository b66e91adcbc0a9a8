"""Discovers device plugins through the ``kt_core.backends`` entry-point group.

Built-in plugins register exactly like a vendor's separate wheel would
(``setup.py`` declares them). Several plugins are active at once; the topology
decides which ones a run uses. A plugin that fails to import, or whose probe
raises, is recorded with its error and never breaks the core. When two entry
points share a name (say a vendor's tuned ``cpu`` variant beside the built-in),
the one whose ``score()`` is highest wins and the others are listed as shadowed.

A plugin may also register a torch-free probe module under ``kt_core.probes`` (same name): its
``probe()`` answers a ProbeResult, or None when only the plugin itself can tell; optional
``score()`` and ``inventory()`` (devices with their memory). When a name has one plugin and such
a probe answers, the plugin's class is imported only on first use, so ``kt devices`` and
``kt config`` run without importing torch.
"""
from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from kt_core.errors import DeviceUnavailable, KtError

if TYPE_CHECKING:  # the contract imports torch; listing plugin names must not
    from kt_core.backend.contract import Backend, ProbeResult

log = logging.getLogger(__name__)
GROUP = "kt_core.backends"
PROBES = "kt_core.probes"  # optional torch-free probe modules, by plugin name


@dataclass
class PluginStatus:
    name: str
    source: str  # "module:attr" of the entry point
    error: Optional[str] = None  # import or probe failure, one line
    probe: Optional[ProbeResult] = None
    score: int = 0
    shadowed: list[str] = field(default_factory=list)
    #: devices with their memory, torch-free (from the plugin's probe module), or None
    inventory: Optional[Callable[[], list]] = None
    _cls: Optional[type[Backend]] = field(default=None, repr=False)
    _ep: Optional[EntryPoint] = field(default=None, repr=False)  # not imported yet

    @property
    def cls(self) -> Optional[type[Backend]]:
        """The plugin's class, imported on first use when a quick probe answered for it."""
        if self._cls is None and self._ep is not None:
            ep, self._ep = self._ep, None
            cls, error = _import(ep)
            if error is not None:
                self.error = error
            self._cls = cls
        return self._cls

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


def _import(ep: EntryPoint) -> tuple[Optional[type[Backend]], Optional[str]]:
    from kt_core.backend.contract import Backend

    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not break the core
        log.warning("backend plugin %s failed to import: %s", ep.name, _one_line(exc))
        return None, f"plugin failed to import ({ep.value}): {_one_line(exc)}"
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return None, f"{ep.value} is not a kt_core Backend subclass"
    return cls, None


def _load(ep: EntryPoint) -> PluginStatus:
    status = PluginStatus(ep.name, ep.value)
    status._cls, status.error = _import(ep)
    if status._cls is None:
        return status
    try:
        status.probe = status._cls.probe()
        status.score = status._cls.score() if status.probe.available else 0
    except Exception as exc:
        status.error = f"probe raised: {_one_line(exc)}"
    return status


def _quick(ep: EntryPoint, probe_ep: EntryPoint) -> Optional[PluginStatus]:
    """The plugin's status from its torch-free probe module, or None (then the plugin is loaded)."""
    try:
        module = probe_ep.load()
        result = module.probe()
        if result is None:
            return None
        score = getattr(module, "score", None)
        status = PluginStatus(ep.name, ep.value, probe=result, _ep=ep,
                              score=score() if score is not None and result.available else 0,
                              inventory=getattr(module, "inventory", None))
    except Exception as exc:  # the full probe reports what is wrong
        log.debug("quick probe of %s failed (%s); importing the plugin", ep.name, _one_line(exc))
        return None
    return status


class Registry:
    """The plugins of one process. ``Registry(eps)`` takes explicit entry points (tests)."""

    def __init__(self, eps: Optional[Iterable[EntryPoint]] = None,
                 probes: Optional[Iterable[EntryPoint]] = None) -> None:
        self._eps = list(eps) if eps is not None else None
        # explicit entry points come without quick probes unless given
        self._probes = list(probes) if probes is not None else None if eps is None else []
        self._plugins: Optional[dict[str, PluginStatus]] = None
        self._instances: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def _entry_points(self) -> list[EntryPoint]:
        return self._eps if self._eps is not None else list(entry_points(group=GROUP))

    def _probe_modules(self) -> dict[str, EntryPoint]:
        probes = self._probes if self._probes is not None else list(entry_points(group=PROBES))
        return {ep.name: ep for ep in probes}

    def plugins(self) -> dict[str, PluginStatus]:
        """Every registered plugin by name, probed once (quickly where its probe module can)."""
        with self._lock:
            if self._plugins is None:
                eps = self._entry_points()
                counts: dict[str, int] = {}
                for ep in eps:
                    counts[ep.name] = counts.get(ep.name, 0) + 1
                probes = self._probe_modules()
                best: dict[str, PluginStatus] = {}
                for ep in eps:
                    quick = _quick(ep, probes[ep.name]) if counts[ep.name] == 1 and ep.name in probes else None
                    st = quick or _load(ep)
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
        """Whether the plugins have been probed already."""
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
        if not st.available or st.cls is None:  # st.cls imports a quickly probed plugin
            raise DeviceUnavailable(name, st.reason)
        with self._lock:
            if name not in self._instances:
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
