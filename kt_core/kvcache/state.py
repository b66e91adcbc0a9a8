"""Per-sequence recurrent state of linear-attention layers (Qwen3-Next's Gated DeltaNet).

Next to the paged KV cache of the attention layers, each linear-attention layer keeps, per running
sequence, a float32 recurrent state ``[Hv, dk, dv]`` and the last ``K - 1`` inputs of its short
convolution ``[C, K - 1]``. They live in pools indexed by the sequence's *slot* (the device
contract's ``gated_delta_rule`` / ``causal_conv1d`` read and update rows of them in place): a slot
is taken, zeroed, when a sequence first runs, and returned when it is freed, so continuous batching
carries each sequence's state from step to step whatever else joins or leaves the batch. The pools
grow (doubling) when more sequences run at once than they hold.

With the prefix cache on, the state a sequence has when its length reaches a block boundary is
*snapshotted* to host memory under that block's chain hash (``save``), and a later request that
shares the prefix starts from the snapshot (``restore``) and reuses the KV blocks up to it: the
prefix cache reuses a prefix of such a model only up to its last snapshotted block. Snapshots are
an LRU capped at ``SNAPSHOT_BYTES`` (never fewer than two); they are not written to disk.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from kt_core.models.spec import LinearAttnSpec

SNAPSHOT_BYTES = 1 << 30


class StatePool:
    def __init__(self, spec: LinearAttnSpec, layers: list[int], dtype: torch.dtype,
                 devices: dict[int, torch.device], slots: int = 4) -> None:
        self.spec, self.layers, self.dtype, self.devices = spec, list(layers), dtype, devices
        self.capacity = 0
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.free: list[int] = []
        self.of: dict[int, int] = {}  # sequence id -> slot
        self.snapshots: "OrderedDict[bytes, list[torch.Tensor]]" = OrderedDict()  # block hash -> state, LRU first
        self.snapshot_cap = SNAPSHOT_BYTES
        self._grow(max(int(slots), 1))

    def _grow(self, capacity: int) -> None:
        s = self.spec
        for i in self.layers:
            conv = torch.zeros(capacity, s.conv_dim, s.conv_kernel - 1, dtype=self.dtype, device=self.devices[i])
            ssm = torch.zeros(capacity, s.num_v_heads, s.k_dim, s.v_dim, dtype=torch.float32, device=self.devices[i])
            if self.capacity:
                conv[: self.capacity] = self.conv[i]
                ssm[: self.capacity] = self.ssm[i]
            self.conv[i], self.ssm[i] = conv, ssm
        self.free = list(range(capacity - 1, self.capacity - 1, -1)) + self.free
        self.capacity = capacity

    def slot(self, seq_id: int) -> int:
        """The sequence's slot, taken (with zeroed state) on its first step."""
        if seq_id in self.of:
            return self.of[seq_id]
        if not self.free:
            self._grow(self.capacity * 2)
        slot = self.free.pop()
        for i in self.layers:
            self.conv[i][slot].zero_()
            self.ssm[i][slot].zero_()
        self.of[seq_id] = slot
        return slot

    def release(self, seq_id: int) -> None:
        slot = self.of.pop(seq_id, None)
        if slot is not None:
            self.free.append(slot)

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(convolution windows [S, C, K - 1], recurrent states [S, Hv, dk, dv]) of one layer."""
        return self.conv[layer], self.ssm[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.conv.values(), *self.ssm.values()])

    # ---- snapshots at block boundaries (the prefix cache) ---------------------------------
    def per_sequence_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in [*self.conv.values(), *self.ssm.values()])

    def has(self, h: bytes) -> bool:
        return h in self.snapshots

    def save(self, seq_id: int, h: bytes) -> None:
        """Keep the sequence's current state (all layers) on the host under block hash ``h``."""
        if h in self.snapshots:
            self.snapshots.move_to_end(h)
            return
        slot = self.of[seq_id]
        self.snapshots[h] = [t[slot].to("cpu", copy=True) for i in self.layers for t in (self.conv[i], self.ssm[i])]
        keep = max(self.snapshot_cap // max(self.per_sequence_bytes(), 1), 2)
        while len(self.snapshots) > keep:
            self.snapshots.popitem(last=False)

    def restore(self, seq_id: int, h: bytes) -> None:
        """Start the sequence from the state saved under ``h``."""
        self.snapshots.move_to_end(h)
        slot, parts = self.slot(seq_id), iter(self.snapshots[h])
        for i in self.layers:
            self.conv[i][slot].copy_(next(parts))
            self.ssm[i][slot].copy_(next(parts))
