"""The synthesizer's DeepSeek-V4 layer: the tensors a generic initialisation cannot guess (the
hyper-connections' mixing weights, the hash layers' token -> experts table) and the layer's forward
pass over the sample prompt, with the router calibrated on what reaches it."""
from __future__ import annotations

import math
from typing import Callable

import torch

from kt_core.models import deepseek_v4, shapes_v4
from kt_core.models.spec import ModelSpec


def fix_tensors(spec: ModelSpec, i: int, t: dict, seed: int, rand: Callable) -> None:
    """Small random hyper-connection projections with zero bias and unit scales (the streams start
    near an even mix); on hash layers, each vocabulary id's top_k distinct experts."""
    p = shapes_v4.prefix(i)
    for k in ("attn", "ffn"):
        t[f"{p}hc_{k}_fn"] = rand(f"{p}hc_{k}_fn", t[f"{p}hc_{k}_fn"].shape, seed, 0.02)
        t[f"{p}hc_{k}_base"] = torch.zeros_like(t[f"{p}hc_{k}_base"])
        t[f"{p}hc_{k}_scale"] = torch.ones_like(t[f"{p}hc_{k}_scale"])
    if i in spec.v4.hash_layers:
        m = spec.moe
        g = torch.Generator().manual_seed(seed * 1000 + i)
        t[f"{p}ffn.gate.tid2eid"] = torch.rand(spec.vocab_size, m.num_experts, generator=g).argsort(-1)[:, :m.top_k]


def head_tensors(spec: ModelSpec, seed: int, rand: Callable) -> dict:
    g, n, H = shapes_v4.GLOBALS, spec.v4.hc_mult, spec.hidden_size
    return {g["hc_fn"]: rand(g["hc_fn"], (n, n * H), seed, 0.02), g["hc_base"]: torch.zeros(n),
            g["hc_scale"]: torch.ones(1)}


def run_layer(spec: ModelSpec, i: int, t: dict, h: torch.Tensor, ids: list[int], be, seed: int, reader,
              calibrate: Callable, moe_loader: Callable) -> tuple[torch.Tensor, int]:
    """Layer ``i`` on the streams h [T, n, D]; its router (in ``t``) is calibrated on the MoE input.
    Returns the new streams and how many distinct experts the prompt reached."""
    from kt_core.kvcache.paged import PagedKVCache

    hd, eps = spec.head_dim, spec.rms_eps
    cache = PagedKVCache(1, math.ceil(len(ids) / 16), 16, 1, hd, torch.float32, torch.device("cpu"), latent=True,
                         extra_dims=[spec.v4.extra_dim(i, hd)])
    batch = cache.prepare([0], [ids], all_logits=True)
    tables = deepseek_v4.rope_tables(spec, len(ids) + 1)
    layer = deepseek_v4.load_layer(reader(t), spec, i, None, be, torch.device("cpu"), tables)
    post, comb, x = deepseek_v4.hyper(h, layer.hc["attn"], spec)
    a = layer.attn(be, be.rmsnorm(x, layer.norm1, eps), batch, *cache.layer_caches(0), tables)
    h = deepseek_v4.mix(post, comb, a, h)
    post, comb, x = deepseek_v4.hyper(h, layer.hc["ffn"], spec)
    x = be.rmsnorm(x, layer.norm2, eps)
    name = f"{shapes_v4.prefix(i)}ffn.gate.weight"
    t[name] = calibrate(x, spec.moe.num_experts, name, seed)
    block = moe_loader(reader(t))
    _, chosen = block.route(be, x, batch.tokens)
    return deepseek_v4.mix(post, comb, block(be, x, batch.tokens), h), int(chosen.unique().numel())
