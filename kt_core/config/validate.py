"""Checks a composed config against the registered plugins (and, optionally, the machine).

``resolve_topology(cfg)`` turns the topology's device references into concrete
device slots and fails, before any weight is read, with one line that names the
problem and the override that fixes it:

- a reference to a device that is not configured, or an accelerator role when
  ``device=cpu`` selects none;
- an unknown backend plugin;
- with ``check_devices`` (``kt config``, ``kt run``): a device that is absent here
  (with its probe's reason), more devices than are visible, a memory budget larger
  than the device;
- a weight format or dtype a device cannot run (asked through ``supports``).
``kt plan`` resolves with ``check_devices=False``: it plans for the described
machine whether or not its devices are here. That mode imports a plugin (and so
torch) only when an answer needs it: the built-in plugins run every op, dtype and
weight format, and a device's count is probed only when the topology uses it. Probing
itself imports a plugin only when its torch-free probe module cannot answer (see registry.py).

``check_values(cfg)`` checks the values no device is needed to judge (model.path,
sizes); ``check_generate(cfg)`` the ``generate.*`` sampling values, before a model loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from omegaconf import DictConfig

from kt_core.backend.registry import PluginStatus, Registry, registry as default_registry
from kt_core.config.schema import choice
from kt_core.errors import ConfigError, KtError

if TYPE_CHECKING:
    import torch

GIB = 1 << 30
ROLES = ("attention", "dense", "experts")
# setup.py's plugins. Each runs every op _check_formats asks about, in every model.dtype and weight
# format (TorchBackend's defaults; tests/unit/test_config.py checks it), so describing a machine with
# them needs neither the plugin nor torch imported.
BUILTIN_PLUGINS = {name: f"kt_backends.{name}:Backend" for name in ("cpu", "cuda", "rocm", "xpu", "ascend")}
_REF = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(?::(?P<index>\d+))?$")


@dataclass(frozen=True)
class DeviceSlot:
    """One physical device a run uses: device config ``name``, plugin ``backend``, ``index``."""

    name: str
    backend: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.name}:{self.index}"

    @property
    def is_cpu(self) -> bool:
        return self.backend == "cpu"


@dataclass
class ResolvedTopology:
    name: str
    slots: dict[str, list[DeviceSlot]]  # device config name -> its devices
    roles: dict[str, list[DeviceSlot]]  # attention / dense / experts -> devices, in order

    @property
    def accelerators(self) -> list[DeviceSlot]:
        return [s for name, slots in self.slots.items() for s in slots if not s.is_cpu]

    @property
    def used(self) -> list[DeviceSlot]:
        seen: dict[str, DeviceSlot] = {}
        for slots in self.roles.values():
            for s in slots:
                seen.setdefault(s.label, s)
        return list(seen.values())


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(name)]


def _accel_choices(reg: Registry) -> str:
    avail = [n for n in reg.available() if n != "cpu"]
    return "device=" + "|".join(avail) if avail else "device=cuda|rocm|xpu|ascend on a machine that has one"


def _count(name: str, dcfg: DictConfig, st: Optional[PluginStatus], check: bool, planned: int) -> int:
    """Devices of one configured kind; ``st`` None: not probed (the count does not change the plan)."""
    if dcfg.count is not None:
        if dcfg.count < 1:
            raise ConfigError(f"device.{name}.count={dcfg.count} must be at least 1")
        visible = st.probe.device_count if st is not None and st.available and st.probe else 0
        if check and visible and dcfg.count > visible:
            raise ConfigError(f"device.{name}.count={dcfg.count} but only {visible} {name} device(s) "
                              f"are visible; fix: device.{name}.count={visible}")
        return int(dcfg.count)
    if dcfg.backend == "cpu":
        return 1  # logical CPU devices only when asked for (device.cpu.count=N)
    if st is not None and st.available and st.probe and st.probe.device_count:
        return st.probe.device_count
    return planned  # describing an absent device: as many as the topology needs


def _count_matters(cfg: DictConfig, name: str, planned: int) -> bool:
    """Whether device ``name``'s visible count could change the resolved roles: a role takes a
    whole pool (``accel``, ``name``), an index past ``planned``, or ``accel:N`` over several kinds."""
    kinds = sum(1 for d in cfg.device.values() if d.backend != "cpu")
    for role in ROLES:
        for ref in cfg.topology[role]:
            m = _REF.match(str(ref))
            if not m or m.group("name") not in (name, "accel"):
                continue
            index = m.group("index")
            if index is None or int(index) >= planned or (m.group("name") == "accel" and kinds > 1):
                return True
    return False


def _light(reg: Registry) -> set[str]:
    """Backends whose formats are known without importing them: only the built-in plugin is
    registered under that name (its probe module answers whether its devices are here)."""
    return {name for name, values in reg.declared().items() if values == [BUILTIN_PLUGINS.get(name)]}


def _slots(cfg: DictConfig, reg: Registry, check: bool, light: set[str]) -> dict[str, list[DeviceSlot]]:
    out: dict[str, list[DeviceSlot]] = {}
    for name, dcfg in cfg.device.items():
        planned = max(1, cfg.topology.min_accelerators) if dcfg.backend != "cpu" else 1
        probe = check or not (dcfg.backend in light and (dcfg.count is not None or dcfg.backend == "cpu"
                                                          or not _count_matters(cfg, name, planned)))
        st = None
        if probe:
            try:
                st = reg.status(dcfg.backend)
            except KtError as exc:
                raise ConfigError(f"device.{name}.backend: {exc}") from None
        n = _count(name, dcfg, st, check, planned)
        out[name] = [DeviceSlot(name, dcfg.backend, i) for i in range(n)]
    return out


def _resolve_ref(ref: str, role: str, topo: str, slots: dict[str, list[DeviceSlot]],
                 reg: Registry, cfg: DictConfig) -> list[DeviceSlot]:
    m = _REF.match(str(ref))
    configured = ", ".join(slots)
    if not m:
        raise ConfigError(f"topology.{role} entry '{ref}' is not a device reference; use accel, accel:N, "
                          f"cpu, or a configured device ({configured}) with an optional :N")
    name, index = m.group("name"), m.group("index")
    if name == "accel":
        pool = [s for ss in slots.values() for s in ss if not s.is_cpu]
        if not pool:
            selected = ",".join(k for k in cfg.device if k != "cpu") or "cpu"
            raise ConfigError(f"topology '{topo}' puts {role} on an accelerator but device={selected} "
                              f"selects none; fix: {_accel_choices(reg)}, or topology=cpu_only")
    elif name in slots:
        pool = slots[name]
    else:
        raise ConfigError(f"topology.{role} names device '{name}', which is not configured "
                          f"(configured: {configured}); fix: device={name} (device=[a,b] selects several)")
    if index is None:
        return pool
    i = int(index)
    if i >= len(pool):
        owner = pool[0].name if pool else name
        raise ConfigError(f"topology.{role} entry '{ref}' needs {i + 1} {name} device(s) but the config "
                          f"has {len(pool)}; fix: device.{owner}.count={i + 1} or use {name}:0")
    return [pool[i]]


def _check_present(slot: DeviceSlot, topo: str, reg: Registry, cfg: DictConfig) -> None:
    st = reg.status(slot.backend)
    if not st.available:
        alt = "topology=cpu_only" if slot.is_cpu else f"{_accel_choices(reg)}, or topology=cpu_only"
        raise ConfigError(f"topology '{topo}' needs device '{slot.name}', which is unavailable here: "
                          f"{st.reason}; fix: {alt} (kt plan works without the device)")


def _check_budget(name: str, dcfg: DictConfig, reg: Registry, check: bool) -> None:
    if dcfg.reserve_gb < 0:
        raise ConfigError(f"device.{name}.reserve_gb={dcfg.reserve_gb} must be >= 0")
    if dcfg.memory_gb is None:
        return
    if dcfg.memory_gb <= dcfg.reserve_gb:
        raise ConfigError(f"device.{name}.memory_gb={dcfg.memory_gb} leaves nothing after "
                          f"reserve_gb={dcfg.reserve_gb}; raise memory_gb or lower reserve_gb")
    if not check:
        return
    st = reg.status(dcfg.backend)
    if st.available and st.inventory is not None:  # the plugin's torch-free answer
        total = st.inventory()[0][1].total_bytes / GIB
    else:
        total = reg.get(dcfg.backend).memory_info(0).total_bytes / GIB
    if dcfg.memory_gb > total:
        raise ConfigError(f"device.{name}.memory_gb={dcfg.memory_gb:g} is more than the {total:.1f} GiB "
                          f"device {name}:0 has; fix: device.{name}.memory_gb={max(total - dcfg.reserve_gb, 0):.0f}")


def _check_formats(cfg: DictConfig, roles: dict[str, list[DeviceSlot]], reg: Registry, light: set[str]) -> None:
    asks = {
        "attention": ("attention_prefill", "none", "model.dtype=float32 or bfloat16"),
        "dense": ("linear", cfg.quant.dense, "quant.dense=none"),
        "head": ("linear", cfg.quant.head if cfg.quant.get("head") is not None else cfg.quant.dense,
                 "quant.head=none"),
        "experts": ("moe_experts", cfg.quant.experts, "quant=none or quant=int8"),
    }
    for role, (op, quant, fix) in asks.items():
        quant = choice(quant)
        for slot in roles[role] if role in roles else roles["dense"][-1:]:  # the head: the last dense device
            if slot.backend in light:  # a built-in plugin: runs every op, dtype and format
                continue
            cls = reg.status(slot.backend).cls
            if cls is None:
                continue
            from kt_core.backend.contract import Op

            dtype = torch_dtype(choice(cfg.model.dtype))
            if not cls.supports(Op(op), dtype, quant):
                raise ConfigError(f"device '{slot.name}' cannot run {op} with {quant} weights and "
                                  f"{dtype} activations; fix: {fix}, or move {role} to another device")


def _check_policy(cfg: DictConfig) -> None:
    pol = cfg.topology.expert_policy
    strategy = choice(pol.strategy)
    if strategy == "frequency" and not pol.stats_file:
        raise ConfigError("topology.expert_policy.strategy=frequency needs "
                          "topology.expert_policy.stats_file=PATH (a routing-statistics file)")
    if strategy == "explicit" and not pol.layers:
        raise ConfigError("topology.expert_policy.strategy=explicit needs per-layer expert lists in "
                          "topology.expert_policy.layers, e.g. '+topology.expert_policy.layers={3:[0,5,9]}'")
    if pol.per_device is not None and pol.per_device < 0:
        raise ConfigError(f"topology.expert_policy.per_device={pol.per_device} must be >= 0")
    if pol.fraction is not None and not 0 <= pol.fraction <= 1:
        raise ConfigError(f"topology.expert_policy.fraction={pol.fraction} must be between 0 and 1")
    if cfg.topology.deferred_experts < 0:
        raise ConfigError(f"topology.deferred_experts={cfg.topology.deferred_experts} must be >= 0")


def resolve_topology(cfg: DictConfig, check_devices: bool = True,
                     reg: Optional[Registry] = None) -> ResolvedTopology:
    """Concrete devices for every role; raises ConfigError (one line) on any mistake."""
    reg = reg or default_registry()
    topo = cfg.topology.name
    if "cpu" not in cfg.device:
        raise ConfigError("device.cpu is missing: the host CPU is always a device; "
                          "remove the override that deleted it")
    check_values(cfg)
    light = _light(reg)
    slots = _slots(cfg, reg, check_devices, light)
    roles = {}
    for role in ROLES:
        refs = list(cfg.topology[role])
        if not refs:
            raise ConfigError(f"topology.{role} is empty; name at least one device (e.g. cpu)")
        roles[role] = [s for ref in refs for s in _resolve_ref(ref, role, topo, slots, reg, cfg)]
    resolved = ResolvedTopology(topo, slots, roles)
    n_accel = len({s.label for s in resolved.used if not s.is_cpu})
    if n_accel < cfg.topology.min_accelerators:
        names = sorted({s.name for s in resolved.accelerators}) or ["cuda"]
        raise ConfigError(f"topology '{topo}' needs at least {cfg.topology.min_accelerators} accelerator "
                          f"devices but the config uses {n_accel}; fix: device.{names[0]}.count="
                          f"{cfg.topology.min_accelerators} (with that many visible) or topology=hybrid_1gpu")
    if check_devices:
        for slot in resolved.used:
            _check_present(slot, topo, reg, cfg)
    for name in {s.name for s in resolved.used}:
        _check_budget(name, cfg.device[name], reg, check_devices)
    _check_formats(cfg, roles, reg, light)
    _check_policy(cfg)
    return resolved


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else 'at least 1'}")


def check_values(cfg: DictConfig) -> None:
    """Values no device is needed to judge; raises ConfigError (one line) naming the key.
    ``resolve_topology`` starts with it, so ``kt config``, ``kt plan`` and every load check them."""
    if cfg.model.path is not None:
        path = Path(str(cfg.model.path)).expanduser()
        from kt_core.weights.paths import is_gguf

        gguf = is_gguf(path)
        if gguf and path.is_file():
            pass  # a GGUF file: its header is checked when it is opened
        elif not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise ConfigError(f"model {'file' if gguf else 'folder'} not found: model.path={path} {what}; point it "
                              "at a Hugging Face model folder (config.json + *.safetensors) or a .gguf file, or drop "
                              "it for the embedded default")
        elif not (path / "config.json").is_file():
            raise ConfigError(f"model.path={path} has no config.json: it is not a Hugging Face model folder")
    _positive(cfg.model.max_seq_len, "model.max_seq_len")
    _positive(cfg.plan.kv_tokens, "plan.kv_tokens")
    _positive(cfg.plan.batch, "plan.batch")
    _positive(cfg.plan.context_tokens, "plan.context_tokens")
    _positive(cfg.plan.prefill_chunk, "plan.prefill_chunk")
    _positive(cfg.quant.group_size, "quant.group_size", allow_zero=True)  # 0: one scale per row
    from kt_core.config.limits import INT8_MAX_GROUP, int8_group_ok

    g8 = cfg.quant.get("int8_group_size") or 0
    if not int8_group_ok(g8):
        raise ConfigError(f"quant.int8_group_size={g8} must be 0 (one scale per row) or a multiple of 4 up to "
                          f"{INT8_MAX_GROUP}, e.g. 32 (llama.cpp's Q8_0)")
    if not 0 <= cfg.server.port <= 65535:
        raise ConfigError(f"server.port={cfg.server.port} must be in 0..65535")
    _positive(cfg.server.max_batch, "server.max_batch")
    _positive(cfg.server.max_queue, "server.max_queue", allow_zero=True)


def check_generate(cfg: DictConfig) -> None:
    """The generate.* sampling values, judged as generation judges them (before a model loads)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from kt_core.config.schema import GenerateConfig

    g = cfg.generate
    if OmegaConf.to_container(g) == asdict(GenerateConfig()):
        return  # the shipped defaults (a test checks they pass): no need to import the sampler (torch)
    from kt_core.runtime.sampling import SamplingError, SamplingParams

    try:
        SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                       min_p=g.min_p, repetition_penalty=g.repetition_penalty, seed=g.seed,
                       stop=tuple(OmegaConf.to_container(g.stop))).validate()
    except SamplingError as exc:
        raise ConfigError(f"bad value for 'generate.{exc.param}': {exc}") from None
