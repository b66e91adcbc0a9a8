"""One MoE projection's experts read from the checkpoint a chunk at a time (``Stacked``): stacked as
one tensor, or quantized chunk by chunk while a reader thread fills the next chunk (``quantized``),
so a load that quantizes is bound by the slower of the disk and the quantizer, not their sum, and
holds two chunks in the checkpoint's dtype instead of the whole projection."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from kt_core.weights.checkpoint import read_into
from kt_core.weights.quant import QuantizedWeight, rows_into

CHUNK_BYTES = 64 << 20  # a chunk of experts in the checkpoint's dtype (two are held while loading)


@dataclass
class Stacked:
    """The experts ``names`` of one projection, each ``shape``, in checkpoint ``ck``; calling it
    reads them all as one tensor [E, *shape] in the stored dtype."""

    ck: object
    names: list
    shape: tuple

    def _read(self, j: int, out: torch.Tensor) -> None:
        read_into(self.ck, self.names[j], out, self.shape)  # straight into out where the file allows

    def __call__(self) -> torch.Tensor:
        first = self.ck.get(self.names[0], self.shape)
        out = torch.empty((len(self.names), *first.shape), dtype=first.dtype)
        out[0] = first
        for j in range(1, len(self.names)):
            self._read(j, out[j])
        return out

    def quantized(self, dtype: torch.dtype, quantize: Callable[[torch.Tensor], QuantizedWeight]) -> QuantizedWeight:
        """``quantize`` (a weight [e, *shape] -> QuantizedWeight, row by row) of all the experts, as
        one QuantizedWeight [E, *shape]: chunks of experts cast to ``dtype`` and quantized in turn,
        the next chunk read meanwhile."""
        first = self.ck.get(self.names[0], self.shape)
        E = len(self.names)
        n = max(1, min(E, CHUNK_BYTES // max(1, first.numel() * first.element_size())))
        chunks = -(-E // n)
        bufs = [torch.empty((n, *first.shape), dtype=first.dtype) for _ in range(min(2, chunks))]

        def fill(i: int) -> torch.Tensor:
            buf, lo = bufs[i % len(bufs)], i * n
            hi = min(E, lo + n)
            for j in range(lo, hi):
                if j == 0:
                    buf[0] = first
                else:
                    self._read(j, buf[j - lo])
            return buf[:hi - lo]

        out = None
        with ThreadPoolExecutor(1, thread_name_prefix="kt-read") as reader:
            pending = reader.submit(fill, 0)
            for i in range(chunks):
                w = pending.result()
                if i + 1 < chunks:
                    pending = reader.submit(fill, i + 1)  # into the other buffer, while this one quantizes
                out = rows_into(out, quantize(w.to(dtype)), i * n, E)
        return out
