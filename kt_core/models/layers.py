"""The building blocks of every supported decoder, computed through the device contract.

One attention class covers MHA/GQA (with biases, QK-norm, sliding windows and
sinks as data); ``MLAttention`` is DeepSeek's latent attention; one ``MoEBlock``
covers every router and activation, optionally with a (gated) shared expert.
"""
from __future__ import annotations

from typing import Optional

import torch

from kt_core.backend.contract import Backend
from kt_core.backend.torch_ops.moe import gated_activation
from kt_core.kvcache.paged import Batch
from kt_core.models.spec import ModelSpec
from kt_core.weights.quant import Weight


def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a tensor between devices for an expert shard. Accelerator -> host goes through a
    pinned buffer and waits for the copy on the source stream (the CPU reads it next); host ->
    accelerator copies from pinned memory without blocking the host."""
    if t.device == device:
        return t
    if t.requires_grad and torch.is_grad_enabled():  # training (a hybrid topology): autograd's own copy
        return t.to(device)
    if device.type == "cpu" and t.device.type != "cpu":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.get_device_module(t.device.type).current_stream(t.device).synchronize()
        return host
    if t.device.type == "cpu" and device.type != "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Attention:
    def __init__(self, w: dict, spec: ModelSpec, layer: int) -> None:
        self.w, self.spec = w, spec
        self.window, self.chunk = spec.window(layer), spec.chunk(layer)
        self.rope = layer not in spec.nope_layers
        self.temperature = None if self.rope else spec.attn_temperature

    def __call__(self, be: Backend, x: torch.Tensor, batch: Batch, k_cache, v_cache, cos_sin) -> torch.Tensor:
        s, w, T = self.spec, self.w, x.shape[0]
        if "qkv" in w:  # fused at load: one product
            q, k, v = be.linear(x, w["qkv"], w.get("qkv_bias")).split(w["qkv_rows"], dim=-1)
        else:
            q, k = be.linear(x, w["q"], w.get("q_bias")), be.linear(x, w["k"], w.get("k_bias"))
            v = be.linear(x, w["v"], w.get("v_bias"))
        gate = None
        if s.attn_output_gate:  # Qwen3-Next: per head, its query then its output gate
            q, gate = q.view(T, s.num_heads, 2, s.head_dim).unbind(2)
            q, gate = q.reshape(T, -1), gate.reshape(T, -1)
        if s.qk_norm and s.qk_norm_whole:  # over all heads together, before the split
            q, k = be.rmsnorm(q, w["q_norm"], s.rms_eps), be.rmsnorm(k, w["k_norm"], s.rms_eps)
        q, k = q.reshape(T, s.num_heads, s.head_dim), k.reshape(T, s.num_kv_heads, s.head_dim)
        v = v.reshape(T, s.num_kv_heads, s.head_dim)
        if s.qk_norm and not s.qk_norm_whole:
            q, k = be.rmsnorm(q, w["q_norm"], s.rms_eps), be.rmsnorm(k, w["k_norm"], s.rms_eps)
        if self.rope:
            q, k = be.rope(q, k, batch.positions, cos_sin, s.rope.interleaved)
            if s.qk_l2_norm:
                q, k = be.rmsnorm(q, w["l2"], s.rms_eps), be.rmsnorm(k, w["l2"], s.rms_eps)
        if self.temperature is not None:  # Llama 4's NoPE layers sharpen attention far into the context
            floor_scale, attn_scale = self.temperature
            pos = batch.positions.float()
            t = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q.float() * t[:, None, None]).to(q.dtype)
        be.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        sinks = w.get("sinks")
        if batch.is_decode:
            o = be.attention_decode(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, s.softmax_scale,
                                    self.window, sinks, chunk=self.chunk)
        else:
            o = be.attention_prefill(q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                     batch.query_start_loc, s.softmax_scale, True, self.window, sinks,
                                     chunk=self.chunk)
        o = o.reshape(T, -1)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return be.linear(o, w["o"], w.get("o_bias"))


class MLAttention:
    """DeepSeek-V2/V3 multi-head latent attention over the compressed KV cache."""

    def __init__(self, w: dict, spec: ModelSpec, layer: int) -> None:
        self.w, self.spec = w, spec
        self.w_uk, self.w_uv = self._absorbed(w["kv_b"].float(), w["kv_b"].dtype)
        self.selected: Optional[torch.Tensor] = None  # this step's indexer choice (sparse attention)
        self.source: Optional["MLAttention"] = None  # GLM-5's shared layers: whose choice to reuse

    def _absorbed(self, kv_b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's key and value halves per head, [H, dn, lora] and [H, dv, lora]."""
        s, m = self.spec, self.spec.mla
        kv_b = kv_b.view(s.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return kv_b[:, : m.qk_nope_head_dim].to(dtype).contiguous(), kv_b[:, m.qk_nope_head_dim:].to(dtype).contiguous()

    def __call__(self, be: Backend, x: torch.Tensor, batch: Batch, k_cache, index_cache, cos_sin) -> torch.Tensor:
        """``index_cache``: DeepSeek-V3.2's indexer keys (None without sparse attention)."""
        s, w, m, T = self.spec, self.w, self.spec.mla, x.shape[0]
        q_a = None
        if m.q_lora_rank:
            q_a = be.rmsnorm(be.linear(x, w["q_a"]), w["q_a_norm"], s.rms_eps)
            q = be.linear(q_a, w["q_b"])
        else:
            q = be.linear(x, w["q"])
        q = q.view(T, s.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim)
        q_nope, q_pe = q[..., : m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        kv = be.linear(x, w["kv_a"])
        c, k_pe = kv[:, : m.kv_lora_rank], kv[:, m.kv_lora_rank:]
        c = be.rmsnorm(c, w["kv_a_norm"], s.rms_eps)
        q_pe, k_pe = be.rope(q_pe.contiguous(), k_pe[:, None, :].contiguous(), batch.positions, cos_sin,
                             s.rope.interleaved)
        be.write_kv(torch.cat((c, k_pe[:, 0]), dim=-1)[:, None, :], None, k_cache, None, batch.slot_mapping)
        selected = None
        if self.source is not None:  # GLM-5: the last indexer layer's choice, from this same step
            selected = self.source.selected.to(x.device)
        elif s.index is not None:  # DeepSeek sparse attention: the indexer picks the tokens each query sees
            from kt_core.models import indexer

            selected = self.selected = indexer.select(be, w["indexer"], s, x, q_a, batch, index_cache, cos_sin)
        w_uk, w_uv, kv_b = self.w_uk, self.w_uv, w["kv_b"]
        if hasattr(kv_b, "scaling"):  # a LoRA on kv_b_proj being trained: the halves follow its update
            w_uk, w_uv = self._absorbed(kv_b.base.float() + kv_b.scaling * (kv_b.b @ kv_b.a), kv_b.base.dtype)
        o = be.attention_mla(q_nope, q_pe, k_cache, w_uk, w_uv, batch.block_tables, batch.seq_lens,
                             batch.query_start_loc, s.softmax_scale, selected=selected)
        return be.linear(o.reshape(T, -1), w["o"])


class DenseMLP:
    def __init__(self, gate: Optional[Weight], up: Optional[Weight], down: Weight, activation: str = "silu",
                 gate_up: Optional[Weight] = None) -> None:
        """``gate_up``: gate and up stacked by rows (fused at load), in place of ``gate`` / ``up``."""
        self.gate, self.up, self.down, self.activation, self.gate_up = gate, up, down, activation, gate_up

    def __call__(self, be: Backend, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = be.linear(x, self.gate_up).chunk(2, dim=-1)
        else:
            g, u = be.linear(x, self.gate), be.linear(x, self.up)
        return be.linear(gated_activation(g, u, self.activation), self.down)


class MoEBlock:
    """Router -> routed experts (partial sums over every shard that holds some) [+ shared expert].

    ``shards`` are (backend, torch device, experts it holds); with one shard this is a plain
    MoE layer, with several the partial sums are added (hybrid placement), overlapped.
    """

    def __init__(self, spec: ModelSpec, router: torch.Tensor, router_bias: Optional[torch.Tensor],
                 score_bias: Optional[torch.Tensor], shards: list[tuple[Backend, torch.device, object]],
                 shared: Optional[DenseMLP] = None, shared_gate: Optional[torch.Tensor] = None) -> None:
        self.moe = spec.moe
        self.layer: Optional[int] = None
        self.recorder = None  # callable(layer, topk_ids) while routing statistics are collected
        # bf16 when its values are (a bf16 checkpoint's): half the bytes a token streams, and the CPU
        # backend's native GEMV takes it (a float32 router ran torch's one-thread GEMV: 150 us a layer
        # of Qwen3-30B-A3B's shape); the products are summed in float32 either way
        self.router = router if router.dtype == torch.bfloat16 else router.float()
        self.router_bias = None if router_bias is None else router_bias.float()
        self.score_bias, self.shards, self.shared, self.shared_gate = score_bias, shards, shared, shared_gate
        self.deferred = 0  # expert deferral: this many lowest-weight routes finish one layer later
        self._pending_deferred: list = []
        self.tid2eid: Optional[torch.Tensor] = None  # DeepSeek-V4's hash layers: token id -> its experts

    def pop_deferred(self) -> list:
        """Futures of the deferred routes of the last call (added by the model after the next layer)."""
        out, self._pending_deferred = self._pending_deferred, []
        return out

    def _start(self, x, ids, weights, act) -> list:
        """Start every shard but the first asynchronously, inputs moved to its device once."""
        pending = []
        for shard_be, device, experts in self.shards[1:]:
            pending.append(shard_be.moe_experts_async(*[move(t, device) for t in (x, ids, weights)], experts, act))
        return pending

    def route(self, be: Backend, x: torch.Tensor, tokens: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.moe
        logits = be.linear(x.float(), self.router, self.router_bias)  # float32, as the references route
        if self.tid2eid is not None:  # the experts are the token's, by a fixed table; the scores weight them
            from kt_core.backend.torch_ops.routing import expert_scores

            ids = self.tid2eid[tokens.to(self.tid2eid.device)].to(logits.device)
            weights = expert_scores(logits, m.scoring).gather(1, ids)
            if m.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            return weights * m.routed_scaling_factor, ids
        return be.route(logits, m.top_k, m.scoring, m.renormalize, m.n_group, m.topk_group, self.score_bias,
                        m.routed_scaling_factor)

    def __call__(self, be: Backend, x: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tokens``: the step's token ids (read by hash routing only)."""
        weights, ids = self.route(be, x, tokens)
        if self.recorder is not None:
            self.recorder(self.layer, ids)
        if self.moe.weight_input:
            return self._weighted_input(be, x, weights, ids)
        return self._experts(be, x, weights, ids)

    def _weighted_input(self, be: Backend, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Llama 4: each route runs its expert on the input scaled by the routing weight (one row per
        route, unit weights), and a token's routes are summed."""
        T, K = ids.shape
        xs = (x[:, None, :] * weights[:, :, None].to(x.dtype)).reshape(T * K, -1)
        ones = torch.ones(T * K, 1, dtype=weights.dtype, device=weights.device)
        out = self._experts(be, xs, ones, ids.reshape(T * K, 1), shared=False).view(T, K, -1).sum(1)
        return out if self.shared is None else out + self.shared(be, x)

    def _experts(self, be: Backend, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 shared: bool = True) -> torch.Tensor:
        act = self.moe.activation
        if 0 < self.deferred < ids.shape[1]:
            order = weights.argsort(dim=-1, descending=True)
            weights, ids = weights.gather(1, order), ids.gather(1, order)
            keep = ids.shape[1] - self.deferred
            late_ids, late_w = ids[:, keep:].contiguous(), weights[:, keep:].contiguous()
            ids, weights = ids[:, :keep].contiguous(), weights[:, :keep].contiguous()
            self._pending_deferred = [
                shard_be.moe_experts_async(*[move(t, device) for t in (x, late_ids, late_w)], experts, act)
                for shard_be, device, experts in self.shards]
        # every shard after the first starts asynchronously on its own device; the first shard
        # (the accelerator's, by topology order) and the shared expert run meanwhile; the
        # partial sums are added where the hidden states live
        pending = self._start(x, ids, weights, act)
        out = None
        if self.shards:
            shard_be, device, experts = self.shards[0]
            out = move(shard_be.moe_experts(*[move(t, device) for t in (x, ids, weights)], experts, act), x.device)
        if self.shared is not None and shared:
            s = self.shared(be, x)
            if self.shared_gate is not None:
                s = torch.sigmoid(be.linear(x, self.shared_gate)) * s
            out = s if out is None else out + s
        for fut in pending:
            part = move(fut.result(), x.device)
            out = part if out is None else out + part
        return out
