"""The prefix cache's disk tier: a folder of KV block files with a byte cap, LRU by last use.

Entries are written to a temp file and renamed into place, with a header (format version,
model fingerprint, layout, dtype, shape, payload length, sha256); a truncated, corrupted or
foreign file is detected, logged, deleted and treated as a miss. Write-through goes through a
bounded queue to one background writer thread (see prefix.py for the policy)."""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

MAGIC = b"KTKV"
FORMAT_VERSION = 1
SUFFIX = ".ktkv"
QUEUE_BYTES = 64 << 20  # host memory the write-behind queue may hold (copies of blocks)
QUEUE_MIN, QUEUE_MAX = 4, 1024  # ... in entries, whatever the block size
WRITER_IDLE_EXIT_S = 2.0  # the writer thread ends after this long with nothing to write (a later write restarts it)
EXIT_DRAIN_S = 5.0  # at interpreter exit, how long to let queued writes finish


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. Windows: the file is open elsewhere; the LRU index already forgot it
        pass


_open_tiers: "weakref.WeakSet[DiskTier]" = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """A process that ends without flush() still lets queued write-through entries land (bounded)."""
    deadline = time.monotonic() + EXIT_DRAIN_S
    for tier in list(_open_tiers):
        tier.close_writer(max(deadline - time.monotonic(), 0.0))


