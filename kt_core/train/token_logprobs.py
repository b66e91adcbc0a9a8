"""Log-probabilities of given next tokens under the LM head, a chunk of rows at a time.

Fine-tuning needs log p(target) at the answer's positions and its gradient with respect to the final
hidden states, never the whole ``[tokens, vocab]`` logits: those are 65 MB of float32 for 512 tokens of
a 32000-token vocabulary (0.3 GB at Qwen's 151936), made, filled, soft-maxed, indexed and freed several
times a step, on fresh pages each time (an allocation that large is its own mapping), which cost a
third of a 512-token LoRA step here. A block of rows' logits is made in the model's dtype (up to
LOGITS_ELEMENTS, 32 MB in bf16), reduced a chunk of rows at a time in float32 (CHUNK_ELEMENTS) to the
targets' log-probabilities and, when a gradient is wanted, each chunk's gradient of the logits is
written over them, in the dtype the head's backward takes it in anyway (float32 where the head's products
run widened to float32 anyway: ``_wide``, the block then twice the bytes); then one product gives the
block's gradient of the hidden states. What the backward pass keeps is one gradient row per token
(d log p / d h depends on that row alone), which it scales by the incoming gradient. The head's
products are the same two as through autograd (logits, and the gradient of the hidden states), so
nothing is recomputed. Each product reads the whole head (131 MB at 32000 x 2048 in bf16, 0.6 GB at
Qwen's 151936): 128-row blocks made 3 of each for 384 answer tokens, 75 ms of a 650 ms step on the
2-core AMX Xeon; one 384-row block 53 ms.

With the native ops loaded, a block's log-softmax and gradient are one pass a row
(native/logsoftmax_grad.inc: 384 rows of 32000 bf16 logits ~10 -> ~3 ms). Elsewhere, a chunk's
log-softmax and its gradient (one-hot(target) - softmax) are worked out in one float32 buffer kept
between chunks and steps, not by autograd through ``log_softmax`` and ``gather``: those
made three more chunk-sized tensors a chunk (the gather's zero-filled gradient, the log-softmax and its
gradient), each on fresh pages, 70 ms of a 2-layer 512-token step (bench/train_lora.py --profile).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from kt_core.backend.torch_ops import wide_mm
from kt_core.runtime.scratch import work

LOGITS_ELEMENTS = 1 << 24  # logits of one block of rows, in the model's dtype (32 MB of bf16) ...
MIN_ROWS = 128  # ... but at least this many rows: each block reads the whole head twice (Qwen's 151936-row
#                head: 13-row chunks took 7 s for 512 tokens, 128-row ones 1 s, whole logits 0.8-1.5 s)
CHUNK_ELEMENTS = 1 << 21  # logits a float32 pass of the log-softmax holds (8 MB)


def _chunk(z: torch.Tensor, targets: torch.Tensor, want: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(z)[target] for each row of the logits z [m, V] (any float dtype; worked in float32;
    targets [m, 1]), and when ``want`` its gradient with respect to z, one-hot(target) - softmax(z), in
    the work buffer (valid until the next call)."""
    buf = work("logsoftmax", z.shape[0], z.shape[1], device=z.device)
    buf.copy_(z)
    top = buf.amax(-1, keepdim=True)
    picked = buf.gather(1, targets)
    buf.sub_(top).exp_()
    total = buf.sum(-1, keepdim=True)
    lp = (picked - top - total.log()).squeeze(1)
    if not want:
        return lp, None
    buf.mul_(total.reciprocal().neg_()).scatter_add_(1, targets, torch.ones(targets.shape, dtype=buf.dtype,
                                                                            device=buf.device))
    return lp, buf


def _native_block(z: torch.Tensor, targets: torch.Tensor, out: torch.Tensor, want: bool) -> bool:
    """A block's log-probabilities (into ``out``) and, when ``want``, its gradient written over the logits z
    [rows, V] in one native pass a row (native/logsoftmax_grad.inc); False where the kernels do not take it
    (then the float32 chunks do)."""
    if z.device.type != "cpu" or z.dtype not in (torch.bfloat16, torch.float32) or not z.is_contiguous():
        return False
    try:
        from kt_backends.cpu import native_abi, native_ops
    except ImportError:
        return False
    if not native_ops.available():
        return False
    t = targets.to(torch.int64).contiguous()
    if not (out.is_contiguous() and out.dtype == torch.float32 and t.shape == (z.shape[0],) == out.shape):
        return False
    if any(native_abi.overlaps(z, x) for x in (t, out)):
        return False  # (the pass writes z while it reads the targets: never over them)
    pack = native_ops._PACKERS["kt_logsoftmax_grad"][0].pack  # logsoftmax_grad.inc LogSoftmaxGradArgs
    args = pack(z.shape[0], z.shape[1], native_ops._DTYPES[z.dtype], int(want), 0, 0, z.data_ptr(), t.data_ptr(),
                out.data_ptr())
    native_ops._check_rc(native_ops._need().kt_logsoftmax_grad(args), "logsoftmax_grad")
    return True


