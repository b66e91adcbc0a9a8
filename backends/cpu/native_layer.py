"""A decode step's decoder layers in one native call (``native/decode_layer.inc``).

The per-op path calls a dozen or more small ops a layer from Python (norms, projections, rope, the
KV write, attention, router, experts, residual adds), each costing 5-20 us of call overhead: on a
model of small layers that overhead was most of a decode step. A :class:`DecodePlan` describes
each layer it can take once (weights, norms, caches, shapes as raw pointers in one argument block a
layer), and a decode step then runs every run of consecutive such layers in one call, with the same
rounding to the model's dtype as the per-op path, so the logits match it.

What it takes (anything else runs the per-op path, layer by layer, as before): one CPU backend,
GQA/MHA attention with optional per-head q/k norms, rope, sliding windows, chunks and sinks, q/k/v
fused at load; a MoE with softmax routing (no score bias, no groups) over experts packed for the
native kernels, optionally with an ungated shared expert, or a dense SiLU-gated MLP with gate/up
fused; projections in bf16 (row-major) or packed (``quant.dense``); float32 or bf16 hidden states and
caches; fewer than 16 sequences in the step (from 16 rows a bf16 projection goes to torch's GEMM).
``KT_FUSED_DECODE=0`` turns it off (benchmarks, bisecting).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from kt_backends.cpu import native, native_ops
from kt_backends.cpu.native_abi import ACTIVATIONS, FORMATS, _check_rc, _MoeArgs
from kt_backends.cpu.native_linear import PackedLinear, _LinearArgs, check_packed_linear

_DT = {torch.float32: 0, torch.bfloat16: 1}
_FFN_DENSE, _FFN_MOE = 1, 2
MAX_ROWS = 15  # sequences a fused step takes (CpuBackend.PREFILL_ROWS - 1)


class _LayerLinear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("pad", ctypes.c_int), ("a", _LinearArgs)]


_I64, _F, _I, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


class _LayerArgs(ctypes.Structure):  # decode_layer.inc DecodeLayerArgs
    _fields_ = ([(n, _I64) for n in ("H", "Hq", "Hkv", "D", "rot", "table_rows", "num_blocks", "block_size", "window",
                                     "chunk", "n_experts", "top_k", "I_dense")]
                + [(n, _F) for n in ("eps", "attn_scale", "routed_scaling")]
                + [(n, _I) for n in ("dtype", "norm_dtype", "qk_norm_dtype", "kv_dtype", "interleaved", "ffn",
                                     "renormalize", "pool")]
                + [(n, _P) for n in ("norm1", "norm2", "q_norm", "k_norm", "cos_sin", "sinks", "k_cache", "v_cache")]
                + [(n, _LayerLinear) for n in ("qkv", "o", "q", "k", "v", "gate_up", "down", "router", "shared_gate")]
                + [("moe", _MoeArgs)])


class _StepArgs(ctypes.Structure):  # decode_layer.inc DecodeStepArgs
    _fields_ = [("B", _I64), ("n_layers", _I64), ("max_blocks", _I64), ("dtype", _I), ("pad", _I), ("h", _P),
                ("positions", _P), ("slots", _P), ("block_tables", _P), ("seq_lens", _P), ("layers", _P),
                ("failed_layer", _P)]


_fn = None  # the library's kt_decode_layers with its argument layout checked, False when absent


def _lib():
    global _fn
    if _fn is None:
        _fn = False
        if native.available():
            lib = native._need()
            fn = getattr(lib, "kt_decode_layers", None)
            size, step = getattr(lib, "kt_decode_layer_args_size", None), getattr(lib, "kt_decode_step_args_size", None)
            if fn is not None and size is not None and step is not None:
                size.restype = step.restype = ctypes.c_int64
                if size() == ctypes.sizeof(_LayerArgs) and step() == ctypes.sizeof(_StepArgs):
                    fn.argtypes, fn.restype = [ctypes.POINTER(_StepArgs)], ctypes.c_int
                    _fn = fn
    return _fn or None


def enabled() -> bool:
    return os.environ.get("KT_FUSED_DECODE", "1") != "0" and _lib() is not None


def _linear(w, bias, keep: list, router: bool = False) -> Optional[_LayerLinear]:
    """A projection as the fused call takes it (bf16 row-major or packed panels on pool 0; a router
    also float32 row-major), or None."""
    b = None
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.device.type != "cpu" or bias.dim() != 1:
            return None
        b = bias.float().contiguous()
        keep.append(b)
    if isinstance(w, PackedLinear):
        p = w.proj
        if check_packed_linear(w) != 0 or (b is not None and b.numel() != w.out_features):
            return None
        a = _LinearArgs(0, w.in_features, w.out_features, FORMATS[w.fmt], w.group, None, p.data.data_ptr(),
                        native._ptr(p.scale), native._ptr(p.zero), native._ptr(b),
                        p.data.numel() * p.data.element_size(), None, 0, 0, p.scale_f16)
        keep.append(w)
        return _LayerLinear(2, 0, a)
    if (type(w) is torch.Tensor and w.dtype in (torch.bfloat16, torch.float32) and w.dim() == 2
            and w.device.type == "cpu" and w.is_contiguous() and (b is None or b.numel() == w.shape[0])):
        if w.dtype == torch.float32 and not router:  # only a router stays float32 (CpuBackend runs torch on others)
            return None
        keep.append(w)
        kind = 1 if w.dtype == torch.bfloat16 else 3
        return _LayerLinear(kind, 0, _LinearArgs(0, w.shape[1], w.shape[0], FORMATS["bf16"], 0, None, w.data_ptr(),
                                                 None, None, native._ptr(b), w.numel() * w.element_size(), None, 0, 0))
    return None


def _norm(t, D: int) -> Optional[torch.Tensor]:
    ok = (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype in _DT and t.numel() == D
          and t.is_contiguous())
    return t if ok else None


def _dense(mlp, L: _LayerArgs, keep: list) -> bool:
    """A dense SiLU-gated MLP with gate/up fused into L.gate_up / L.down."""
    from kt_core.models.layers import DenseMLP

    if type(mlp) is not DenseMLP or mlp.gate_up is None or mlp.activation != "silu":
        return False
    gu, down = _linear(mlp.gate_up, None, keep), _linear(mlp.down, None, keep)
    if gu is None or down is None or gu.a.M % 2 or down.a.K * 2 != gu.a.M:
        return False
    L.gate_up, L.down, L.I_dense = gu, down, gu.a.M // 2
    return True


def _layer(model, i: int, cache, keep: list) -> Optional[_LayerArgs]:
    """Layer i's argument block, or None when the fused call does not take it."""
    from kt_backends.cpu.backend import CpuBackend
    from kt_core.models.layers import Attention, MoEBlock

    s, layer = model.spec, model.layers[i]
    attn = layer.attn
    if (not isinstance(layer.be, CpuBackend) or layer.device.type != "cpu" or s.v4 is not None
            or type(attn) is not Attention or s.attn_output_gate or s.qk_l2_norm or attn.temperature is not None
            or (s.qk_norm and s.qk_norm_whole)):
        return None
    w, H, D, Hq, Hkv = attn.w, s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads
    L = _LayerArgs()
    o = _linear(w.get("o"), w.get("o_bias"), keep)
    if "qkv" in w:  # fused at load
        qkv = _linear(w["qkv"], w.get("qkv_bias"), keep)
    else:  # three products (a GGUF's q / k / v, each in its own type)
        parts = [_linear(w.get(n), w.get(f"{n}_bias"), keep) for n in "qkv"]
        qkv = None if None in parts else _LayerLinear()  # kind 0: the three below
        if qkv is not None:
            L.q, L.k, L.v = parts
    n1, n2 = _norm(layer.norm1, H), _norm(layer.norm2, H)
    k_cache, v_cache = cache.layer_caches(i)
    caches_ok = all(type(c) is torch.Tensor and c.device.type == "cpu" and c.dtype in _DT and c.is_contiguous()
                    and tuple(c.shape[2:]) == (Hkv, D) and c.dim() == 4 for c in (k_cache, v_cache))
    if qkv is None or o is None or n1 is None or n2 is None or not caches_ok or k_cache.shape != v_cache.shape \
            or k_cache.dtype != v_cache.dtype or n1.dtype != n2.dtype:
        return None
    L.H, L.Hq, L.Hkv, L.D, L.qkv, L.o, L.dtype = H, Hq, Hkv, D, qkv, o, _DT.get(model.dtype, -1)
    L.eps, L.attn_scale, L.pool = float(s.rms_eps), float(s.softmax_scale), 0
    L.norm1, L.norm2, L.norm_dtype = n1.data_ptr(), n2.data_ptr(), _DT[n1.dtype]
    L.num_blocks, L.block_size = k_cache.shape[0], k_cache.shape[1]
    L.k_cache, L.v_cache, L.kv_dtype = k_cache.data_ptr(), v_cache.data_ptr(), _DT[k_cache.dtype]
    L.window, L.chunk = int(attn.window or 0), int(attn.chunk or 0)
    keep.extend((n1, n2, k_cache, v_cache))
    if s.qk_norm:
        qn, kn = _norm(w.get("q_norm"), D), _norm(w.get("k_norm"), D)
        if qn is None or kn is None or qn.dtype != kn.dtype:
            return None
        L.q_norm, L.k_norm, L.qk_norm_dtype = qn.data_ptr(), kn.data_ptr(), _DT[qn.dtype]
        keep.extend((qn, kn))
    if attn.rope:
        cs = layer.cos_sin
        if type(cs) is not torch.Tensor or cs.dtype != torch.float32 or cs.dim() != 2 or not cs.is_contiguous() \
                or cs.device.type != "cpu" or cs.shape[1] % 2 or not 2 <= cs.shape[1] <= D:
            return None
        L.cos_sin, L.rot, L.table_rows, L.interleaved = cs.data_ptr(), cs.shape[1], cs.shape[0], int(s.rope.interleaved)
        keep.append(cs)
    sinks = w.get("sinks")
    if sinks is not None:
        if type(sinks) is not torch.Tensor or sinks.device.type != "cpu" or sinks.numel() != Hq:
            return None
        sinks = sinks.float().contiguous()
        L.sinks = sinks.data_ptr()
        keep.append(sinks)
    ffn = layer.ffn
    if isinstance(ffn, MoEBlock):
        ok = _moe(ffn, L, H, keep)
    else:
        ok = _dense(ffn, L, keep)
        L.ffn = _FFN_DENSE
    return L if ok else None


