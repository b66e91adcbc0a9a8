"""Prefix cache: reuse the KV of full token blocks across requests, in three tiers.

A full block is named by a chain hash: ``h_i = sha256(h_{i-1} || tokens of block i)``,
seeded with the model's fingerprint, so a hash names the block's whole prefix and
the model that computed it. Tiers, fastest first:

1. **device**: the paged KV cache itself. A finished sequence's hashed blocks stay
   there *idle* (unreferenced, LRU); a new sequence with the same prefix shares them.
2. **host**: when an idle block's slot is needed, its contents move to host RAM
   (LRU, ``host_bytes`` cap).
3. **disk**: host entries pushed out by the cap, and every cached block at
   ``flush()`` (graceful shutdown), go to a folder with a size cap (LRU by use).

Disk entries are written to a temp file and renamed into place, and carry a header
(format version, model fingerprint, layout, dtype, shape, payload length, sha256).
A truncated or corrupted file, or one from another model or layout, is detected,
logged, deleted and treated as a miss: it can never feed a wrong block.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch

from kt_core.kvcache.paged import PagedKVCache, SeqState

log = logging.getLogger(__name__)

MAGIC = b"KTKV"
FORMAT_VERSION = 1
SUFFIX = ".ktkv"


def chain_hashes(seed: bytes, tokens: list[int], block_size: int, start: int = 0,
                 prev: Optional[bytes] = None) -> list[bytes]:
    """Hashes of the full blocks ``start..`` of ``tokens`` (``prev``: the hash of block start-1)."""
    out, h = [], prev if prev is not None else seed
    for b in range(start, len(tokens) // block_size):
        block = tokens[b * block_size:(b + 1) * block_size]
        h = hashlib.sha256(h + struct.pack(f"<{block_size}q", *block)).digest()
        out.append(h)
    return out


class DiskTier:
    """A folder of block files with a byte cap; LRU by last use (file mtime across restarts)."""

    def __init__(self, folder: Path, cap_bytes: int, header: dict) -> None:
        self.folder, self.cap, self.header = Path(folder), int(cap_bytes), header
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: "OrderedDict[str, int]" = OrderedDict()  # name -> bytes, oldest first
        self.lock = threading.Lock()
        self.dropped = 0
        files = []
        for f in self.folder.glob(f"*{SUFFIX}"):
            try:
                st = f.stat()
            except OSError:
                continue
            files.append((st.st_mtime, f.stem, st.st_size))
        for _, name, size in sorted(files):
            self.index[name] = size
        for tmp in self.folder.glob("*.tmp"):  # a crash mid-write leaves only these behind
            tmp.unlink(missing_ok=True)

    @property
    def used_bytes(self) -> int:
        return sum(self.index.values())

    def __contains__(self, h: bytes) -> bool:
        return h.hex() in self.index

    def write(self, h: bytes, parts: list[torch.Tensor]) -> None:
        name = h.hex()
        if name in self.index:
            return
        payload = b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)
        header = dict(self.header, hash=name, payload_bytes=len(payload),
                      sha256=hashlib.sha256(payload).hexdigest())
        head = json.dumps(header, sort_keys=True).encode()
        path = self.folder / f"{name}{SUFFIX}"
        tmp = self.folder / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(head)) + head + payload)
            os.replace(tmp, path)  # the entry appears whole or not at all
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("prefix cache: could not write %s (%s); continuing without it", path, exc)
            return
        with self.lock:
            self.index[name] = len(head) + len(payload) + 8
        self._enforce_cap()

    def read(self, h: bytes, n_parts: int, part_shape: tuple, dtype: torch.dtype) -> Optional[list[torch.Tensor]]:
        name = h.hex()
        if name not in self.index:
            return None
        path = self.folder / f"{name}{SUFFIX}"
        problem = None
        try:
            data = path.read_bytes()
        except OSError as exc:
            data, problem = b"", f"unreadable ({exc})"
        if problem is None:
            problem = self._check(data, name)
        if problem is not None:
            log.warning("prefix cache: dropping disk entry %s: %s", path.name, problem)
            self.dropped += 1
            with self.lock:
                self.index.pop(name, None)
            path.unlink(missing_ok=True)
            return None
        head_len = struct.unpack("<I", data[4:8])[0]
        payload = bytearray(data[8 + head_len:])
        flat = torch.frombuffer(payload, dtype=torch.uint8).view(dtype)
        per = flat.numel() // n_parts
        with self.lock:
            self.index.move_to_end(name)
        try:
            os.utime(path)
        except OSError:
            pass
        return [flat[i * per:(i + 1) * per].view(part_shape) for i in range(n_parts)]

    def _check(self, data: bytes, name: str) -> Optional[str]:
        if len(data) < 8 or data[:4] != MAGIC:
            return "not a kt-core KV block file"
        head_len = struct.unpack("<I", data[4:8])[0]
        try:
            header = json.loads(data[8:8 + head_len])
        except ValueError:
            return "truncated or corrupted header"
        for key, want in self.header.items():
            if header.get(key) != want:
                return f"written for {key}={header.get(key)!r}, this server has {want!r}"
        if header.get("hash") != name:
            return "its header names another block"
        payload = data[8 + head_len:]
        if len(payload) != header.get("payload_bytes"):
            return f"truncated ({len(payload)} of {header.get('payload_bytes')} payload bytes)"
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return "checksum mismatch (corrupted)"
        return None

    def _enforce_cap(self) -> None:
        with self.lock:
            victims = []
            total = sum(self.index.values())
            while total > self.cap and self.index:
                name, size = self.index.popitem(last=False)
                total -= size
                victims.append(name)
        for name in victims:
            (self.folder / f"{name}{SUFFIX}").unlink(missing_ok=True)


class PrefixCache:
    def __init__(self, cache: PagedKVCache, fingerprint: str, host_bytes: int = 0,
                 disk_dir: Optional[Path] = None, disk_bytes: int = 0) -> None:
        self.cache = cache
        self.seed = hashlib.sha256(fingerprint.encode()).digest()
        self.on_device: dict[bytes, int] = {}  # hash -> block
        self.block_hash: dict[int, bytes] = {}  # block -> hash
        self.idle: "OrderedDict[int, None]" = OrderedDict()  # unreferenced cached blocks, LRU first
        self.host: "OrderedDict[bytes, list[torch.Tensor]]" = OrderedDict()
        self.host_cap, self.host_used = int(host_bytes), 0
        self.block_bytes = cache.block_bytes()
        header = {"format": "kt-core-kv-block", "version": FORMAT_VERSION, "model": fingerprint,
                  "layout": cache.layout, "dtype": str(cache.dtype).replace("torch.", ""),
                  "block_shape": list(cache.block_shape), "parts": len(cache.k) * (1 if cache.latent else 2)}
        self.disk = DiskTier(disk_dir, disk_bytes, header) if disk_dir is not None and disk_bytes > 0 else None
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
        if self.host_cap > 0 or self.disk is not None:
            self._to_host(h, self.cache.read_block(b))
        return b

    # ---- lookups and registration ------------------------------------------------------
    def lookup(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[bytes]]:
        """The blocks (referenced for the caller) and hashes of the longest cached prefix."""
        blocks, hashes = [], []
        bs = self.cache.block_size
        self.stats["queries"] += max(max_blocks, 0)
        for h in chain_hashes(self.seed, tokens[: max_blocks * bs], bs):
            b = self._find(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        return blocks, hashes

    def _find(self, h: bytes) -> Optional[int]:
        b = self.on_device.get(h)
        if b is not None:
            self.stats["device"] += 1
            if self.cache.refs[b] == 0:
                self.idle.pop(b, None)
            self.cache.refs[b] += 1
            return b
        if self.cache.available_blocks == 0:
            return None
        parts, tier = self.host.pop(h, None), "host"
        if parts is not None:
            self.host_used -= self.block_bytes
        elif self.disk is not None:
            c = self.cache
            parts, tier = self.disk.read(h, len(c.k) * (1 if c.latent else 2), c.block_shape, c.dtype), "disk"
        if parts is None:
            return None
        b = self.cache.alloc()
        self.cache.write_block(b, parts)
        self._adopt(b, h)
        self.stats[tier] += 1
        return b

    def _adopt(self, b: int, h: bytes) -> None:
        self.on_device[h] = b
        self.block_hash[b] = h

    def register(self, seq: SeqState, tokens: list[int]) -> None:
        """Name the sequence's newly full blocks so later requests can share them."""
        bs = self.cache.block_size
        full = min(len(tokens), seq.length) // bs
        if full <= len(seq.hashes):
            return
        new = chain_hashes(self.seed, tokens[: full * bs], bs, len(seq.hashes), seq.hashes[-1] if seq.hashes else None)
        for i, h in enumerate(new, start=len(seq.hashes)):
            b = seq.blocks[i]
            if h not in self.on_device and b not in self.block_hash:
                self._adopt(b, h)
        seq.hashes.extend(new)

    # ---- lower tiers -------------------------------------------------------------------
    def _to_host(self, h: bytes, parts: list[torch.Tensor]) -> None:
        if self.host_cap < self.block_bytes:
            if self.disk is not None:
                self.disk.write(h, parts)
            return
        if h in self.host:
            self.host.move_to_end(h)
            return
        self.host[h] = parts
        self.host_used += self.block_bytes
        while self.host_used > self.host_cap:
            old, old_parts = self.host.popitem(last=False)
            self.host_used -= self.block_bytes
            if self.disk is not None:
                self.disk.write(old, old_parts)

    def flush(self) -> int:
        """Write every cached block (device and host tiers) to disk; returns how many were new."""
        if self.disk is None:
            return 0
        n = 0
        for h, b in list(self.on_device.items()):
            if h not in self.disk:
                self.disk.write(h, self.cache.read_block(b))
                n += 1
        for h, parts in list(self.host.items()):
            if h not in self.disk:
                self.disk.write(h, parts)
                n += 1
        return n

    def hit_rate(self) -> float:
        q = self.stats["queries"]
        return (self.stats["device"] + self.stats["host"] + self.stats["disk"]) / q if q else 0.0