def _wide(h: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Whether the plain head's products run widened to float32 (wide_mm: torch's bf16 products are its
    scalar loop here): then the logits and their gradient stay float32, never rounded to bf16 between
    the two products (and two casts of a [rows, V] block a step fewer: 26 of ~2400 ms of the Zen 3's
    512-token LoRA step)."""
    return weight is not None and wide_mm.takes(h, weight)


def _head_grad(dz: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """head(h) = h W^T: the gradient of h, dz W, the fastest way round for its dtype."""
    if wide_mm.takes_nn(dz, weight) or (dz.dtype == torch.float32 and wide_mm.scalar_bf16(weight)):
        return wide_mm.mm_nn(dz.float(), weight)  # torch's scalar bf16 loop here: W widened a block at a time
    if dz.dtype == torch.bfloat16:  # as (W^T dz^T)^T (_plain_head)
        return torch.mm(weight.t(), dz.t()).t()
    return torch.mm(dz, weight)  # float32 (Zen 3, 8 rows x 32000 x 2048: 27 ms against 501 the other way
    #                              round; equal from 24 rows)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, head: Callable, vocab: int,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        want = ctx.needs_input_grad[0]
        grads = torch.empty(n, h.shape[-1], dtype=torch.float32, device=h.device) if want else None
        block = max(MIN_ROWS, LOGITS_ELEMENTS // max(1, vocab))
        sub = max(1, CHUNK_ELEMENTS // max(1, vocab))
        for r0 in range(0, n, block):
            hc = h[r0:r0 + block].detach()
            if want and weight is None:
                with torch.enable_grad():
                    z = head(hc.requires_grad_(True))  # [rows, V] in the model's dtype
            elif _wide(hc, weight):
                z = wide_mm.mm_nt(hc.reshape(-1, hc.shape[-1]).float(), weight)  # [rows, V] float32
            else:
                z = head(hc)
            zd = z.detach()  # the chunks' gradients are written over it (no product saved z for its backward)
            rows = zd.shape[0]
            if not _native_block(zd, targets[r0:r0 + rows], out[r0:r0 + rows], want):
                for s0 in range(0, rows, sub):
                    s1 = min(s0 + sub, rows)
                    lp, dz = _chunk(zd[s0:s1], targets[r0 + s0:r0 + s1, None], want)
                    out[r0 + s0:r0 + s1] = lp
                    if want:
                        zd[s0:s1].copy_(dz)
            if want and weight is not None:
                grads[r0:r0 + block] = _head_grad(zd, weight)
            elif want:
                grads[r0:r0 + block], = torch.autograd.grad(z, hc, zd)
        ctx.save_for_backward(grads)
        ctx.dtype = h.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        grads, = ctx.saved_tensors
        return (grads * g[:, None].float()).to(ctx.dtype), None, None, None, None


def _plain_head(model, h: torch.Tensor) -> Optional[torch.Tensor]:
    """The LM head's weight W [V, H] where ``model.head_products`` is h W^T with it as it lies (torch's
    linear, a plain frozen CPU tensor of h's dtype), else None (then autograd differentiates the head).
    Its gradient dz W then runs as (W^T dz^T)^T: oneDNN's bf16 product reduces over the vocabulary
    faster that way round (Zen 5 EPYC, 2 threads, 384 rows x 32000 x 2048: 62 against 69-71 ms)."""
    from kt_core.backend.torch_backend import TorchBackend

    W = getattr(model, "lm_head", None)
    be = getattr(model, "be", None)
    if not (isinstance(W, torch.Tensor) and type(W) is torch.Tensor and W.dim() == 2 and not W.requires_grad
            and W.dtype == h.dtype and W.device == h.device and h.device.type == "cpu" and be is not None
            and type(be).linear is TorchBackend.linear):
        return None
    return W


def token_logprobs(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | h[i]) under ``model``'s LM head, float32 ``[n]``, differentiable through ``h``
    (the head itself stays frozen; no rows: an empty result still in the graph)."""
    return _TokenLogprobs.apply(h, targets.to(h.device), model.head_products, int(model.spec.vocab_size),
                                _plain_head(model, h))


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
