"""Routing statistics: how often each expert of each MoE layer is chosen, for the planner's
``frequency`` and ``auto`` strategies. Written as JSON (never pickled):
``{"model": ..., "num_experts": E, "top_k": k, "tokens": N, "layers": {"3": [count per expert]}}``."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from kt_core.models.layers import MoEBlock


class RoutingStats:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens = 0

    def __call__(self, layer: int, ids: torch.Tensor) -> None:
        c = torch.bincount(ids.reshape(-1).cpu(), minlength=self.num_experts)
        self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c

    def as_json(self, model: str, top_k: int) -> dict:
        return {"model": model, "num_experts": self.num_experts, "top_k": top_k, "tokens": self.tokens,
                "layers": {str(k): v.tolist() for k, v in sorted(self.counts.items())}}

    def write(self, path: Path, model: str, top_k: int) -> None:
        """Atomically: a crash mid-write never leaves a half file where a good one was."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.as_json(model, top_k)), encoding="utf-8")
        os.replace(tmp, path)


@contextmanager
def record_routing(engine) -> Iterator[RoutingStats]:
    """Collect routing counts of every MoE layer while the block runs."""
    if engine.spec.moe is None:
        from kt_core.errors import KtError

        raise KtError(f"{engine.spec.arch} has no MoE layers: there is no routing to profile")
    stats = RoutingStats(engine.spec.moe.num_experts)
    blocks = [layer.ffn for layer in engine.model.layers if isinstance(layer.ffn, MoEBlock)]
    for b in blocks:
        b.recorder = stats
    try:
        yield stats
    finally:
        for b in blocks:
            b.recorder = None