class DecodePlan:
    """The fused layers of one model over one KV cache: which it takes, their argument blocks."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache, self._keep = model, cache, []
        n = len(model.layers)
        blocks = [_layer(model, i, cache, self._keep) for i in range(n)]
        self.takes = [b is not None for b in blocks]
        self.dtype = model.dtype
        self._args = (_LayerArgs * max(1, n))(*[b if b is not None else _LayerArgs() for b in blocks])
        self._weights = [self._refs(model.layers[i]) for i in range(n)]  # what each block was built from
        self._failed = ctypes.c_int64(-1)

    @staticmethod
    def _refs(layer) -> tuple:
        ffn = layer.ffn
        w = getattr(layer.attn, "w", {})
        return (layer.attn, *(w.get(n) for n in ("qkv", "q", "k", "v", "o")), ffn, getattr(ffn, "router", None),
                getattr(ffn, "shards", None), getattr(ffn, "shared", None))

    def fits(self, model, cache) -> bool:
        return model is self.model and cache is self.cache

    def stop(self, i: int) -> int:
        """The end of the run of fused layers from layer i (i itself: layer i is not taken now)."""
        layers, j = self.model.layers, i
        while j < len(layers) and self.takes[j]:
            ffn = layers[j].ffn
            if getattr(ffn, "recorder", None) is not None or getattr(ffn, "deferred", 0) or \
                    not all(a is b for a, b in zip(self._refs(layers[j]), self._weights[j])):
                break
            j += 1
        return j

    def run(self, h: torch.Tensor, batch, i: int, j: int) -> Optional[torch.Tensor]:
        """Layers [i, j) on the hidden states h [B, H] of a decode step; None when the step does not fit
        (too many sequences, another dtype), so the caller runs the per-op path."""
        fn = _lib()
        B = h.shape[0]
        if (fn is None or h.dtype != self.dtype or h.dim() != 2 or not 0 < B <= MAX_ROWS or h.device.type != "cpu"
                or batch.block_tables.dim() != 2):
            return None
        h = h.contiguous().clone()
        pos = batch.positions.to(torch.int64).contiguous()
        slots = batch.slot_mapping.to(torch.int64).contiguous()
        # clamped, not wrapped: a block id or length past int32 must stay out of range for the library's checks
        tables, lens = native_ops._tables32(batch.block_tables, batch.seq_lens, native_ops._INT32_MAX)
        if pos.numel() != B or slots.numel() != B or tables.shape[0] != B or lens.numel() != B:
            return None
        step = _StepArgs(B, j - i, tables.shape[1], _DT[h.dtype], 0, h.data_ptr(), pos.data_ptr(), slots.data_ptr(),
                         tables.data_ptr(), lens.data_ptr(), ctypes.addressof(self._args) + i * ctypes.sizeof(_LayerArgs),
                         ctypes.addressof(self._failed))
        rc = fn(ctypes.byref(step))
        if rc:
            _check_rc(rc, f"decode layer {i + int(self._failed.value)}")
        return h


def plan(model, cache) -> Optional[DecodePlan]:
    """The model's fused decode plan over this cache (built once, kept on the model), or None."""
    if not enabled():
        return None
    p = getattr(model, "_kt_decode_plan", None)
    if p is None or not p.fits(model, cache):
        p = model._kt_decode_plan = DecodePlan(model, cache)  # kept even when it takes no layer: built once
    return p if any(p.takes) else None


