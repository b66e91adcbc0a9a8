"""One forward step of a ``CausalLM`` over its devices: the step executor.

``models/`` describes the architectures (their layers, computed through the device contract); this
runs them: the step's metadata moved once per device, the hidden states handed from device to
device at layer boundaries, each backend told the step's kind (decode or prefill), expert deferral's
late routes added one layer later, activation checkpointing while fine-tuning, and the logits of
the rows the step wants.
"""
from __future__ import annotations

import torch

from kt_core.errors import KtError
from kt_core.kvcache.paged import Batch, PagedKVCache
from kt_core.models import deepseek_v4
from kt_core.models.layers import MoEBlock


def run_step(model, batch: Batch, cache: PagedKVCache) -> torch.Tensor:
    """Logits (float32) of ``batch.logits_rows``; differentiable when autograd is on."""
    return model.head_logits(run_hidden(model, batch, cache))


def run_hidden(model, batch: Batch, cache: PagedKVCache) -> torch.Tensor:
    """The final normed hidden states of ``batch.logits_rows``: what the LM head multiplies (fine-tuning
    takes its log-probabilities a chunk of rows at a time: kt_core.train.token_logprobs)."""
    spec, eps = model.spec, model.spec.rms_eps
    if int(batch.positions.max()) >= model.cos_sin.shape[0]:
        raise KtError(f"position {int(batch.positions.max())} is past the model's context of "
                      f"{model.cos_sin.shape[0]} tokens; shorten the prompt or max_new_tokens")
    on = {batch.tokens.device: batch}  # the step's metadata, moved once per device
    for be in model.backends:
        be.begin_step(bool(batch.is_decode))
    h = model.embed[batch.to(model.layers[0].device).tokens]
    if spec.v4 is not None:  # DeepSeek-V4: hc_mult copies of the embedding as residual streams
        h = h[:, None, :].expand(-1, spec.v4.hc_mult, -1).contiguous()
    carry: list = []  # deferred expert routes of the previous MoE layer (expert deferral)
    fused = None  # whole layers in one call (the CPU's native decode layers), where the device has them
    if batch.is_decode and spec.v4 is None and not torch.is_grad_enabled():
        fused = next((p for p in (be.decode_plan(model, cache) for be in model.backends) if p is not None), None)
    i = 0
    while i < len(model.layers):
        layer = model.layers[i]
        be = layer.be
        if fused is not None and not carry and h.device.type == "cpu":
            j = fused.stop(i)
            out = fused.run(h, on.setdefault(h.device, batch.to(h.device)), i, j) if j > i else None
            if out is not None:
                h, i = out, j
                continue
        if h.device != layer.device:
            h = h.to(layer.device)  # once per device boundary
        b = on.setdefault(layer.device, batch.to(layer.device))

        def block(h, layer=layer, be=be, b=b, i=i):
            if spec.v4 is not None:
                return layer.run(be, h, b, cache.layer_caches(i), spec)
            h = h + layer.attn(be, be.rmsnorm(h, layer.norm1, eps), b, *cache.layer_caches(i), layer.cos_sin)
            return h + layer.ffn(be, be.rmsnorm(h, layer.norm2, eps))

        if model.checkpoint_layers and torch.is_grad_enabled() and not getattr(layer.ffn, "deferred", 0):
            # fine-tuning: keep only each layer's input, recompute the layer in the backward pass
            # (its KV writes rewrite the same values), so memory does not grow with depth
            from torch.utils.checkpoint import checkpoint

            h = checkpoint(block, h, use_reentrant=False)
        else:
            h = block(h)
        for fut in carry:
            h = h + fut.result().to(h.device)
        carry = layer.ffn.pop_deferred() if isinstance(layer.ffn, MoEBlock) else []
        i += 1
    for fut in carry:
        h = h + fut.result().to(h.device)
    be = model.be
    rows = on.setdefault(model.device, batch.to(model.device)).logits_rows
    if not (rows.numel() == h.shape[0] and torch.equal(rows, torch.arange(h.shape[0], device=rows.device))):
        h = h[rows]  # (every row, as fine-tuning asks, is h itself: no copy, and no scatter back in its backward)
    if model.hc_head is not None:
        h = deepseek_v4.collapse(h, model.hc_head, spec)
    return be.rmsnorm(h, model.norm, eps)
