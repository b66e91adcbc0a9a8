"""Log-probabilities of given next tokens under the LM head, a chunk of rows at a time.

Fine-tuning needs log p(target) at the answer's positions and its gradient with respect to the final
hidden states, never the whole ``[tokens, vocab]`` logits: those are 65 MB of float32 for 512 tokens of
a 32000-token vocabulary (0.3 GB at Qwen's 151936), made, filled, soft-maxed, indexed and freed several
times a step, on fresh pages each time (an allocation that large is its own mapping), which cost a
third of a 512-token LoRA step here. Each chunk's logits (about 8 MB) are made, reduced to the targets'
log-probabilities and, when a gradient is wanted, differentiated right away: what the backward pass
keeps is one gradient row per token (d log p / d h depends on that row alone), which it scales by the
incoming gradient. The head's products are the same two as through autograd (logits, and the
gradient of the hidden states), so nothing is recomputed.

A chunk's log-softmax and its gradient (one-hot(target) - softmax) are worked out in one float32
buffer kept between chunks and steps, not by autograd through ``log_softmax`` and ``gather``: those
made three more chunk-sized tensors a chunk (the gather's zero-filled gradient, the log-softmax and its
gradient), each on fresh pages, 70 ms of a 2-layer 512-token step (bench/train_lora.py --profile).
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

CHUNK_ELEMENTS = 1 << 21  # logits a chunk holds (8 MB of float32) ...
MIN_ROWS = 128  # ... but at least this many rows: each chunk reads the whole head twice (Qwen's 151936-row
#                head: 13-row chunks took 7 s for 512 tokens, 128-row ones 1 s, whole logits 0.8-1.5 s)


_scratch = threading.local()


def _work(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """This thread's float32 [rows, cols] work buffer on device, kept between calls (grown when short)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    t = bufs.get(device)
    if t is None or t.numel() < rows * cols:
        t = bufs[device] = torch.empty(rows * cols, dtype=torch.float32, device=device)
    return t[:rows * cols].view(rows, cols)


def _chunk(z: torch.Tensor, targets: torch.Tensor, want: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(z)[target] for each row of the float32 logits z [m, V] (targets [m, 1]), and when
    ``want`` its gradient with respect to z, one-hot(target) - softmax(z), in the work buffer (valid
    until the next call)."""
    buf = _work(z.shape[0], z.shape[1], z.device)
    top = z.amax(-1, keepdim=True)
    torch.sub(z, top, out=buf).exp_()
    total = buf.sum(-1, keepdim=True)
    lp = (z.gather(1, targets) - top - total.log()).squeeze(1)
    if not want:
        return lp, None
    buf.div_(total).neg_().scatter_add_(1, targets, torch.ones(targets.shape, dtype=buf.dtype, device=buf.device))
    return lp, buf


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, head: Callable, vocab: int) -> torch.Tensor:
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        want = ctx.needs_input_grad[0]
        grads = torch.empty(n, h.shape[-1], dtype=torch.float32, device=h.device) if want else None
        step = max(MIN_ROWS, CHUNK_ELEMENTS // max(1, vocab))
        for r0 in range(0, n, step):
            hc, tc = h[r0:r0 + step].detach(), targets[r0:r0 + step, None]
            if want:
                with torch.enable_grad():
                    hc.requires_grad_(True)
                    z = head(hc)
                lp, dz = _chunk(z.detach(), tc, True)
                grads[r0:r0 + step], = torch.autograd.grad(z, hc, dz)
            else:
                lp, _ = _chunk(head(hc), tc, False)
            out[r0:r0 + step] = lp
        ctx.save_for_backward(grads)
        ctx.dtype = h.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grads, = ctx.saved_tensors
        return (grads * g[:, None].float()).to(ctx.dtype), None, None, None


def token_logprobs(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | h[i]) under ``model``'s LM head, float32 ``[n]``, differentiable through ``h``
    (the head itself stays frozen; no rows: an empty result still in the graph)."""
    return _TokenLogprobs.apply(h, targets.to(h.device), model.head_logits, int(model.spec.vocab_size))


def answer_rows(n: int, first_label: int) -> torch.Tensor:
    """The positions of a sequence of ``n`` tokens whose next token is an answer token (index
    ``first_label`` on; the first token has no position before it)."""
    return torch.arange(max(first_label, 1) - 1, n - 1)


def answer_logprobs(model, tokens: list[int], first_label: int) -> torch.Tensor:
    """The log-probabilities of ``tokens[first_label:]``, each given the tokens before it (float32);
    differentiable unless the caller turned gradients off (DPO's reference pass)."""
    cache = model.new_cache(math.ceil(len(tokens) / 16) + 1, 16)
    batch = cache.prepare([0], [tokens], all_logits=True)
    rows = answer_rows(len(tokens), first_label)
    h = model.forward_hidden(batch, cache)
    return token_logprobs(model, h[rows.to(h.device)], torch.tensor(tokens, dtype=torch.long)[rows + 1])
