"""``TorchBackend``: the whole contract on plain torch, for any torch device type.

Accelerator plugins subclass it and set ``name`` / ``device_type`` /
``dist_backend`` / ``visible_devices_env``; they override resource queries their
vendor module does differently and hot ops with their own kernels.
"""
from __future__ import annotations

import types
from typing import Any, Optional, Sequence

import torch

from kt_core.backend.contract import Backend, DeviceInfo, MemoryInfo, Op, ProbeResult
from kt_core.backend.torch_ops import (attention, cache, linear_attention, moe, norm_rope, routing, sampling,
                                      sparse_index)
from kt_core.weights.quant import ExpertWeights, Quant

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WEIGHT_OPS = {Op.LINEAR, Op.MOE_EXPERTS}


class TorchBackend(Backend):
    """Reference backend; a subclass only needs ``name``, ``device_type`` and ``probe``."""

    name = "torch"
    device_type = "cpu"
    #: dtypes this device computes in (subclasses narrow it)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    #: weight formats its linear / moe_experts accept
    quants: tuple[Quant, ...] = (Quant.NONE, Quant.INT8, Quant.INT4, Quant.FP8, Quant.W8A8)

    def __init__(self) -> None:
        probe = type(self).probe()
        if not probe.available:
            from kt_core.errors import DeviceUnavailable
            raise DeviceUnavailable(self.name, probe.reason)

    @classmethod
    def probe(cls) -> ProbeResult:  # pragma: no cover - each plugin defines its own
        return ProbeResult(True, "plain torch")

    # ---- resources -------------------------------------------------------------
    @property
    def module(self) -> types.ModuleType:
        """``torch.cuda`` / ``torch.xpu`` / ``torch.npu`` / ``torch.cpu``."""
        return torch.get_device_module(self.device_type)

    def devices(self) -> list[DeviceInfo]:
        mod = self.module
        out = []
        for i in range(mod.device_count()):
            props = mod.get_device_properties(i)
            out.append(DeviceInfo(i, str(getattr(props, "name", f"{self.device_type}:{i}")),
                                  int(getattr(props, "total_memory", 0))))
        return out

    def memory_info(self, index: int = 0) -> MemoryInfo:
        free, total = self.module.mem_get_info(index)
        return MemoryInfo(int(free), int(total))

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index)

    def host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    def new_stream(self, index: int = 0) -> Any:
        return torch.Stream(device=self.torch_device(index))

    def new_event(self, index: int = 0) -> Any:
        return torch.Event(device=self.torch_device(index))

    def synchronize(self, index: Optional[int] = None) -> None:
        if index is None:
            for d in range(len(self.devices())):
                self.module.synchronize(d)
        else:
            self.module.synchronize(index)

    # ---- capabilities ----------------------------------------------------------
    @classmethod
    def supports(cls, op, dtype, quant=Quant.NONE) -> bool:
        try:
            op, quant = Op(op), Quant(quant)
        except ValueError:
            return False
        if dtype not in cls.dtypes:
            return False
        if quant is not Quant.NONE:
            return op in _WEIGHT_OPS and quant in cls.quants
        return True

    # ---- ops (each delegates to torch_ops; plugins override the hot ones) -------
    def linear(self, x, weight, bias=None):
        return moe.linear(x, weight, bias)

    def moe_experts(self, hidden, topk_ids, topk_weights, experts: ExpertWeights, activation="silu"):
        return moe.moe_experts(hidden, topk_ids, topk_weights, experts, activation)

    def attention_prefill(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                          causal=True, sliding_window=None, sinks=None, chunk=None):
        return attention.attention_prefill(q, k_cache, v_cache, block_tables, seq_lens,
                                           query_start_loc, scale, causal, sliding_window, sinks, chunk)

    def attention_decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None,
                         sinks=None, chunk=None):
        return attention.attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                          sliding_window, sinks, chunk)

    def attention_mla(self, q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens,
                      query_start_loc, scale, causal=True, selected=None):
        return attention.attention_mla(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens,
                                       query_start_loc, scale, causal, selected)

    def sparse_index(self, q, weights, index_cache, block_tables, seq_lens, query_start_loc, scale, topk):
        return sparse_index.sparse_index(q, weights, index_cache, block_tables, seq_lens, query_start_loc, scale,
                                         topk)

    def gated_delta_rule(self, q, k, v, g, beta, state, slots, query_start_loc):
        return linear_attention.gated_delta_rule(q, k, v, g, beta, state, slots, query_start_loc)

    def causal_conv1d(self, x, conv_state, weight, slots, query_start_loc, activation="silu"):
        return linear_attention.causal_conv1d(x, conv_state, weight, slots, query_start_loc, activation)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        cache.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def copy_blocks(self, caches, block_mapping):
        cache.copy_blocks(caches, block_mapping)

    def swap_blocks(self, src, dst, block_mapping):
        cache.swap_blocks(src, dst, block_mapping)

    def rmsnorm(self, x, weight, eps):
        return norm_rope.rmsnorm(x, weight, eps)

    def rope(self, q, k, positions, cos_sin, interleaved=False):
        return norm_rope.rope(q, k, positions, cos_sin, interleaved)

    def route(self, logits, top_k, scoring="softmax", renormalize=True, n_group=1, topk_group=1,
              bias=None, routed_scaling_factor=1.0):
        return routing.route(logits, top_k, scoring, renormalize, n_group, topk_group, bias,
                             routed_scaling_factor)

    def sampling_probs(self, logits, temperature, top_k, top_p, min_p):
        return sampling.sampling_probs(logits, temperature, top_k, top_p, min_p)

    def sample(self, logits, temperature, top_k, top_p, min_p, generator=None):
        return sampling.sample(logits, temperature, top_k, top_p, min_p, generator)
