"""PEFT LoRA on the routed experts: ``target_parameters`` on transformers' fused expert tensors.

transformers keeps a MoE layer's experts as ``mlp.experts.gate_up_proj [E, 2I, H]`` and
``mlp.experts.down_proj [E, H, I]``; PEFT adapts such a parameter with one rank-r adapter per expert,
stored together: ``lora_A.weight [r * E, in]`` (``.reshape(E, r, in)``: expert e's A) and
``lora_B.weight [out, r * E]`` (``.reshape(out, r, E)[:, :, e]``: its B). Each adapted parameter wraps
the module once more, so the module's name gains a ``.base_layer`` per parameter adapted after it
(``experts.base_layer.lora_*`` and ``experts.lora_*``); which is which follows the order PEFT applied
them, which adapter_config.json does not keep (it lists the names sorted), so the shapes decide:
gate_up_proj's A takes the hidden size and its B gives 2 x the expert width, down_proj's the reverse.
kt-core reads the experts one by one (gate, up, down per expert), so an adapter becomes per-expert
pairs: gate takes rows :I of gate_up's delta, up rows I:, both with the same A.
"""
from __future__ import annotations

import re
import torch

from kt_core.errors import KtError

PARAMS = ("gate_up_proj", "down_proj")
_MODULE = re.compile(r"^(?P<prefix>.+\.experts)(?P<wrap>(?:\.base_layer)*)$")
# families whose checkpoints keep one tensor per expert and whose transformers class fuses them as
# [E, out, in] (GPT-OSS and Llama 4 fuse as [E, in, out] on disk: not read here)
FAMILIES = ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe", "qwen3_next",
            "qwen3_5_moe", "glm_moe_dsa")


def targets(config_targets) -> list[str]:
    """The adapted expert tensors (gate_up_proj / down_proj) in the order PEFT wrapped them; a name of
    anything else is refused."""
    out = []
    if config_targets is not None and not isinstance(config_targets, list):
        raise KtError(f"target_parameters is {config_targets!r}; it must be a list of tensor names")
    for t in config_targets or []:
        leaf = str(t).rsplit(".", 1)[-1]
        if not (isinstance(t, str) and t.rsplit(".", 2)[-2:-1] == ["experts"] and leaf in PARAMS):
            raise KtError(f"target_parameters entry {t!r}: kt-core reads LoRA on the routed experts' gate_up_proj "
                          "and down_proj (mlp.experts.gate_up_proj / mlp.experts.down_proj) only")
        out.append(leaf)
    return out


def split(modules: dict[str, dict[str, torch.Tensor]], order: list[str], r: int, where) -> dict:
    """Take the expert modules out of ``modules`` (module name -> {lora_A, lora_B}):
    {(experts prefix, wrapping depth): (A [E, r, in], B [E, out, r])}."""
    out = {}
    for name in [n for n in modules if _MODULE.match(n)]:
        m = _MODULE.match(name)
        depth = m.group("wrap").count(".base_layer")
        if depth >= len(order):
            raise KtError(f"{where}: {name} is wrapped {depth} times but target_parameters lists {order}")
        ab = modules.pop(name)
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] % r or a.shape[0] != b.shape[1]:
            raise KtError(f"{where}: {name} has lora_A {None if a is None else tuple(a.shape)} and lora_B "
                          f"{None if b is None else tuple(b.shape)}, not [r x experts, in] and [out, r x experts]")
        E = a.shape[0] // r
        out[(m.group("prefix"), depth)] = (a.reshape(E, r, a.shape[1]), b.reshape(b.shape[0], r, E).permute(2, 0, 1))
    return out


def check_family(spec, where) -> None:
    if spec.family not in FAMILIES or spec.moe is None:
        raise KtError(f"{where}: LoRA on the routed experts is supported for {', '.join(FAMILIES)}; "
                      f"this model is {spec.arch}")


def stacked(fused: dict, spec, where) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(experts prefix, gate_up_proj | down_proj): (A [E, r, in], B [E, out, r])}, told apart by shape."""
    check_family(spec, where)
    I, H, E = spec.moe.intermediate, spec.hidden_size, spec.moe.num_experts
    shapes = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
    out = {}
    for (prefix, _), (a, b) in fused.items():
        got = (a.shape[0], b.shape[1], a.shape[2])  # experts, out, in
        param = next((k for k, v in shapes.items() if v == got), None)
        if param is None:
            raise KtError(f"{where}: {prefix} adapts {got[0]} experts of {got[1]} x {got[2]}, but this model's experts "
                          f"are {shapes['gate_up_proj']} (gate_up) and {shapes['down_proj']} (down): it was made for "
                          "another model")
        out[(prefix, param)] = (a, b)
    return out


def per_expert(fused: dict, spec, where) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The checkpoint's per-expert weight name -> (A [r, in], B [out, r]) of every adapted expert."""
    from kt_core.models.names import moe_names

    gate, up, down = moe_names(spec.family).projections
    I = spec.moe.intermediate if spec.moe is not None else 0
    pairs = {}
    for (prefix, param), (a, b) in stacked(fused, spec, where).items():
        for e in range(a.shape[0]):
            if param == "gate_up_proj":
                pairs[f"{prefix}.{e}.{gate}.weight"] = (a[e], b[e, :I])
                pairs[f"{prefix}.{e}.{up}.weight"] = (a[e], b[e, I:])
            else:
                pairs[f"{prefix}.{e}.{down}.weight"] = (a[e], b[e])
    return pairs


def fused_tensors(prefix: str, a: torch.Tensor, b: torch.Tensor, depth: int) -> dict[str, torch.Tensor]:
    """Expert-stacked A [E, r, in] and B [E, out, r] as PEFT stores them under ``prefix`` (the experts
    module), wrapped ``depth`` times."""
    E, r = a.shape[0], a.shape[1]
    name = prefix + ".base_layer" * depth
    return {f"{name}.lora_A.weight": a.reshape(E * r, a.shape[2]).contiguous(),
            f"{name}.lora_B.weight": b.permute(1, 2, 0).reshape(b.shape[1], r * E).contiguous()}

