"""When a plan does not fit: the error that names every device over its budget, and a search for
one set of overrides that fits them all (each candidate planned again, not estimated)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from omegaconf import DictConfig

from kt_core.config.schema import choice
from kt_core.config.validate import GIB
from kt_core.errors import KtError

if TYPE_CHECKING:
    from kt_core.placement.plan import Plan


class PlanDoesNotFit(KtError):
    """A plan over the budget of one or more devices: ``over`` names them (slot labels),
    ``overrides`` is one set of overrides that a second plan showed fits every device (or [])."""

    def __init__(self, message: str, over: list[str], overrides: list[str]) -> None:
        super().__init__(message)
        self.over, self.overrides = over, overrides


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def fit_error(plan: Plan, cfg: DictConfig) -> Optional[PlanDoesNotFit]:
    """None when every device fits; else the error naming every device over its budget (need,
    budget, shortfall) and one set of overrides that fits them all, checked by planning again."""
    over = [(label, d) for label, d in plan.devices.items() if not d.fits]
    if not over:
        return None
    parts = [f"{label} needs {_gib(d.total_bytes)} but its budget is {_gib(d.budget_bytes)} "
             f"({_gib(d.total_bytes - d.budget_bytes)} short)" for label, d in over]
    fix = fitting_overrides(plan, cfg)
    msg = f"the plan does not fit: {'; '.join(parts)}"
    if fix:
        msg += f"; these overrides fit every device: {' '.join(fix)}"
    return PlanDoesNotFit(msg, [label for label, _ in over], fix)


def _replan(plan: Plan, cfg: DictConfig, overrides: dict[str, object]) -> Plan:
    import copy

    from omegaconf import OmegaConf

    trial = copy.deepcopy(cfg)
    for key, value in overrides.items():
        OmegaConf.update(trial, key, value, merge=False)
    from kt_core.placement.plan import make_plan  # (plan.py imports this module)

    return make_plan(plan.spec, trial, plan.topo, enforce_fit=False, tensors=plan.tensors)


def _fits(p: Plan) -> bool:
    return all(d.fits for d in p.devices.values())


def _render(overrides: dict[str, object]) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]


def fitting_overrides(plan: Plan, cfg: DictConfig) -> list[str]:
    """One set of overrides under which every device fits, as ``key=value`` strings ([] if the plan
    cannot be planned again). Adds, one at a time until the plan fits: accelerator experts sized by
    what fits (per_device / fraction unset), int4 experts, int8 dense weights, a shorter
    context (halved, down to 1024 tokens); then gives each device still over budget the memory it
    needs (a bigger device, or a described one); then drops every step the fit does not need.
    Every candidate is planned, not estimated."""
    if plan.topo is None:
        return []
    try:
        return _search(plan, cfg)
    except KtError:  # a candidate the planner refuses: name no fix rather than a wrong one
        return []


def _search(plan: Plan, cfg: DictConfig) -> list[str]:
    pol = cfg.topology.expert_policy
    steps: list[tuple[str, dict[str, object]]] = []  # (what, overrides); later steps of one kind win
    fixed = {f"topology.expert_policy.{k}": None for k in ("per_device", "fraction") if pol[k] is not None}
    if fixed:  # an expert count per accelerator fixed by hand: let the strategy fill what fits instead
        steps.append(("policy", fixed))
    if plan.spec.moe is not None and choice(cfg.quant.experts) != "int4":
        steps.append(("experts", {"quant.experts": "int4"} if cfg.quant.group_size else
                      {"quant.experts": "int4", "quant.group_size": 128}))
    if choice(cfg.quant.dense) in ("none", "fp8"):
        steps.append(("dense", {"quant.dense": "int8"}))
    key = "plan.kv_tokens" if cfg.plan.kv_tokens else "model.max_seq_len"
    tokens = int(cfg.plan.kv_tokens or cfg.model.max_seq_len)
    while any(d.kv_bytes for d in plan.devices.values()) and tokens > 1024:
        tokens = max(1024, tokens // 2)
        steps.append(("context", {key: tokens}))

    def merged(kinds: set[str], memory: dict[str, object]) -> dict[str, object]:
        out: dict[str, object] = {}
        for kind, overrides in applied:
            if kind in kinds:
                out.update(overrides)
        return {**out, **memory}

    applied: list[tuple[str, dict[str, object]]] = []
    memory: dict[str, object] = {}
    trial = plan
    for step in steps:
        if _fits(trial):
            break
        applied.append(step)
        trial = _replan(plan, cfg, merged({k for k, _ in applied}, memory))
    kinds = {k for k, _ in applied}
    for _ in range(3):  # memory for the devices still over budget (auto placement may shift experts)
        if _fits(trial):
            break
        for d in trial.devices.values():
            if not d.fits:
                k = f"device.{d.slot.name}.memory_gb"
                memory[k] = max(int(memory.get(k) or 0), math.ceil(d.total_bytes / GIB))
        trial = _replan(plan, cfg, merged(kinds, memory))
    if not _fits(trial):
        return []
    order = list(dict.fromkeys(k for k, _ in applied))
    for kind in order if memory else order[:-1]:  # drop the steps the fit does not need (without memory
        if _fits(_replan(plan, cfg, merged(kinds - {kind}, memory))):  # added, the last one was needed)
            kinds.discard(kind)
    return _render(merged(kinds, memory))
