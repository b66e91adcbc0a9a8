"""Paged KV cache: fixed-size blocks per layer, a block table per sequence.

Layouts (see the device contract): MHA/GQA caches are ``k`` and ``v`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; MLA keeps one latent cache
``[num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]`` (the compressed
KV plus the roped key part) and no separate values.

Blocks are reference-counted so that full blocks can be shared between sequences
with the same prefix (``kt_core.kvcache.prefix``). A block is *free* (on the free
list), *used* (referenced by at least one sequence) or *idle* (unreferenced but
still holding a cached prefix, evictable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from kt_core.errors import KtError

if TYPE_CHECKING:
    from kt_core.kvcache.prefix import PrefixCache
    from kt_core.kvcache.state import StatePool


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
    state_slots: Optional[torch.Tensor] = None  # [B] int64: each sequence's linear-attention state slot

    def to(self, device: torch.device) -> "Batch":
        """The same step described with tensors on ``device`` (layers on several devices)."""
        if self.tokens.device == device:
            return self
        mv = lambda t: t.to(device)  # noqa: E731
        return Batch(mv(self.tokens), mv(self.positions), mv(self.query_start_loc), mv(self.seq_lens),
                     mv(self.block_tables), mv(self.slot_mapping), self.is_decode, mv(self.logits_rows),
                     None if self.state_slots is None else mv(self.state_slots))


@dataclass
class SeqState:
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks, in order
    seed: Optional[bytes] = None  # its chain's seed when a cache salt scopes it (PrefixCache.salted), else the cache's


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, latent: bool = False,
                 layer_devices: Optional[list[torch.device]] = None, states: Optional["StatePool"] = None,
                 index_dim: int = 0, index_layers: Optional[list[int]] = None,
                 extra_dims: Optional[list[int]] = None) -> None:
        """``layer_devices``: where each layer's blocks live (default: all on ``device``). ``states``:
        the recurrent state of the linear-attention layers (they have no KV blocks). ``index_dim``:
        DeepSeek-V3.2's indexer keys, a third per-layer cache ``[num_blocks, block_size, 1, index_dim]``
        (blocks hold them too, so the prefix cache keeps them with the latent), for ``index_layers``
        (default: all). ``extra_dims``: instead, each layer's own width of that third cache (0: none;
        DeepSeek-V4's compressor features)."""
        self.block_size, self.num_blocks, self.latent = block_size, num_blocks, latent
        self.dtype = dtype
        self.block_shape = (block_size, 1 if latent else kv_heads, head_dim)
        shape = (num_blocks, *self.block_shape)
        devs = layer_devices or [device] * num_layers
        self.states = states
        stateful = set(states.layers) if states is not None else set()
        self.k: list[Optional[torch.Tensor]] = [None if i in stateful else torch.zeros(shape, dtype=dtype, device=d)
                                                for i, d in enumerate(devs)]
        self.v: list[Optional[torch.Tensor]] = (
            [None] * num_layers if latent else [None if k is None else torch.zeros(shape, dtype=dtype, device=k.device)
                                                for k in self.k])
        indexed = set(range(num_layers) if index_layers is None else index_layers)
        dims = extra_dims or [index_dim if i in indexed else 0 for i in range(num_layers)]
        self.idx: list[Optional[torch.Tensor]] = [
            torch.zeros(num_blocks, block_size, 1, dims[i], dtype=dtype, device=d) if dims[i] else None
            for i, d in enumerate(devs)]
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.refs = [0] * num_blocks
        self.seqs: dict[int, SeqState] = {}
        self.device = device
        self.prefix: Optional["PrefixCache"] = None

    @property
    def layout(self) -> str:
        return "mla-latent" if self.latent else "mha"

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return sum(1 for r in self.refs if r > 0)

    @property
    def available_blocks(self) -> int:
        """Blocks a new sequence could get: free ones plus idle cached ones (evictable)."""
        return len(self.free_blocks) + (self.prefix.idle_count if self.prefix else 0)

    @property
    def parts(self) -> list[torch.Tensor]:
        """The block caches, one tensor per attention layer's K, then V (or indexer keys): a block's contents."""
        return [t for t in self.k + self.v + self.idx if t is not None]

    def layer_caches(self, i: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What layer ``i`` reads and writes: its K / V caches (MLA: the latent and, with sparse attention,
        the indexer keys), or its state pools (linear attention)."""
        if self.k[i] is None and self.states is not None:
            return self.states.pools(i)
        return self.k[i], self.idx[i] if self.latent else self.v[i]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts) + (self.states.nbytes() if self.states else 0)

    def block_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.parts)

    @property
    def part_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape[1:]) for t in self.parts]

    # ---- allocation -------------------------------------------------------------
    def alloc(self) -> int:
        if self.free_blocks:
            b = self.free_blocks.pop()
        elif self.prefix is not None and self.prefix.idle_count:
            b = self.prefix.evict_one()
        else:
            raise KtError(f"KV cache is full: all {self.num_blocks} blocks are in use; shorten the prompt/"
                          "max_new_tokens, lower the batch or give the cache more memory (plan.kv_tokens)")
        self.refs[b] = 1
        return b

    def release_block(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0 and not (self.prefix is not None and self.prefix.park(b)):
            self.free_blocks.append(b)

    def _grow(self, seq: SeqState, new_len: int) -> None:
        need = (new_len + self.block_size - 1) // self.block_size - len(seq.blocks)
        if need > self.available_blocks:
            raise KtError(f"KV cache is full: {need} more blocks needed, {self.available_blocks} available of "
                          f"{self.num_blocks}; shorten the prompt/max_new_tokens or give the cache more memory")
        for _ in range(max(need, 0)):
            seq.blocks.append(self.alloc())

    def free(self, seq_id: int) -> None:
        if self.states is not None:
            self.states.release(seq_id)
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            for b in reversed(seq.blocks):
                self.release_block(b)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length if seq_id in self.seqs else 0

    # ---- prefix sharing -----------------------------------------------------------
    def attach_prefix(self, seq_id: int, tokens: list[int], salt: Optional[str] = None) -> int:
        """Start ``seq_id`` with the longest cached prefix of ``tokens`` (whole blocks, leaving
        at least one token to compute). Returns the number of tokens whose KV is reused. ``salt``
        (a request's ``cache_salt``): the sequence shares blocks only with sequences of the same salt."""
        if self.prefix is None or seq_id in self.seqs:
            return 0
        seq = self.seqs[seq_id] = SeqState(seed=self.prefix.salted(salt) if salt else None)
        # a model with linear-attention state reuses a prefix only up to a block whose state was kept
        usable = self.states.has if self.states is not None else None
        seq.blocks, seq.hashes = self.prefix.lookup(tokens, (len(tokens) - 1) // self.block_size, usable, seq.seed)
        seq.length = len(seq.blocks) * self.block_size
        if self.states is not None and seq.hashes:
            self.states.restore(seq_id, seq.hashes[-1])
        return seq.length

    def commit(self, seq_id: int, tokens: list[int]) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache (``tokens``: every
        token of the sequence so far)."""
        if self.prefix is not None and seq_id in self.seqs:
            seq = self.seqs[seq_id]
            self.prefix.register(seq, tokens)
            if self.states is not None and seq.length and seq.length % self.block_size == 0 and \
                    len(seq.hashes) == seq.length // self.block_size:
                self.states.save(seq_id, seq.hashes[-1])  # the state right at this block boundary

    # ---- one step ------------------------------------------------------------------
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
            state_slots=None if self.states is None else torch.tensor([self.states.slot(sid) for sid in seq_ids],
                                                                      dtype=torch.long, device=dev),
        )

    # ---- block contents (prefix-cache tiers) ----------------------------------------
    def read_block(self, b: int) -> list[torch.Tensor]:
        """Copies of block ``b`` of every layer on the host: K of each layer, then V of each layer."""
        return [p[b].to("cpu", copy=True) for p in self.parts]

    def write_block(self, b: int, parts: list[torch.Tensor]) -> None:
        for cache, p in zip(self.parts, parts):
            cache[b].copy_(p.to(cache.device, non_blocking=True))
