"""Paged KV-cache maintenance on torch."""
from __future__ import annotations

from typing import Sequence

import torch


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    slots = slot_mapping.to(k_cache.device).long()
    valid = slots >= 0
    if not bool(valid.all()):
        k, slots = k[valid], slots[valid]
        v = None if v is None else v[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
    if v_cache is not None:
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)


def copy_blocks(caches: Sequence[torch.Tensor], block_mapping: torch.Tensor) -> None:
    if block_mapping.numel() == 0:
        return
    for cache in caches:
        m = block_mapping.to(cache.device).long()
        cache[m[:, 1]] = cache[m[:, 0]]


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_mapping: torch.Tensor) -> None:
    if block_mapping.numel() == 0:
        return
    m = block_mapping.long().cpu()
    moved = src[m[:, 0].to(src.device)].to(dst.device, non_blocking=True)
    dst[m[:, 1].to(dst.device)] = moved
