"""Fine-tuning's per-thread work buffers: tensors of tens of MB a layer that a pass fills and the next
reads (gradient rows, attention scores, a block's logits). Kept between calls and grown, never shrunk:
fresh pages cost a fault each, often more than the product that fills them. A buffer never leaves
the pass that asked for it (a result handed to autograd is its own tensor)."""
from __future__ import annotations

import threading

import torch

_scratch = threading.local()


def work(name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """This thread's [rows, cols] buffer ``name`` (per dtype and device), valid until the next call
    for the same name."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (name, dtype, device)
    t = bufs.get(key)
    if t is None or t.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: one made under inference mode (a prefill's
            #                                attention) could not be written outside it (fine-tuning's)
            t = bufs[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return t[:rows * cols].view(rows, cols)
