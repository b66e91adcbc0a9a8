"""Paged KV cache: fixed-size blocks per layer, a block table per sequence.

Layouts (see the device contract): MHA/GQA caches are ``k`` and ``v`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; MLA keeps one latent cache
``[num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]`` (the compressed
KV plus the roped key part) and no separate values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kt_core.errors import KtError


@dataclass
class Batch:
    """What one forward step needs to know about the tokens it processes."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length including the new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    is_decode: bool
    logits_rows: torch.Tensor  # rows of the hidden states whose logits are wanted

    def to(self, device: torch.device) -> "Batch":
        """The same step described with tensors on ``device`` (layers on several devices)."""
        if self.tokens.device == device:
            return self
        mv = lambda t: t.to(device)  # noqa: E731
        return Batch(mv(self.tokens), mv(self.positions), mv(self.query_start_loc), mv(self.seq_lens),
                     mv(self.block_tables), mv(self.slot_mapping), self.is_decode, mv(self.logits_rows))


@dataclass
class SeqState:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, latent: bool = False,
                 layer_devices: Optional[list[torch.device]] = None) -> None:
        """``layer_devices``: where each layer's blocks live (default: all on ``device``)."""
        self.block_size, self.num_blocks, self.latent = block_size, num_blocks, latent
        shape = (num_blocks, block_size, 1 if latent else kv_heads, head_dim)
        devs = layer_devices or [device] * num_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devs]
        self.v: list[Optional[torch.Tensor]] = (
            [None] * num_layers if latent else [torch.zeros(shape, dtype=dtype, device=d) for d in devs])
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.seqs: dict[int, SeqState] = {}
        self.device = device

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + [v for v in self.v if v is not None])

    def _grow(self, seq: SeqState, new_len: int) -> None:
        need = (new_len + self.block_size - 1) // self.block_size - len(seq.blocks)
        if need > len(self.free_blocks):
            raise KtError(f"KV cache is full: {need} more blocks needed, {len(self.free_blocks)} free of "
                          f"{self.num_blocks}; shorten the prompt/max_new_tokens or give the cache more memory")
        for _ in range(max(need, 0)):
            seq.blocks.append(self.free_blocks.pop())

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.free_blocks.extend(reversed(seq.blocks))

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length if seq_id in self.seqs else 0

    def prepare(self, seq_ids: list[int], new_tokens: list[list[int]], all_logits: bool = False) -> Batch:
        """Reserve slots for each sequence's new tokens and describe the step."""
        tokens, positions, slots, starts, lens, tables = [], [], [], [0], [], []
        rows = []
        for sid, toks in zip(seq_ids, new_tokens):
            seq = self.seqs.setdefault(sid, SeqState())
            start = seq.length
            self._grow(seq, start + len(toks))
            for j, tok in enumerate(toks):
                pos = start + j
                tokens.append(tok)
                positions.append(pos)
                slots.append(seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            seq.length += len(toks)
            rows.extend(range(starts[-1], starts[-1] + len(toks)) if all_logits else [starts[-1] + len(toks) - 1])
            starts.append(starts[-1] + len(toks))
            lens.append(seq.length)
            tables.append(seq.blocks)
        width = max(len(t) for t in tables)
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        dev = self.device
        return Batch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            is_decode=all(len(t) == 1 for t in new_tokens),
            logits_rows=torch.tensor(rows, dtype=torch.long, device=dev),
        )
