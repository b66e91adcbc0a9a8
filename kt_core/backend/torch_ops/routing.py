"""MoE routers on torch: softmax / sigmoid / softmax-after-top-k, grouped top-k."""
from __future__ import annotations

from typing import Optional

import torch

SCORINGS = ("softmax", "sigmoid", "softmax_topk", "sqrtsoftplus")


def expert_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Each expert's score (float32) before the choice: softmax, sigmoid, or DeepSeek-V4's sqrt(softplus)."""
    if scoring == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if scoring == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits.float()).sqrt()
    return torch.sigmoid(logits.float())


def route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = True,
          n_group: int = 1, topk_group: int = 1, bias: Optional[torch.Tensor] = None,
          routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown router scoring {scoring!r}; supported: {', '.join(SCORINGS)}")
    T, E = logits.shape
    if not 0 < top_k <= E:
        raise ValueError(f"top_k={top_k} must be in 1..{E} (the number of experts)")
    logits = logits.float()
    if scoring == "softmax" and bias is None and n_group == 1:
        # the same numbers in 2-3 ops instead of 6 (a decode step routes every layer): softmax is
        # monotonic, so the top-k of the logits are the top-k of the scores, and renormalized
        # top-k probabilities are the softmax of the top-k logits
        vals, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(vals, dim=-1) if renormalize else torch.exp(vals - logits.logsumexp(-1, keepdim=True))
        return (weights if routed_scaling_factor == 1.0 else weights * routed_scaling_factor), ids
    if scoring == "softmax_topk":
        vals, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(vals, dim=-1) * routed_scaling_factor, ids
    scores = expert_scores(logits, scoring)
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        if E % n_group or not 0 < topk_group <= n_group:
            raise ValueError(f"grouped routing needs n_group ({n_group}) to divide the experts ({E}) "
                             f"and 1 <= topk_group ({topk_group}) <= n_group")
        grouped = choice.view(T, n_group, E // n_group)
        if scoring == "sigmoid":
            group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(dim=-1)
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * routed_scaling_factor, ids
