"""A token embedding kept in int8 (``quant.embed=int8``): rows of int8 codes with a scale per group
of inputs, as GGUF's Q8_0 token_embd. A lookup dequantizes only the rows it gathers, so the table
costs ~1.06 bytes a value instead of bf16's 2 (Qwen3-30B-A3B's 151,936 x 2048 table: 330 MB, not
622) and a step reads a few rows of it."""
from __future__ import annotations

import torch

from kt_core.weights.quant import Quant, QuantizedWeight


class QuantizedEmbedding:
    """``embed[ids]`` -> float rows in ``dtype``, from an int8 QuantizedWeight ``[V, H]``."""

    def __init__(self, w: QuantizedWeight, dtype: torch.dtype) -> None:
        if not isinstance(w, QuantizedWeight) or w.format is not Quant.INT8 or w.qdata.dim() != 2:
            raise ValueError(f"an int8 embedding takes a 2-D int8 QuantizedWeight, got {type(w).__name__}")
        self.w, self.dtype = w, dtype
        self.group = w.group_size

    @property
    def shape(self) -> torch.Size:
        return self.w.qdata.shape

    @property
    def device(self) -> torch.device:
        return self.w.qdata.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w.qdata, self.w.scales, self.w.zeros) if t is not None)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        codes, scales = self.w.qdata[ids], self.w.scales[ids].float()
        n, H = codes.shape[:-1], codes.shape[-1]
        rows = codes.float().reshape(*n, H // self.group, self.group)
        if self.w.zeros is not None:  # a GGUF Q5_1 / Q5_K / Q2_K table kept with its zero points
            rows = rows - self.w.zeros[ids].float().unsqueeze(-1)
        return (rows * scales.unsqueeze(-1)).reshape(*n, H).to(self.dtype)
