"""Compose kt-core's configuration with Hydra's Compose API, with one-line errors.

``compose(overrides)`` returns the typed config; ``validate`` (in
:mod:`kt_core.config.validate`) then checks it against the machine. The config
folder is the installed ``kt_conf`` package; a per-machine folder (``KT_CONFIG_DIR``
or the user config folder) is added to the search path when it exists, so its
``machine/local.yaml`` is picked up by ``optional machine: local``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kt_core.config import schema
from kt_core.errors import ConfigError


def config_dir() -> Path:
    """The shipped Hydra config folder."""
    return Path(str(files("kt_conf")))


def user_config_dir() -> Path:
    """Where per-machine overrides live outside the install (may not exist)."""
    env = os.environ.get("KT_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "kt-core"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed, schema-checked config; raises ConfigError with one line on mistakes."""
    schema.register()
    extra = list(overrides)
    user_dir = user_config_dir()
    if user_dir.is_dir():
        extra.append(f"hydra.searchpath=[{user_dir.resolve().as_uri()}]")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=extra)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc
    return cfg


# ---- turning Hydra / OmegaConf exceptions into one actionable line ---------------------

def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _field_names(path: str) -> list[str]:
    """Valid keys under a dotted config path, read from the schema dataclasses."""
    node: object = schema.KtConfig
    parts = [p for p in path.split(".") if p]
    i = 0
    while i < len(parts):
        if not dataclasses.is_dataclass(node):
            return []
        hints = typing.get_type_hints(node)
        if parts[i] not in hints:
            return []
        t = hints[parts[i]]
        if typing.get_origin(t) is dict:  # keyed by a free name (device.<name>): skip the name
            t = typing.get_args(t)[1]
            i += 1
        elif typing.get_origin(t) is typing.Union:
            t = next(a for a in typing.get_args(t) if a is not type(None))
        node = t
        i += 1
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _unknown_key(full_key: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    valid = _field_names(parent)
    if parent.startswith("device.") and parent.count(".") == 1 and leaf in valid:
        name = parent.split(".")[1]
        return (f"device '{name}' is not selected in this config, so '{full_key}' cannot be set; "
                f"select it with device={name} (or a topology that uses it; device=[a,b] selects several)")
    if leaf in valid:  # a real key whose value is a mapping: Hydra adds entries with '+'
        return (f"'{full_key}' holds a mapping; set it with +{full_key}={{KEY:VALUE,...}}, "
                f"e.g. +topology.expert_policy.layers={{3:[0,5,9]}}")
    msg = f"unknown config key '{full_key}'"
    close = difflib.get_close_matches(leaf, valid, n=1)
    if close:
        msg += f": did you mean '{(parent + '.') if parent else ''}{close[0]}'?"
    elif valid:
        msg += f"; valid keys{' under ' + parent if parent else ''}: {', '.join(valid)}"
    return msg


def explain(exc: BaseException) -> str:
    """One line that names the problem and the fix."""
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    m = re.search(r"Could not find '([\w/]+)/([\w.-]+)'", text)
    if m:
        group, choice = m.groups()
        opts = group_options(group)
        close = difflib.get_close_matches(choice, opts, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"no {group} option '{choice}'; {hint}available: {', '.join(opts)}"
    m = re.search(r"Could not override '([\w.]+)'", text) or re.search(r"Key '\w+' not in '\w+'\s+full_key: ([\w.]+)", text)
    if m and ("not in" in text or "append" in text):
        return _unknown_key(m.group(1))
    for e in chain:
        full_key = getattr(e, "full_key", None)
        if full_key and isinstance(e, OmegaConfBaseException):
            msg = _first_line(e)
            if "Missing mandatory value" in msg:
                return f"config key '{full_key}' must be set (it has no default)"
            return f"bad value for '{full_key}': {msg}"
    if "mismatched input" in text or "no viable alternative" in text or "extraneous input" in text:
        bad = getattr(chain[0], "override", None)
        return (f"cannot parse override{' ' + repr(bad) if bad else ''}: {_first_line(chain[0])}; "
                "overrides look like key=value or group=option (quote values with spaces)")
    return _first_line(chain[0])


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
