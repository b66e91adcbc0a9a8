"""The placement planner: (model config, topology, quant) -> who holds which tensor, a memory
table per device, and a roofline estimate of decode speed. It needs no weights (tensor
shapes come from the ``ModelSpec``), so DeepSeek-V3 can be planned on a laptop.

Placement:
- attention (+ its norms and KV cache) of layer i -> the ``attention`` devices, layers split evenly;
- dense MLPs, routers, shared experts -> the ``dense`` devices, split the same way; the
  embedding on the first dense device, the final norm and lm_head on the last;
- routed experts -> the ``experts`` devices in priority order; every device but the last holds
  what the expert policy gives it, the last holds the rest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from kt_core.config.schema import choice
from kt_core.config.validate import GIB, DeviceSlot, ResolvedTopology
from kt_core.errors import KtError
from kt_core.models.shapes import TensorInfo, model_tensors
from kt_core.models.spec import ModelSpec
from kt_core.placement.fit import PlanDoesNotFit, fit_error, fitting_overrides  # noqa: F401 (plan.X names)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# (memory GB/s, dense bf16 TFLOPS) assumed for a kind when the config gives none
KIND_DEFAULTS = {"cuda": (900.0, 150.0), "rocm": (800.0, 120.0), "xpu": (450.0, 60.0), "ascend": (800.0, 150.0),
                 "cpu": (40.0, 1.0)}


@dataclass
class DevicePlan:
    slot: DeviceSlot
    budget_bytes: int
    weights_bytes: int = 0
    kv_bytes: int = 0
    activation_bytes: int = 0
    reserve_bytes: int = 0
    experts: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> expert ids held (sorted)
    roles: set[str] = field(default_factory=set)
    bandwidth_gbps: float = 0.0
    tflops: float = 0.0
    assumed_speed: bool = False
    decode_bytes: float = 0.0  # bytes read per decoded token
    decode_flops: float = 0.0
    decode_s: float = 0.0
    dense_params: int = 0  # non-expert parameters a decode step multiplies with (not the embedding)
    embed_bytes: int = 0  # the embedding table: one row read per token, not the whole table

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    def as_json(self) -> dict:
        return {"weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes,
                "activation_bytes": self.activation_bytes, "reserve_bytes": self.reserve_bytes,
                "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes,
                "fits": self.fits, "roles": sorted(self.roles), "experts_per_layer": self.experts_per_layer(),
                "bandwidth_gbps": self.bandwidth_gbps, "decode_bytes_per_token": int(self.decode_bytes)}

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def experts_per_layer(self) -> float:
        return sum(len(v) for v in self.experts.values()) / len(self.experts) if self.experts else 0.0


@dataclass
class Plan:
    spec: ModelSpec
    devices: dict[str, DevicePlan]  # by slot label
    total_params: int
    layer_attention: dict[int, str]  # layer -> slot label
    layer_dense: dict[int, str]
    strategy: str
    est_decode_tokens_per_s: float = 0.0
    bound_by: str = ""
    topo: Optional[ResolvedTopology] = None  # what it was planned on (fit_error plans again with fixes)
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)

    def experts_of(self, label: str, layer: int) -> list[int]:
        return self.devices[label].experts.get(layer, [])

    def as_json(self) -> dict:
        return {"model": self.spec.arch, "total_params": self.total_params, "strategy": self.strategy,
                "devices": {k: d.as_json() for k, d in self.devices.items()},
                "est_decode_tokens_per_s": self.est_decode_tokens_per_s, "bound_by": self.bound_by}


# ---------------------------------------------------------------- sizes
def tensor_bytes(t: TensorInfo, fmt: str, dtype_bytes: int, group: int, symmetric: bool,
                 int8_group: int = 0) -> int:
    """Bytes of one tensor stored in ``fmt`` (quant formats apply to weight matrices only)."""
    if t.stored is not None:
        return t.stored
    if t.group == "router":
        return t.numel * 4  # float32 at most (a bf16 checkpoint's router stays bf16): an upper bound
    if not t.linear or fmt == "none":
        return t.numel * dtype_bytes
    fused = len(t.shape) == 3  # GPT-OSS fused experts: input dim is -2
    k = t.shape[-2] if fused else t.shape[-1]
    rows = t.numel // k
    # quantize keeps grouped int8's scales and int4's scales and zero points in fp16 (2 bytes)
    if fmt == "int8" and 0 < int8_group < k:
        return t.numel + rows * (k // int8_group) * 2
    if fmt in ("int8", "w8a8"):
        return t.numel + rows * 4
    if fmt == "fp8":
        return t.numel + rows * max(k // group, 1) * 4 if group > 0 else t.numel + rows * 4
    groups = rows * (max(k // group, 1) if group > 0 else 1)  # 0: one group a row
    return t.numel // 2 + groups * 2 * (1 if symmetric else 2)


def kv_bytes_per_token_layer(spec: ModelSpec, dtype_bytes: int, layer: int = 0) -> int:
    if spec.v4 is not None:  # DeepSeek-V4: one key=value head, plus the compressors' features per token
        return (spec.head_dim + spec.v4.extra_dim(layer, spec.head_dim)) * dtype_bytes
    if spec.mla is not None:  # the latent, plus DeepSeek-V3.2's indexer key where the layer runs an indexer
        index = spec.index.head_dim if spec.index is not None and spec.index.runs_at(layer) else 0
        return (spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim + index) * dtype_bytes
    return 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes


def _split(layers: list[int], slots: list[DeviceSlot]) -> dict[int, str]:
    n = len(layers)
    return {layer: slots[min(i * len(slots) // max(n, 1), len(slots) - 1)].label for i, layer in enumerate(layers)}


def _budget(slot: DeviceSlot, cfg: DictConfig, check_devices: bool) -> int:
    d = cfg.device[slot.name]
    if d.memory_gb is not None:
        return int(d.memory_gb * GIB)
    if slot.backend == "cpu":  # the host's RAM, shared by the logical CPU devices (no plugin needed)
        import psutil

        return int(psutil.virtual_memory().total) // max(1, int(d.count or 1))
    from kt_core.backend.registry import registry

    st = registry().status(slot.backend)
    if st.available:
        return registry().get(slot.backend).memory_info(slot.index).total_bytes
    raise KtError(f"device '{slot.name}' is not on this machine, so its memory is unknown; give the budget of "
                  f"each {slot.name} device with device.{slot.name}.memory_gb=N")


def load_stats(path: str, spec: ModelSpec) -> dict[int, list[float]]:
    """Routing statistics written by ``kt profile``: {"layers": {"3": [count per expert]}}."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        layers = {int(k): [float(c) for c in v] for k, v in data["layers"].items()}
    except FileNotFoundError:
        raise KtError(f"routing statistics file not found: {p} (write one with kt profile)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KtError(f"{p} is not a routing statistics file ({exc}); write one with kt profile") from None
    E = spec.moe.num_experts
    bad = [k for k, v in layers.items() if len(v) != E]
    if bad:
        raise KtError(f"{p} has {len(layers[bad[0]])} counts for layer {bad[0]} but the model has {E} experts: "
                      "it belongs to another model")
    return layers


# ---------------------------------------------------------------- expert placement
def _choose(strategy: str, moe_layers: list[int], E: int, pool: dict[int, list[int]], budget_experts: int,
            per_layer: Optional[int], freq: dict[int, list[float]], explicit: dict[int, list[int]]) -> dict[int, list[int]]:
    """Experts one hot device takes from the remaining ``pool`` (layer -> free expert ids)."""
    rank = lambda layer, ids: sorted(ids, key=lambda e: (-freq[layer][e], e)) if layer in freq else sorted(ids)  # noqa: E731
    take: dict[int, list[int]] = {}
    if strategy == "explicit":
        for layer, ids in explicit.items():
            chosen = [e for e in ids if e in pool.get(layer, [])]
            take[layer] = chosen
        return take
    if strategy in ("uniform", "auto") and not (strategy == "auto" and freq):
        n = per_layer if per_layer is not None else budget_experts // max(len(moe_layers), 1)
        for layer in moe_layers:
            take[layer] = rank(layer, pool[layer])[: min(n, E)]
        return take
    if strategy == "front_loading":
        left = budget_experts if per_layer is None else per_layer * len(moe_layers)
        for layer in moe_layers:
            k = min(left, len(pool[layer]))
            take[layer] = rank(layer, pool[layer])[:k]
            left -= k
        return take
    # frequency (and auto with statistics): the globally most-used (layer, expert) pairs
    if not freq:
        raise KtError("topology.expert_policy.strategy=frequency needs routing statistics "
                      "(topology.expert_policy.stats_file, written by kt profile)")
    pairs = sorted(((freq.get(layer, [0.0] * E)[e], layer, e) for layer in moe_layers for e in pool[layer]),
                   key=lambda p: (-p[0], p[1], p[2]))
    limit = budget_experts if per_layer is None else per_layer * len(moe_layers)
    for _, layer, e in pairs[:limit]:
        take.setdefault(layer, []).append(e)
    return take


def make_plan(spec: ModelSpec, cfg: DictConfig, topo: ResolvedTopology, check_devices: bool = False,
              enforce_fit: bool = True, tensors: Optional[list[TensorInfo]] = None) -> Plan:
    """The plan; with ``enforce_fit`` a plan over any device's budget raises ``PlanDoesNotFit``
    (one line naming every such device and overrides that fit them all)."""
    dtype_bytes = DTYPE_BYTES[choice(cfg.model.dtype)]
    q = cfg.quant
    qe, qd, group, sym = choice(q.experts), choice(q.dense), int(q.group_size), bool(q.symmetric)
    qh = choice(q.head) if q.get("head") is not None else qd
    # what each group's tensors are stored in: the embedding stays in model.dtype (a lookup table)
    fmt_of = {"experts": qe, "embed": "none", "lm_head": qh}
    tensors = tensors if tensors is not None else model_tensors(spec)
    total_params = sum(t.numel for t in tensors)
    used = topo.used
    devices = {s.label: DevicePlan(s, _budget(s, cfg, check_devices)) for s in used}
    for s in used:
        d, dc = devices[s.label], cfg.device[s.name]
        d.reserve_bytes = int(dc.reserve_gb * GIB)
        bw, tf = KIND_DEFAULTS.get(s.backend, KIND_DEFAULTS["cuda"])
        d.bandwidth_gbps, d.tflops = dc.bandwidth_gbps or bw, dc.tflops or tf
        d.assumed_speed = dc.bandwidth_gbps is None
    layers = list(range(spec.num_layers))
    attn_of, dense_of = _split(layers, topo.roles["attention"]), _split(layers, topo.roles["dense"])
    first_dense, last_dense = topo.roles["dense"][0].label, topo.roles["dense"][-1].label
    per_expert: dict[int, int] = {}
    expert_total: dict[int, int] = {}
    qdown = choice(q.experts_down) if q.get("experts_down") is not None else qe
    int8_group = int(q.get("int8_group_size") or 0)  # read once: a config lookup per tensor cost seconds
    for t in tensors:
        fmt = fmt_of.get(t.group, qd)
        if t.group == "experts" and (".down_proj" in t.name or ".w2." in t.name):
            fmt = qdown
        b = tensor_bytes(t, fmt, dtype_bytes, group, sym, int8_group)
        if t.group == "experts":  # per-expert tensors, or GPT-OSS's fused [E, ...] ones
            per_expert[t.layer] = per_expert.get(t.layer, 0) + (b if t.expert is None else 0)
            expert_total[t.layer] = expert_total.get(t.layer, 0) + b
            continue
        where = {"embed": first_dense, "lm_head": last_dense}.get(t.group)
        if where is None:
            if t.layer is None:
                where = last_dense  # final norm
            else:
                where = attn_of[t.layer] if t.group in ("attention", "norm") else dense_of[t.layer]
        devices[where].weights_bytes += b
        if t.group == "embed":
            devices[where].embed_bytes += b
        elif t.linear or t.group == "router":
            devices[where].dense_params += t.numel
        devices[where].roles.add({"embed": "dense", "lm_head": "dense", "norm": "attention"}.get(t.group, t.group))
    per_expert = {layer: total // spec.moe.num_experts for layer, total in expert_total.items()}
    # KV and activations
    kv_tokens = cfg.plan.kv_tokens or int(cfg.model.max_seq_len) * int(cfg.plan.batch)
    for layer, label in attn_of.items():
        if spec.is_linear(layer):  # Qwen3-Next's linear attention: a fixed state per running sequence
            devices[label].kv_bytes += spec.linear.state_bytes(dtype_bytes) * int(cfg.plan.batch)
        else:
            devices[label].kv_bytes += kv_bytes_per_token_layer(spec, dtype_bytes, layer) * kv_tokens
    chunk = int(cfg.plan.prefill_chunk)
    inter = max(spec.intermediate_size, (spec.moe.top_k * spec.moe.intermediate) if spec.moe else 0)
    for label in {*attn_of.values(), *dense_of.values()}:
        devices[label].activation_bytes = chunk * (8 * spec.hidden_size + 3 * inter) * 4 + chunk * spec.vocab_size * 4
    # experts
    strategy = choice(cfg.topology.expert_policy.strategy)
    moe_layers = sorted(spec.moe_layers)
    if moe_layers:
        _place_experts(spec, cfg, topo, devices, moe_layers, per_expert, strategy)
    plan = Plan(spec, devices, total_params, attn_of, dense_of, strategy, topo=topo, tensors=tensors)
    per_expert_params: dict[int, int] = {}  # parameters of one expert (expert 0, or a slice of fused ones)
    for t in tensors:
        if t.group == "experts" and t.linear:
            n = t.numel if t.expert is not None else t.numel // spec.moe.num_experts
            if t.expert in (None, 0):
                per_expert_params[t.layer] = per_expert_params.get(t.layer, 0) + n
    _estimate(plan, cfg, per_expert, per_expert_params, dtype_bytes)
    if enforce_fit:
        problem = fit_error(plan, cfg)
        if problem:
            raise problem
    return plan


def _place_experts(spec, cfg, topo, devices, moe_layers, per_expert, strategy) -> None:
    pol, E = cfg.topology.expert_policy, spec.moe.num_experts
    freq = load_stats(pol.stats_file, spec) if pol.stats_file else {}
    explicit = {int(k): [int(e) for e in v] for k, v in (pol.layers or {}).items()}
    bad = [k for k in explicit if k not in spec.moe_layers]
    if bad:
        raise KtError(f"topology.expert_policy.layers names layer {bad[0]}, which is not an MoE layer "
                      f"(MoE layers: {moe_layers[0]}..{moe_layers[-1]})")
    pool = {layer: list(range(E)) for layer in moe_layers}
    slots = topo.roles["experts"]
    bpe = max(per_expert.values())
    for i, slot in enumerate(slots):
        d = devices[slot.label]
        d.roles.add("experts")
        last = i == len(slots) - 1
        if last:
            chosen = pool
        else:
            room = d.budget_bytes - d.total_bytes
            per_layer = pol.per_device
            if per_layer is None and pol.fraction is not None:
                per_layer = int(round(pol.fraction * E))
            chosen = _choose(strategy if not (strategy == "explicit" and i > 0) else "uniform", moe_layers, E, pool,
                             max(room, 0) // bpe, per_layer if not (strategy == "explicit" and i > 0) else 0,
                             freq, explicit)
        for layer, ids in chosen.items():
            if not ids:
                continue
            d.experts[layer] = sorted(d.experts.get(layer, []) + list(ids))
            d.weights_bytes += len(ids) * per_expert[layer]
        for layer, ids in chosen.items():
            taken = set(ids)
            pool[layer] = [e for e in pool.get(layer, []) if e not in taken]


def _estimate(plan: Plan, cfg: DictConfig, per_expert: dict[int, int], per_expert_params: dict[int, int],
              dtype_bytes: int) -> None:
    """Roofline decode estimate at batch 1: each share costs max(bytes / bandwidth,
    2 * params / peak FLOPS) on its device; per MoE layer the expert shares of the devices
    overlap (the slowest counts), everything else runs one after the other."""
    spec, ctx = plan.spec, int(cfg.plan.context_tokens)
    dev = plan.devices

    def cost(d: DevicePlan, nbytes: float, flops: float) -> float:
        return max(nbytes / (d.bandwidth_gbps * 1e9), flops / (d.tflops * 1e12))

    serial = 0.0
    for label, d in dev.items():
        expert_bytes = sum(len(v) * per_expert[k] for k, v in d.experts.items())
        d.decode_bytes = float(d.weights_bytes - expert_bytes - d.embed_bytes)
        d.decode_flops = 2.0 * d.dense_params
    for layer, label in plan.layer_attention.items():  # the KV a token reads (a linear layer: its state)
        dev[label].decode_bytes += spec.linear.state_bytes(dtype_bytes) if spec.is_linear(layer) else \
            kv_bytes_per_token_layer(spec, dtype_bytes, layer) * ctx
    for d in dev.values():
        serial += cost(d, d.decode_bytes, d.decode_flops)
    k = spec.moe.top_k if spec.moe else 0
    overlap = 0.0
    for layer in sorted(spec.moe_layers):
        shares = []
        for d in dev.values():
            held = len(d.experts.get(layer, []))
            if held:
                routes = k * held / spec.moe.num_experts
                b, f = routes * per_expert[layer], 2.0 * routes * per_expert_params[layer]
                d.decode_bytes += b
                d.decode_flops += f
                shares.append(cost(d, b, f))
        overlap += max(shares, default=0.0)
    for d in dev.values():
        d.decode_s = cost(d, d.decode_bytes, d.decode_flops)
    total = serial + overlap
    plan.est_decode_tokens_per_s = 1.0 / total if total > 0 else 0.0
    plan.bound_by = max(dev, key=lambda label: dev[label].decode_s)


def count_params(spec: ModelSpec) -> int:
    return sum(t.numel for t in model_tensors(spec))


def describe(plan: Plan) -> str:
    """The human-readable table ``kt plan`` prints."""
    s = plan.spec
    moe = f", {len(s.moe_layers)} MoE layers x {s.moe.num_experts} experts (top-{s.moe.top_k})" if s.moe else ""
    lines = [f"model {s.arch}: {plan.total_params / 1e9:.2f}B parameters, {s.num_layers} layers{moe}",
             "", f"{'device':<8} {'weights':>10} {'kv cache':>10} {'activ.':>9} {'reserve':>9} {'total':>10} "
                 f"{'budget':>10}  experts/layer  roles"]
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    for label, d in plan.devices.items():
        over = "  OVER BUDGET" if d.total_bytes > d.budget_bytes else ""
        lines.append(f"{label:<8} {g(d.weights_bytes):>10} {g(d.kv_bytes):>10} {g(d.activation_bytes):>9} "
                     f"{g(d.reserve_bytes):>9} {g(d.total_bytes):>10} {g(d.budget_bytes):>10}  "
                     f"{d.experts_per_layer():>13.1f}  {','.join(sorted(d.roles))}{over}")
    assumed = [label for label, d in plan.devices.items() if d.assumed_speed]
    lines += ["", f"expert strategy: {plan.strategy}",
              f"estimated decode: {plan.est_decode_tokens_per_s:.1f} tokens/s at batch 1, bound by {plan.bound_by} "
              f"({plan.devices[plan.bound_by].decode_bytes / 1e9:.2f} GB read per token at "
              f"{plan.devices[plan.bound_by].bandwidth_gbps:.0f} GB/s)"]
    if assumed:
        lines.append(f"(bandwidth assumed for {', '.join(assumed)}: set device.<name>.bandwidth_gbps to refine)")
    return "\n".join(lines)


__all__ = ["Plan", "DevicePlan", "PlanDoesNotFit", "make_plan", "describe", "count_params", "tensor_bytes",
           "fit_error", "fitting_overrides"]