def _moe(ffn, L: _LayerArgs, H: int, keep: list) -> bool:
    from kt_core.models.layers import DenseMLP

    m = ffn.moe
    if (ffn.tid2eid is not None or m.weight_input or ffn.score_bias is not None or m.scoring != "softmax"
            or (m.n_group or 1) != 1 or len(ffn.shards) != 1
            or m.activation not in ACTIVATIONS):
        return False
    _be, device, experts = ffn.shards[0]
    if device.type != "cpu" or not isinstance(experts, native.PackedExperts) or experts.pool != 0:
        return False
    router = _linear(ffn.router, ffn.router_bias, keep, router=True)
    if router is None or router.kind == 2:
        return False
    if ffn.shared is not None and (type(ffn.shared) is not DenseMLP or not _dense(ffn.shared, L, keep)):
        return False
    if ffn.shared_gate is not None:
        gate = _linear(ffn.shared_gate, None, keep)
        if ffn.shared is None or gate is None or gate.kind != 1 or gate.a.M != 1:
            return False
        L.shared_gate = gate
    local_of, gate, up, down, eH, I, fmt, group, E, kept, dfmt, dgroup, f16 = experts._prepared()
    if eH != H:
        return False
    keep.extend((experts, local_of, kept))
    L.moe = _MoeArgs(0, H, I, m.top_k, E, local_of.numel(), fmt, group, ACTIVATIONS[m.activation], None, None, None,
                     local_of.data_ptr(), gate, up, down, None, 0, 0, dfmt, dgroup, *f16)
    L.router, L.n_experts, L.top_k = router, router.a.M, m.top_k
    L.renormalize, L.routed_scaling, L.ffn = int(bool(m.renormalize)), float(m.routed_scaling_factor), _FFN_MOE
    return True
