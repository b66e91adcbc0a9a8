"""Token sampling on torch: temperature, top-k, top-p, min-p; greedy at temperature 0."""
from __future__ import annotations

from typing import Optional

import torch


def sampling_probs(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    temperature = temperature.to(dev).float().reshape(B)
    greedy = temperature <= 0
    x = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    # top-k: keep values >= the k-th largest of the row (ties kept)
    k = top_k.to(dev).long().reshape(B)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    sorted_x, sorted_idx = x.sort(dim=-1, descending=True)
    kth = sorted_x.gather(1, (k - 1)[:, None])
    x = x.masked_fill(x < kth, float("-inf"))
    # top-p: smallest prefix of the sorted distribution whose mass reaches p
    p = top_p.to(dev).float().reshape(B)
    sorted_probs = torch.softmax(x, dim=-1).gather(1, sorted_idx)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = (mass_before >= p[:, None]) & (p[:, None] < 1.0)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, sorted_idx, drop_sorted)
    x = x.masked_fill(drop, float("-inf"))
    # min-p: drop tokens below min_p times the top probability
    probs = torch.softmax(x, dim=-1)
    mp = min_p.to(dev).float().reshape(B)
    floor = probs.amax(dim=-1, keepdim=True) * mp[:, None]
    probs = probs.masked_fill((probs < floor) & (mp[:, None] > 0), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample(logits, temperature, top_k, top_p, min_p, generator: Optional[torch.Generator] = None):
    greedy = temperature.to(logits.device).reshape(-1) <= 0
    if bool(greedy.all()):  # nothing to draw: skip the sort and softmax over the vocabulary
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(greedy, logits.argmax(dim=-1), ids)
