"""Prefix cache: reuse the KV of full token blocks across requests, in three tiers.

A full block is named by a chain hash: ``h_i = sha256(h_{i-1} || tokens of block i)``,
seeded with the model's fingerprint, so a hash names the block's whole prefix and
the model that computed it. Tiers, fastest first:

1. **device**: the paged KV cache itself. A finished sequence's hashed blocks stay
   there *idle* (unreferenced, LRU); a new sequence with the same prefix shares them.
2. **host**: when an idle block's slot is needed, its contents move to host RAM
   (LRU, ``host_bytes`` cap).
3. **disk**: a folder with a size cap (LRU by use). Every block is *written through*
   as soon as it is full (named): its contents are copied to host memory on the
   thread that ran the step and queued for one background writer thread, so a crash
   (kill -9, power cut) loses only the last moments of entries, not everything since
   the last clean stop. The queue is bounded: when it is full the write-through of
   that block is skipped (counted in ``DiskTier.queue_full``), the decode step never
   waits for the disk. Host entries pushed out by the host cap also go to disk (in the
   background when the queue has room, else at once, as before), and ``flush()``
   (graceful shutdown) waits for the writer, then writes whatever is still missing.
   An entry already on disk, queued or being written is never written again.

The disk tier itself is kt_core/kvcache/disk_tier.py. Disk entries are written to a temp file and
renamed into place, and carry a header
(format version, model fingerprint, layout, dtype, shape, payload length, sha256).
A truncated or corrupted file, or one from another model or layout, is detected,
logged, deleted and treated as a miss: it can never feed a wrong block. Temp files
left by a crash mid-write are deleted when the folder is next opened. Nothing is
fsynced: after a power cut an entry can be lost or fail its checksum, never be wrong.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch

from kt_core.kvcache.disk_tier import FORMAT_VERSION, QUEUE_BYTES, QUEUE_MAX, QUEUE_MIN, DiskTier, split_parts
from kt_core.kvcache.paged import PagedKVCache, SeqState

log = logging.getLogger(__name__)


def chain_hashes(seed: bytes, tokens: list[int], block_size: int, start: int = 0,
                 prev: Optional[bytes] = None) -> list[bytes]:
    """Hashes of the full blocks ``start..`` of ``tokens`` (``prev``: the hash of block start-1)."""
    out, h = [], prev if prev is not None else seed
    for b in range(start, len(tokens) // block_size):
        block = tokens[b * block_size:(b + 1) * block_size]
        h = hashlib.sha256(h + struct.pack(f"<{block_size}q", *block)).digest()
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, cache: PagedKVCache, fingerprint: str, host_bytes: int = 0,
                 disk_dir: Optional[Path] = None, disk_bytes: int = 0, write_through: bool = True,
                 queue_bytes: int = QUEUE_BYTES) -> None:
        """``write_through``: queue every new full block for the disk tier (the default); off, blocks
        reach disk only when pushed out of the host tier or at ``flush()``. ``queue_bytes``: host
        memory the write queue may hold."""
        self.cache = cache
        self.seed = hashlib.sha256(fingerprint.encode()).digest()
        self.on_device: dict[bytes, int] = {}  # hash -> block
        self.block_hash: dict[int, bytes] = {}  # block -> hash
        self.idle: "OrderedDict[int, None]" = OrderedDict()  # unreferenced cached blocks, LRU first
        self.host: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()  # one tensor per block: [parts, ...]
        self.host_cap, self.host_used = int(host_bytes), 0
        self.block_bytes = cache.block_bytes()
        header = {"format": "kt-core-kv-block", "version": FORMAT_VERSION, "model": fingerprint,
                  "layout": cache.layout, "dtype": str(cache.dtype).replace("torch.", ""),
                  "block_shape": list(cache.block_shape), "parts": len(cache.parts)}
        self.shapes = cache.part_shapes
        if len(set(self.shapes)) > 1:  # DeepSeek-V3.2: indexer keys beside the latent
            header["part_shapes"] = [list(x) for x in self.shapes]
        items = min(max(int(queue_bytes) // max(self.block_bytes, 1), QUEUE_MIN), QUEUE_MAX)
        self.disk = (DiskTier(disk_dir, disk_bytes, header, queue_items=items)
                     if disk_dir is not None and disk_bytes > 0 else None)
        self.write_through = bool(write_through) and self.disk is not None
        self._written_at_flush = 0
        self.stats = {"queries": 0, "device": 0, "host": 0, "disk": 0}
        cache.prefix = self

    # ---- what the allocator calls ---------------------------------------------------
    @property
    def idle_count(self) -> int:
        return len(self.idle)

    def park(self, b: int) -> bool:
        """Block ``b`` lost its last reference: keep it as an idle cached block if it is hashed."""
        if b not in self.block_hash:
            return False
        self.idle[b] = None
        return True

    def evict_one(self) -> int:
        """Take the least recently used idle block for reuse; its contents move down a tier."""
        b, _ = self.idle.popitem(last=False)
        h = self.block_hash.pop(b)
        del self.on_device[h]
        if self.host_cap >= self.block_bytes:
            self._to_host(h, self.cache.read_block(b))
        elif self.disk is not None:
            self._spill(h, lambda: self.cache.read_block(b))
        return b

    # ---- lookups and registration ------------------------------------------------------
    def salted(self, salt: str) -> bytes:
        """The chain seed of sequences sent with cache salt ``salt`` (a server request's ``cache_salt``):
        their blocks' hashes, in every tier, differ from those of any other salt or of none, so one
        tenant's prompts can neither reuse nor reveal (through usage.cached_tokens or timing) another's."""
        return hashlib.sha256(self.seed + b"\x00cache_salt\x00" + salt.encode("utf-8", "surrogatepass")).digest()

    def lookup(self, tokens: list[int], max_blocks: int, usable: Optional[Callable[[bytes], bool]] = None,
               seed: Optional[bytes] = None) -> tuple[list[int], list[bytes]]:
        """The blocks (referenced for the caller) and hashes of the longest cached prefix; with
        ``usable``, the longest whose last block's hash it accepts (linear-attention models resume
        from a state kept at that block); ``seed``: a salted chain's (``salted``), else the model's."""
        blocks, hashes, tiers = [], [], []
        bs = self.cache.block_size
        self.stats["queries"] += max(max_blocks, 0)
        wanted = chain_hashes(seed or self.seed, tokens[: max_blocks * bs], bs)
        if usable is not None:
            wanted = wanted[:max((j + 1 for j, h in enumerate(wanted) if usable(h)), default=0)]
        try:
            for h in wanted:
                found = self._find(h)
                if found is None:
                    break
                blocks.append(found[0])
                tiers.append(found[1])
                hashes.append(h)
        except BaseException:  # a tier failed part way (a disk read): the blocks taken so far go back
            for b in blocks:
                self.cache.release_block(b)
            raise
        if usable is not None:
            keep = max((j + 1 for j, h in enumerate(hashes) if usable(h)), default=0)
            for b in blocks[keep:]:
                self.cache.release_block(b)
            blocks, hashes, tiers = blocks[:keep], hashes[:keep], tiers[:keep]
        for tier in tiers:
            self.stats[tier] += 1
        return blocks, hashes

    def _find(self, h: bytes) -> Optional[tuple[int, str]]:
        """The block holding ``h`` (referenced) and the tier it came from, or None."""
        b = self.on_device.get(h)
        if b is not None:
            if self.cache.refs[b] == 0:
                self.idle.pop(b, None)
            self.cache.refs[b] += 1
            return b, "device"
        if self.cache.available_blocks == 0:
            return None
        entry, tier, parts = self.host.pop(h, None), "host", None
        if entry is not None:
            self.host_used -= _host_bytes(entry)
            parts = split_parts(entry, self.shapes)
        elif self.disk is not None:
            c = self.cache
            tier = "disk"
            parts = self.disk.pending(h)  # still in the write queue
            if parts is None:
                parts = self.disk.read(h, self.shapes, c.dtype)
        if parts is None:
            return None
        b = self.cache.alloc()
        try:
            self.cache.write_block(b, parts)
        except BaseException:
            self.cache.release_block(b)
            raise
        self._adopt(b, h)
        return b, tier

    def _adopt(self, b: int, h: bytes) -> None:
        self.on_device[h] = b
        self.block_hash[b] = h

    def register(self, seq: SeqState, tokens: list[int]) -> None:
        """Name the sequence's newly full blocks so later requests can share them, and queue each
        newly named block for the disk tier (write-through; skipped when the queue is full)."""
        bs = self.cache.block_size
        full = min(len(tokens), seq.length) // bs
        if full <= len(seq.hashes):
            return
        new = chain_hashes(seq.seed or self.seed, tokens[: full * bs], bs, len(seq.hashes),
                           seq.hashes[-1] if seq.hashes else None)
        for i, h in enumerate(new, start=len(seq.hashes)):
            b = seq.blocks[i]
            if h not in self.on_device and b not in self.block_hash:
                self._adopt(b, h)
                if self.write_through:
                    self.disk.submit(h, lambda b=b: self.cache.read_block(b))
        seq.hashes.extend(new)

    # ---- lower tiers -------------------------------------------------------------------
    def _spill(self, h: bytes, read: Callable[[], list[torch.Tensor]]) -> None:
        """An entry leaves the memory tiers for disk: in the background when the queue has room,
        else written at once (an entry pushed out of memory is not dropped)."""
        if h in self.disk or self.disk.pending(h) is not None:
            return
        if not self.disk.submit(h, read):
            self.disk.write(h, read())

    def _to_host(self, h: bytes, parts: list[torch.Tensor]) -> None:
        """Keep a block in host RAM as one contiguous tensor (2 x layers small tensors cost about
        twice their bytes in allocator overhead, which a cap on nominal bytes did not see)."""
        if h in self.host:
            self.host.move_to_end(h)
            return
        entry = torch.cat([p.reshape(-1) for p in parts])
        self.host[h] = entry
        self.host_used += _host_bytes(entry)
        while self.host_used > self.host_cap and self.host:
            old, old_entry = self.host.popitem(last=False)
            self.host_used -= _host_bytes(old_entry)
            if self.disk is not None:
                self._spill(old, lambda e=old_entry: split_parts(e, self.shapes))

    def flush(self, timeout_s: float = 600.0) -> int:
        """Write every cached block (device and host tiers) to disk, after waiting (up to
        ``timeout_s``) for the background writer. Returns how many entries reached disk since
        the previous flush (write-through, spills and this call together)."""
        if self.disk is None:
            return 0
        deadline = time.monotonic() + timeout_s
        if not self.disk.wait_idle(timeout_s):
            log.warning("prefix cache: the disk writer still has %d entries after %.0f s", self.disk.queued, timeout_s)
        for h, b in list(self.on_device.items()):
            if h not in self.disk:
                self.disk.write(h, self.cache.read_block(b))
        for h, entry in list(self.host.items()):
            if h not in self.disk:
                self.disk.write(h, split_parts(entry, self.shapes))
        self.disk.wait_idle(max(deadline - time.monotonic(), 0.0))  # anything queued meanwhile
        n = self.disk.written - self._written_at_flush
        self._written_at_flush = self.disk.written
        return n

    def hit_rate(self) -> float:
        q = self.stats["queries"]
        return (self.stats["device"] + self.stats["host"] + self.stats["disk"]) / q if q else 0.0


HOST_ENTRY_OVERHEAD = 512  # bytes of a host entry beyond its data (tensor object, dict slot, hash)


def _host_bytes(entry: torch.Tensor) -> int:
    return entry.numel() * entry.element_size() + HOST_ENTRY_OVERHEAD
