"""The host CPU as a device: torch for most ops, the native kernels (runtime ISA dispatch, see
``native/``) when they are built and take the inputs: expert GEMM and dense projections in their
formats, and the decode step's attention over the paged KV cache, RMS norm and rotary embeddings
(``native_ops``: bf16 / float32 CPU tensors) and MLA attention (``native_mla``)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import logging

import torch

from kt_core.backend.contract import DeviceInfo, MemoryInfo, ProbeResult
from kt_core.backend.cpuinfo import cpu_info
from kt_backends.cpu import hugepages, native, native_attention, native_linear, native_mla, native_ops
from kt_backends.cpu import probe as cpu_probe
from kt_core.backend.torch_backend import TorchBackend
from kt_core.backend.torch_ops import wide_mm
from kt_core.weights.quant import Quant, QuantizedWeight

log = logging.getLogger(__name__)


_warned: set = set()
PREFILL_ROWS = 16  # bf16 linears with this many rows or more go to torch's GEMM on bf16 matrix units
WIDE_ROWS = 64  # ... and without them (nor oneDNN bf16) to float32 products (backend/torch_ops/wide_mm.py)
TORCH_THREADS_WITH_NATIVE = 1  # torch intra-op threads while the native pools do the heavy work


def _bf16_matrix_units() -> bool:
    return cpu_info().variant == "amx" or "avx512_bf16" in cpu_info().flags


def _slow_path_once(what: str) -> None:
    """Say once per kind that the native kernels do not take some weights: the torch path then
    dequantizes them on every call, which is correct but far slower."""
    if what not in _warned:
        _warned.add(what)
        log.warning("CPU: the native kernels do not take %s (%s); they run on the torch path, which is "
                    "much slower", what, native.status())


class CpuBackend(TorchBackend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    @classmethod
    def probe(cls) -> ProbeResult:
        return cpu_probe.probe()

    @classmethod
    def score(cls) -> int:
        return cpu_probe.score()

    logical = 1  # logical devices (device.cpu.count): separate worker pools on separate cores

    def devices(self) -> list[DeviceInfo]:
        return [d for d, _ in cpu_probe.inventory(self.logical)]

    def memory_info(self, index: int = 0) -> MemoryInfo:
        return cpu_probe.inventory(self.logical)[0][1]

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype)  # host memory is the device's own

    def new_stream(self, index: int = 0) -> Any:
        return torch.Stream(device="cpu")

    def new_event(self, index: int = 0) -> Any:
        return torch.Event(device="cpu")

    def synchronize(self, index: Optional[int] = None) -> None:
        return None  # CPU ops complete before they return

    def prepare_experts(self, experts, index: int = 0):
        if native.available():  # experts are handed over (load time): pack lets go of each packed projection
            packed = native.pack(experts, release=True)
            if packed is not None:
                packed.pool = index
                return packed
        return experts

    def prepare_dense(self, weight, index: int = 0, owned: bool = False):
        packed = native_linear.pack_linear(weight, in_place=owned)
        if packed is None:
            if isinstance(weight, QuantizedWeight):
                _slow_path_once(f"{weight.format.value} dense weights (group {weight.group_size})")
            return weight
        packed.pool = index
        return packed

    def dense_empty(self, shape, dtype, index: int = 0):
        return hugepages.huge_or_none(shape, dtype)  # a GEMV streams it: 2 MB pages spare the TLB walks

    def linear(self, x, weight, bias=None):
        if isinstance(weight, native_linear.PackedLinear):
            return native_linear.linear(x, weight, bias)
        if native.takes_linear(x, weight):
            if x.dtype == torch.bfloat16 and x.numel() >= PREFILL_ROWS * x.shape[-1] and _bf16_matrix_units():
                # prefill of a bf16 model: torch's oneDNN GEMM runs on AMX / AVX512-BF16 tiles
                # (4096x2048, 512 tokens: 26 ms vs 590 ms for the row-major GEMV kernel)
                return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))
            if x.numel() >= WIDE_ROWS * x.shape[-1] and wide_mm.takes(x, weight):
                # no bf16 GEMM in torch here (AVX2-only): float32 products beat the row-major kernel from 64
                # rows (Zen 3, 2 threads: 4096x2048 at 128 rows 16 vs 22 ms, 512 rows 51 vs 84)
                return wide_mm.linear(x, weight, bias)
            return native.linear(x, weight, bias)
        return super().linear(x, weight, bias)

    def moe_experts(self, hidden, topk_ids, topk_weights, experts, activation="silu"):
        if isinstance(experts, native.PackedExperts):
            return native.moe_forward(experts, hidden, topk_ids, topk_weights, activation, experts.pool)
        if experts.format is not Quant.NONE:
            _slow_path_once(f"{experts.format.value} experts")
        return super().moe_experts(hidden, topk_ids, topk_weights, experts, activation)

    def moe_experts_async(self, hidden, topk_ids, topk_weights, experts, activation="silu"):
        if isinstance(experts, native.PackedExperts):  # on the logical device's own workers
            return native.submit(experts, hidden, topk_ids, topk_weights, activation, experts.pool)
        return super().moe_experts_async(hidden, topk_ids, topk_weights, experts, activation)

    # The decode step's small per-layer ops: the native kernels when they take the inputs (bf16 / float32
    # CPU tensors; native_ops.try_* say None otherwise), else the torch reference. On a 48-layer model
    # the torch ops' per-call overheads (a dozen small ops each) were most of a decode step.
    def attention_prefill(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                          causal=True, sliding_window=None, sinks=None, chunk=None):
        # a bf16 model's two products on the AMX tiles (native_attention); else torch's SDPA
        out = native_attention.try_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                     scale, causal, sliding_window, sinks, chunk)
        if out is not None:
            return out
        return super().attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, causal,
                                         sliding_window, sinks, chunk)

    def attention_decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None,
                         sinks=None, chunk=None):
        out = native_ops.try_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                              sinks, chunk)
        if out is not None:
            return out
        return super().attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, sinks,
                                        chunk)

    def attention_mla(self, q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, query_start_loc, scale,
                      causal=True, selected=None):
        # a decode step's MLA in one native call; a bf16 prefill expanded to multi-head attention on
        # the tiles (native_mla); sparse selection and the rest on torch
        for attempt in (native_mla.try_mla_decode, native_mla.try_mla_prefill):
            out = attempt(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens, query_start_loc, scale,
                          causal, selected)
            if out is not None:
                return out
        return super().attention_mla(q_nope, q_pe, latent_cache, w_uk, w_uv, block_tables, seq_lens,
                                     query_start_loc, scale, causal, selected)

    def rmsnorm(self, x, weight, eps):
        out = native_ops.try_rmsnorm(x, weight, eps)
        return out if out is not None else super().rmsnorm(x, weight, eps)

    def rope(self, q, k, positions, cos_sin, interleaved=False):
        out = native_ops.try_rope(q, k, positions, cos_sin, interleaved)
        return out if out is not None else super().rope(q, k, positions, cos_sin, interleaved)

    def decode_plan(self, model, cache):
        from kt_backends.cpu import native_layer

        return native_layer.plan(model, cache)

    def set_threads(self, n: int, logical: int = 1) -> None:
        """Split n threads over ``logical`` devices: torch ops and pool 0 serve cpu:0, pool i
        serves cpu:i (the dense GEMV uses pool 0)."""
        CpuBackend.logical = max(1, logical)
        per = max(1, n // CpuBackend.logical)
        if native.available():
            for i in range(CpuBackend.logical):
                native.set_pool_threads(i, per)
        # The native pools run the weight-streaming ops; in a decode step torch's own (attention,
        # norms, routing, sampling) are small, and OpenMP workers spinning beside the pool's took
        # the cores from each other: one intra-op thread made a decode step 2.5x faster. A prefill
        # step's torch ops (attention over the prompt, bf16 projections on oneDNN) are large and
        # take every thread: 1.33x the prefill tokens/s (bench/README.md). begin_step switches.
        CpuBackend._torch_threads = {True: TORCH_THREADS_WITH_NATIVE if native.available() else per, False: per}
        self.begin_step(decode=False)  # until the first decode step (loading: quantizing, packing) all of them

    _torch_threads = None  # {decode: torch intra-op threads}, set by set_threads

    @classmethod
    def set_torch_threads(cls, decode: int, prefill: int) -> None:
        """torch's intra-op threads in decode and in prefill steps (benchmarks; set_threads picks them)."""
        cls._torch_threads = {True: max(1, int(decode)), False: max(1, int(prefill))}

    def begin_step(self, decode: bool) -> None:
        if CpuBackend._torch_threads is None:
            return  # set_threads was never called: torch keeps its own setting
        n = CpuBackend._torch_threads[bool(decode)]
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


Backend = CpuBackend
