"""Weights the CPU kernels stream, placed in transparent huge pages (Linux).

Decode reads every weight of the active experts once a token; with 4 KB pages that is a TLB walk per
4 KB of each stream the kernels keep in flight. A weight written into memory advised MADV_HUGEPAGE
before its first touch gets 2 MB pages (the kernel's "madvise" THP mode, the common default).
native_pack.pack packs the experts straight into such memory (``huge_empty``) at load. A bf16 GEMV of 151936 x 2048 on such memory
on a Zen 4 EPYC: 0.88-0.98x the time in three alternating runs (bench/README.md). llama.cpp gets the
same from the page cache's large folios of its mmap'ed GGUF file. The unquantized dense weights the
reader stacks by rows (LM head, attention projections, dense MLPs, shared experts) are read into such
memory too (``Backend.dense_empty``: straight from the file where it stores the model's dtype, else
through a converted copy), and quantized ones packed into it; MLA's kv_b and DeepSeek-V4's grouped
output projection stay in plain memory.

Elsewhere (Windows, macOS, THP "never", KT_HUGEPAGES=0, small tensors) ``huge_empty`` is a plain
``torch.empty``: huge pages are a speed-up, never a requirement.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 16 << 20  # smaller weights gain little and would waste up to 2 MB each
_MADV_HUGEPAGE = 14   # <linux/mman.h>
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, when this is Linux with transparent huge pages in "always" or "madvise" mode."""
    if not sys.platform.startswith("linux") or os.environ.get("KT_HUGEPAGES", "1") == "0":
        return None
    try:
        mode = _THP.read_text()
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    if "[never]" in mode:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    return _madvise() is not None


def huge_or_none(shape, dtype: torch.dtype):
    """An uninitialised contiguous CPU tensor whose whole 2 MB spans the kernel backs with huge pages
    once written (a view into a slightly larger buffer aligned to 2 MB, which it keeps alive), or
    None where that does not apply (the platform, THP "never", KT_HUGEPAGES=0, under MIN_BYTES)."""
    shape = tuple(shape)
    n = torch.Size(shape).numel() * dtype.itemsize
    madvise = _madvise()
    if madvise is None or n < MIN_BYTES:
        return None
    buf = torch.empty(n + HUGE_PAGE, dtype=torch.uint8)  # untouched: no page is mapped yet
    start = (-buf.data_ptr()) % HUGE_PAGE
    if madvise(buf.data_ptr() + start, n - n % HUGE_PAGE, _MADV_HUGEPAGE) != 0:
        return None
    return buf[start:start + n].view(dtype).view(shape)


def huge_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``huge_or_none``'s memory, or a plain ``torch.empty`` where huge pages do not apply."""
    out = huge_or_none(shape, dtype)
    return torch.empty(tuple(shape), dtype=dtype) if out is None else out