class DiskTier:
    """A folder of block files with a byte cap; LRU by last use (file mtime across restarts).

    ``write`` stores an entry at once on the calling thread; ``submit`` queues it for the
    background writer (bounded: returns False and skips the entry when the queue is full).
    """

    def __init__(self, folder: Path, cap_bytes: int, header: dict, queue_items: int = 64) -> None:
        self.folder, self.cap, self.header = Path(folder), int(cap_bytes), header
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: "OrderedDict[str, int]" = OrderedDict()  # name -> bytes, oldest first
        self.lock = threading.Lock()  # guards index and busy
        self.busy: set[str] = set()  # names queued or being written (claimed: nobody else writes them)
        self.dropped = 0  # bad entries found and deleted
        self.written = 0  # entries this process wrote (write-through, spills and flush together)
        self.queue_full = 0  # write-throughs skipped because the queue was full
        self.write_errors = 0
        self.queue_items = max(int(queue_items), 1)
        self._pending: "OrderedDict[str, list[torch.Tensor]]" = OrderedDict()  # queued, oldest first
        self._active = 0  # entries the writer has taken but not finished
        self._cond = threading.Condition()  # guards _pending, _active, _thread
        self._thread: Optional[threading.Thread] = None
        self._closing = False  # set at interpreter exit: the writer ends once the queue is empty
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
            _unlink(tmp)
        _open_tiers.add(self)

    @property
    def used_bytes(self) -> int:
        with self.lock:
            return sum(self.index.values())

    def __contains__(self, h: bytes) -> bool:
        return h.hex() in self.index

    # ---- writing -----------------------------------------------------------------------
    def _claim(self, name: str) -> bool:
        """Reserve ``name`` for one writer; False when it is on disk, queued or being written."""
        with self.lock:
            if name in self.index or name in self.busy:
                return False
            self.busy.add(name)
            return True

    def _release(self, name: str) -> None:
        with self.lock:
            self.busy.discard(name)

    def write(self, h: bytes, parts: list[torch.Tensor]) -> bool:
        """Store the entry now (on this thread); False when it was already there or on its way."""
        name = h.hex()
        if not self._claim(name):
            return False
        try:
            return self._store(name, parts)
        finally:
            self._release(name)

    def submit(self, h: bytes, read: Callable[[], list[torch.Tensor]]) -> bool:
        """Queue the entry for the background writer; ``read()`` gives its contents (called on this
        thread, only when the entry is queued). False, at once, when it is already on disk, queued
        or being written, or when the queue is full (then nothing is read or written)."""
        name = h.hex()
        with self._cond:
            if len(self._pending) >= self.queue_items:
                self.queue_full += 1
                return False
        if not self._claim(name):
            return False
        try:
            parts = read()
        except BaseException:
            self._release(name)
            raise
        with self._cond:
            self._pending[name] = parts
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="kt-prefix-writer", daemon=True)
                self._thread.start()
            self._cond.notify()
        return True

    def pending(self, h: bytes) -> Optional[list[torch.Tensor]]:
        """The contents of an entry still in the write queue (a hit before it reaches disk)."""
        with self._cond:
            return self._pending.get(h.hex())

    def _drain(self) -> None:
        """The writer thread: store queued entries oldest first; end after a while with nothing to do."""
        while True:
            with self._cond:
                while not self._pending:
                    if (not self._cond.wait(WRITER_IDLE_EXIT_S) or self._closing) and not self._pending:
                        self._thread = None
                        return
                name, parts = next(iter(self._pending.items()))
                self._active += 1
            try:
                self._store(name, parts)
            except Exception:  # never let one entry end the writer
                self.write_errors += 1
                log.exception("prefix cache: writing %s failed", name)
            finally:
                parts = None  # an idle writer holds no tensor (freeing one after exit began aborts)
                with self._cond:
                    self._pending.pop(name, None)
                    self._active -= 1
                    self._cond.notify_all()
                self._release(name)

    def close_writer(self, timeout: float) -> None:
        """Let the queued entries land (up to ``timeout``), then end the writer thread and wait for
        it: no daemon thread may still touch torch tensors once the interpreter finalizes (torch
        then aborts the process)."""
        deadline = time.monotonic() + timeout
        self.wait_idle(timeout)
        with self._cond:
            self._closing = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.1))

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until the write queue is empty and the writer is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._active, timeout)

    @property
    def queued(self) -> int:
        """Entries queued or being written."""
        with self._cond:
            return len(self._pending)

    def _store(self, name: str, parts: list[torch.Tensor]) -> bool:
        """Write one claimed entry: temp file, then an atomic rename (it appears whole or not at all)."""
        payload = b"".join(p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts)
        header = dict(self.header, hash=name, payload_bytes=len(payload),
                      sha256=hashlib.sha256(payload).hexdigest())
        head = json.dumps(header, sort_keys=True).encode()
        path = self.folder / f"{name}{SUFFIX}"
        tmp = self.folder / f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(head)) + head + payload)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            self.write_errors += 1
            log.warning("prefix cache: could not write %s (%s); continuing without it", path, exc)
            return False
        victims = []
        with self.lock:  # the new entry and the cap it may push others out of change together
            self.index[name] = len(head) + len(payload) + 8
            self.written += 1
            total = sum(self.index.values())
            while total > self.cap and self.index:
                old, size = self.index.popitem(last=False)
                total -= size
                victims.append(old)
        for old in victims:
            _unlink(self.folder / f"{old}{SUFFIX}")
        return True

    # ---- reading -----------------------------------------------------------------------
    def read(self, h: bytes, shapes: list[tuple], dtype: torch.dtype) -> Optional[list[torch.Tensor]]:
        """The entry's parts (of ``shapes``, in order), or None when it is absent or fails its checks."""
        name = h.hex()
        if name not in self.index:
            return None
        path = self.folder / f"{name}{SUFFIX}"
        problem = None
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # pushed out by the cap (or removed by hand) since the lookup
            with self.lock:
                self.index.pop(name, None)
            return None
        except OSError as exc:
            data, problem = b"", f"unreadable ({exc})"
        if problem is None:
            problem = self._check(data, name)
        if problem is not None:
            log.warning("prefix cache: dropping disk entry %s: %s", path.name, problem)
            self.dropped += 1
            with self.lock:
                self.index.pop(name, None)
            _unlink(path)
            return None
        head_len = struct.unpack("<I", data[4:8])[0]
        payload = bytearray(data[8 + head_len:])
        flat = torch.frombuffer(payload, dtype=torch.uint8).view(dtype)
        with self.lock:
            if name in self.index:
                self.index.move_to_end(name)
        try:
            os.utime(path)
        except OSError:
            pass
        return split_parts(flat, shapes)

    def _check(self, data: bytes, name: str) -> Optional[str]:
        if len(data) < 8 or data[:4] != MAGIC:
            return "not a kt-core KV block file"
        head_len = struct.unpack("<I", data[4:8])[0]
        try:
            header = json.loads(data[8:8 + head_len])
        except ValueError:
            return "truncated or corrupted header"
        if not isinstance(header, dict):
            return "corrupted header"
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


def split_parts(flat: torch.Tensor, shapes: list[tuple]) -> list[torch.Tensor]:
    """A block's parts back from their concatenated values (the layout of a disk or host entry)."""
    out, at = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        out.append(flat[at:at + n].view(shape))
        at += n
    return out
