"""Keep freed heap memory in the process for reuse (glibc): what a training step's allocations need.

A LoRA step makes and frees the same large tensors every step (the LM head's logits chunks, 8-16 MB;
the layers' activations and gradients). glibc hands blocks above its mmap threshold back to the OS on
free and trims the heap's top past its trim threshold, so the next step's tensors land on fresh pages,
each a page fault on first touch. In a VM a fault costs microseconds: on the 2-core AMX Xeon these
sessions ran on, a 16 MB logits chunk took 23 ms to make where a reused one took 1 ms, ~80 ms of a
650 ms step of the benchmark model (bench/train_lora.py). With ``keep_freed_memory`` blocks up to
32 MB (glibc's largest mmap threshold) come from the heap, which is never trimmed, so freed pages are
reused. Peak memory is unchanged; the process does not shrink after its peak.

Linux with glibc only (elsewhere, and under musl, nothing is changed).
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): blocks above it stay mmapped
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (once a process); whether it is set."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version"):  # glibc: mallopt takes these parameters
                    _done = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                             and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1)
            except (OSError, AttributeError):
                _done = False
    return _done
