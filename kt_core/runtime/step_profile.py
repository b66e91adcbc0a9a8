"""Where a forward step's time goes, per part, next to the bytes each part must stream.

While ``StepProfiler(engine).active()`` is entered, the model's parts are wrapped: attention
projections, attention itself (with the KV write), norms and rope, the router, the MoE experts,
dense MLPs / shared experts and the lm_head. Each call is timed (the devices synchronised around
it) and summed per part, separately for prefill and decode steps; what the step spends outside
those parts is ``other`` (embedding lookup, residual adds, Python). Decoder layers a device runs
whole, in one call (the CPU's native decode layers), are the part ``layers``, with the weight bytes
of the parts inside them; ``KT_FUSED_DECODE=0`` runs them op by op, to split them. ``report(phase, bandwidth)``
gives per part the ms per step, the weight bytes a decode token reads, the roofline ms of those
bytes at the measured bandwidth, and the part's share of the step beside its roofline share.
``bench/profile_step.py`` drives it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from kt_core.models.layers import Attention, DenseMLP, MLAttention, MoEBlock

PARTS = ("layers", "attn_proj", "attention", "norm_rope", "router", "moe", "dense_mlp", "lm_head", "other")
_IN_LAYERS = ("attn_proj", "attention", "norm_rope", "router", "moe", "dense_mlp")  # what "layers" holds
_ATTN_WEIGHTS = ("q", "k", "v", "qkv", "o", "q_a", "q_b", "kv_a")


def _nbytes(w) -> int:
    if w is None:
        return 0
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if hasattr(w, "nbytes") and callable(w.nbytes):
        return int(w.nbytes())
    return sum(_nbytes(getattr(w, n, None)) for n in ("gate", "up", "down"))  # ExpertWeights


def weight_bytes_per_token(model) -> dict[str, int]:
    """Weight bytes one decode token reads, per part (MoE: top_k experts' worth per layer)."""
    out: dict[str, int] = defaultdict(int)
    for layer in model.layers:
        if isinstance(layer.attn, (Attention, MLAttention)):
            out["attn_proj"] += sum(_nbytes(layer.attn.w.get(k)) for k in _ATTN_WEIGHTS)
        if isinstance(layer.attn, MLAttention):  # MLA decode reads kv_b's absorbed halves
            out["attention"] += _nbytes(layer.attn.w_uk) + _nbytes(layer.attn.w_uv)
        ffn = layer.ffn
        if isinstance(ffn, MoEBlock):
            out["router"] += _nbytes(ffn.router)
            held = sum(_nbytes(ex) for _be, _dev, ex in ffn.shards)
            out["moe"] += held * ffn.moe.top_k // max(1, ffn.moe.num_experts)
            if ffn.shared is not None:
                out["dense_mlp"] += sum(_nbytes(w) for w in (ffn.shared.gate, ffn.shared.up, ffn.shared.gate_up,
                                                             ffn.shared.down))
        elif isinstance(ffn, DenseMLP):
            out["dense_mlp"] += sum(_nbytes(w) for w in (ffn.gate, ffn.up, ffn.gate_up, ffn.down))
    out["lm_head"] = _nbytes(model.lm_head)
    return dict(out)


class StepProfiler:
    def __init__(self, engine) -> None:
        self.model = engine.model
        self.bytes = weight_bytes_per_token(self.model)
        self.ms: dict[tuple[str, str], float] = defaultdict(float)  # (phase, part) -> ms
        self.steps: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.phase = "decode"
        self._depth = 0  # a part inside a timed part is not timed again
        self._undo: list[Callable[[], None]] = []

    def _sync(self) -> None:
        for layer in (self.model.layers[0], self.model.layers[-1]):
            layer.be.synchronize()

    def _timed(self, part: str, fn: Callable, *args, **kwargs):
        if self._depth:
            return fn(*args, **kwargs)
        self._depth += 1
        self._sync()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._sync()
            self.ms[(self.phase, part)] += (time.perf_counter() - t0) * 1e3
            self._depth -= 1

    def _patch(self, obj, name: str, part, done: set) -> None:
        """Time ``obj.name`` as ``part``: a name, or a function of the call's args giving one."""
        if (id(obj), name) in done:
            return
        done.add((id(obj), name))
        old = getattr(obj, name)
        pick = part if callable(part) else (lambda *a, **k: part)
        self._patch_with(obj, name, lambda *a, **k: self._timed(pick(*a, **k), old, *a, **k))

    def _patch_with(self, obj, name: str, fn: Callable) -> None:
        """Set ``obj.name`` to fn until the profile ends (then the attribute is as it was)."""
        had, old = name in vars(obj), getattr(obj, name)
        setattr(obj, name, fn)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def _step(self, forward: Callable) -> Callable:
        def step(batch, cache):
            self.phase = "decode" if batch.is_decode else "prefill"
            self.steps[self.phase] += 1
            self.tokens[self.phase] += int(batch.tokens.numel())
            self._sync()
            t0 = time.perf_counter()
            try:
                return forward(batch, cache)
            finally:
                self._sync()
                self.ms[(self.phase, "_step")] += (time.perf_counter() - t0) * 1e3
        return step

    @contextmanager
    def active(self) -> Iterator["StepProfiler"]:
        model, done = self.model, set()
        lm_head = model.lm_head
        # a linear inside no other timed part is an attention projection, or the lm_head
        which = lambda x, w, *rest, **kw: "lm_head" if w is lm_head else "attn_proj"  # noqa: E731
        for layer in model.layers:
            be = layer.be
            for name in ("attention_decode", "attention_prefill", "attention_mla", "write_kv"):
                self._patch(be, name, "attention", done)
            for name in ("rmsnorm", "rope"):
                self._patch(be, name, "norm_rope", done)
            self._patch(be, "linear", which, done)
            ffn = layer.ffn
            if isinstance(ffn, MoEBlock):
                self._patch(ffn, "route", "router", done)
                for shard_be, _dev, _ex in ffn.shards:
                    self._patch(shard_be, "moe_experts", "moe", done)
                    self._patch(shard_be, "moe_experts_async", "moe", done)
                if ffn.shared is not None:
                    self._patch(ffn, "shared", "dense_mlp", done)
            elif isinstance(ffn, DenseMLP):
                self._patch(layer, "ffn", "dense_mlp", done)
        self._patch(model.be, "linear", which, done)
        for be in model.backends:  # whole layers in one call: the plan's run is the part "layers"
            plan_of = be.decode_plan

            def timed_plan(m, cache, plan_of=plan_of):
                plan = plan_of(m, cache)
                if plan is not None:
                    self._patch(plan, "run", "layers", done)
                return plan

            self._patch_with(be, "decode_plan", timed_plan)
        forward = model.forward
        model.forward = self._step(forward)
        self._undo.append(lambda: delattr(model, "forward"))
        try:
            yield self
        finally:
            while self._undo:
                self._undo.pop()()

    def report(self, phase: str = "decode", bandwidth_gbps: Optional[float] = None) -> list[dict]:
        """One row per part: ms per step and share of the step; for decode also the weight MB a
        token reads, the roofline ms at ``bandwidth_gbps`` and the roofline share."""
        steps = self.steps.get(phase, 0)
        if not steps:
            return []
        step = self.ms.get((phase, "_step"), 0.0)
        parts = {p: self.ms.get((phase, p), 0.0) for p in PARTS if p != "other"}
        parts["other"] = max(0.0, step - sum(parts.values()))
        nbytes = dict(self.bytes)
        if parts["layers"] > 0:  # the fused layers stream the weights of the parts inside them
            nbytes["layers"] = sum(nbytes.pop(p, 0) for p in _IN_LAYERS)
        roof = {p: nbytes.get(p, 0) / (bandwidth_gbps * 1e9) * 1e3 for p in parts} if bandwidth_gbps else {}
        roof_total = sum(roof.values()) if roof else 0.0
        rows = []
        for p, ms in parts.items():
            per = ms / steps
            r = {"phase": phase, "part": p, "ms_per_step": round(per, 3), "share": round(ms / step, 3) if step else None}
            if phase == "decode":
                r["weight_mb_per_token"] = round(nbytes.get(p, 0) / 1e6, 2)
                r["gbps"] = round(nbytes.get(p, 0) / per / 1e6, 2) if per and nbytes.get(p) else None
                if roof:
                    r["roofline_ms"] = round(roof[p], 3)
                    r["roofline_share"] = round(roof[p] / roof_total, 3) if roof_total else None
            rows.append(r)
        rows.append({"phase": phase, "part": "step", "ms_per_step": round(step / steps, 3), "steps": steps,
                     "tokens_per_step": round(self.tokens[phase] / steps, 1),
                     **({"roofline_ms": round(roof_total, 3)} if roof else {})})
        return rows


def format_table(rows: list[dict]) -> str:
    """The report's rows as a fixed-width table (what ``kt run --profile`` and bench print)."""
    lines = [f"{'phase':8} {'part':14} {'ms/step':>9} {'share':>7} {'MB/token':>9} {'GB/s':>7} {'roof ms':>8} "
             f"{'roof share':>10}"]
    for r in rows:
        lines.append(f"{r['phase']:8} {r['part'][:14]:14} {r.get('ms_per_step', ''):>9} {str(r.get('share', '')):>7} "
                     f"{str(r.get('weight_mb_per_token', '')):>9} {str(r.get('gbps', '')):>7} "
                     f"{str(r.get('roofline_ms', '')):>8} {str(r.get('roofline_share', '')):>10}")
    return "\n".join(lines)


def host_bandwidth_gbps() -> Optional[float]:
    """The host's streaming-read bandwidth measured by the native kernels (None without them)."""
    from kt_backends.cpu import native_lib

    if not native_lib.available():
        return None
    from kt_backends.cpu import native

    return native.memory_bandwidth_gbps()
