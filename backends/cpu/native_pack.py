"""Repacking expert weights into the native kernels' 16-row panel layout (native/kernels.hpp),
and checking, once per packed object, that the panels have exactly the sizes the kernels index."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kt_backends.cpu.hugepages import huge_empty
from kt_backends.cpu.native_abi import FORMATS, MAX_DIM, NR, _index, _Proj
from kt_core.weights.quant import (INT8_MAX_GROUP, ExpertWeights, Quant, QuantizedWeight, fp16_exact, int8_group_ok,
                                   weight_format)

# ---------------------------------------------------------------- packing
@dataclass
class PackedProj:
    data: torch.Tensor  # [E, P, K(/2), 16]
    scale: Optional[torch.Tensor]
    zero: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]  # float32 [E, M]

    @property
    def scale_f16(self) -> int:
        """1 when the scales (and int4's zero points) are fp16 (the kernels' Weight::scale16), else 0."""
        return int(self.scale is not None and self.scale.dtype == torch.float16)


@dataclass
class PackedExperts:
    """Experts repacked into the native kernel's panel layout (see native/kernels.hpp)."""

    expert_ids: torch.Tensor
    fmt: str
    group: int
    hidden: int
    inter: int
    gate: PackedProj
    up: PackedProj
    down: PackedProj
    pool: int = 0  # logical CPU device (cpu:N) whose workers run these experts
    down_fmt: Optional[str] = None  # the down projection's own format and group (None: fmt, group)
    down_group: Optional[int] = None
    _prep: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def call_parts(self) -> tuple:
        """What every call passes unchanged: the global id -> local index map (ids past its end
        are other devices' experts) and the three projections' argument structs."""
        return self._prepared()[:4]

    def _prepared(self) -> tuple:
        """call_parts plus the checked sizes and codes, and the tensors behind the structs' raw
        pointers (kept referenced here whatever later happens to this object's fields). The
        checks run once per object: a decode call pays none of them."""
        prep = self._prep
        if prep is None:
            H, I, fmt, group, E, dfmt, dgroup = _check_packed(self)
            ids = self.expert_ids
            local_of = torch.full((int(ids.max()) + 1 if E else 0,), -1, dtype=torch.long)
            local_of[ids] = torch.arange(E)
            keep = (self.gate, self.up, self.down)
            f16 = (self.gate.scale_f16, self.down.scale_f16)  # fp16 scales of gate / up, of down
            if self.up.scale_f16 != f16[0]:
                raise ValueError(f"packed experts: gate and up must keep their scales alike (fp16 or float32); {_REPACK}")
            prep = self._prep = (local_of, _proj(self.gate, E), _proj(self.up, E), _proj(self.down, E),
                                 H, I, fmt, group, E, keep, dfmt, dgroup, f16)
        return prep

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in (self.gate, self.up, self.down)
                   for t in (p.data, p.scale, p.zero, p.bias) if t is not None)


_REPACK = "pack the experts with native.pack(ExpertWeights)"


def _packed_layout(fmt: str, group: int, E: int, M: int, K: int) -> tuple:
    """(data shape, data dtype, scale shape or None) of one projection as _pack_proj lays it out."""
    P = -(-M // NR)
    if fmt == "bf16":
        return (E, P, K, NR), torch.int16, None
    if fmt == "int8":
        return (E, P, K // 2, NR, 2), torch.int8, (E, P, K // group, NR) if group else (E, P * NR)
    if fmt == "w8a8":
        return (E, P, K // 4, NR, 4), torch.int8, (E, P * NR)
    G = K // group if group else 1
    if fmt == "int4":
        return (E, P, K // 4, 2 * NR), torch.uint8, (E, P, G, NR)
    return (E, P, K, NR), torch.uint8, (E, P, G, NR)  # fp8


def _check_tensor(t, what: str, shape: tuple, dtype: torch.dtype, fix: str = _REPACK) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(t).__name__}; {fix}")
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{what} is a {'' if t.is_contiguous() else 'non-contiguous '}{t.dtype} tensor of shape "
                         f"{tuple(t.shape)} on {t.device}; the kernels read a contiguous {dtype} CPU tensor of "
                         f"shape {shape}; {fix}")


def _check_packed(p: PackedExperts) -> tuple:
    """Everything the kernels index, checked against the sizes: (H, I, format code, group, E)."""
    where = "packed experts"
    if not isinstance(p.fmt, str) or p.fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {p.fmt!r} (one of {', '.join(FORMATS)}); {_REPACK}")
    H = _index(p.hidden, f"{where}: hidden size", 1, MAX_DIM)
    I = _index(p.inter, f"{where}: expert width (inter)", 1, MAX_DIM)
    group = _index(p.group, f"{where}: group size", 0, MAX_DIM)
    ids = p.expert_ids
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long or ids.device.type != "cpu"
            or not ids.is_contiguous()):
        raise ValueError(f"{where}: expert_ids must be a 1-D int64 CPU tensor; {_REPACK}")
    E = ids.numel()
    if E and (int(ids.min()) < 0 or int(ids.max()) >= MAX_DIM):
        raise ValueError(f"{where}: expert ids must be in 0..{MAX_DIM - 1}, got {int(ids.min())}..{int(ids.max())}")
    if E and torch.unique(ids).numel() != E:
        raise ValueError(f"{where}: expert_ids has duplicates; {_REPACK}")
    dfmt = p.fmt if p.down_fmt is None else p.down_fmt
    if not isinstance(dfmt, str) or dfmt not in FORMATS:
        raise ValueError(f"{where}: unknown down format {dfmt!r} (one of {', '.join(FORMATS)}); {_REPACK}")
    dgroup = group if p.down_group is None else _index(p.down_group, f"{where}: down group size", 0, MAX_DIM)
    _check_kind(where, "gate / up", p.fmt, group, H)
    _check_kind(where, "down", dfmt, dgroup, I)
    for name, proj, M, K in (("gate", p.gate, I, H), ("up", p.up, I, H), ("down", p.down, H, I)):
        fmt, grp = (dfmt, dgroup) if name == "down" else (p.fmt, group)
        _check_proj(where, name, proj, fmt, grp, E, M, K)
    return H, I, FORMATS[p.fmt], group, E, FORMATS[dfmt], dgroup


def _check_proj(where: str, name: str, proj, fmt: str, grp: int, E: int, M: int, K: int, fix: str = _REPACK) -> None:
    """One packed projection (E experts of M x K in fmt, groups of grp) against what the kernels read."""
    if not isinstance(proj, PackedProj):
        raise ValueError(f"{where}: {name} must be a PackedProj, got {type(proj).__name__}; {fix}")
    data_shape, data_dtype, scale_shape = _packed_layout(fmt, grp, E, M, K)
    _check_tensor(proj.data, f"{where}: {name}.data", data_shape, data_dtype, fix)
    if scale_shape is None:
        if proj.scale is not None or proj.zero is not None:
            raise ValueError(f"{where}: {name} has scales, but {fmt} weights take none; {fix}")
    else:
        f16 = ((fmt == "int4" or (fmt == "int8" and grp > 0)) and proj.scale is not None
               and proj.scale.dtype == torch.float16)
        _check_tensor(proj.scale, f"{where}: {name}.scale", scale_shape, torch.float16 if f16 else torch.float32, fix)
        if proj.zero is not None:
            if fmt != "int4" and not (fmt == "int8" and 0 < grp < K):
                raise ValueError(f"{where}: {name} has zero points, which only int4 and grouped int8 take; {fix}")
            _check_tensor(proj.zero, f"{where}: {name}.zero", scale_shape, torch.float16 if f16 else torch.float32, fix)
    if proj.bias is not None:
        _check_tensor(proj.bias, f"{where}: {name}.bias", (E, M), torch.float32, fix)


def _check_kind(where: str, what: str, fmt: str, group: int, K: int) -> None:
    """A format and group the kernels take for weights over K inputs."""
    step = {"int8": 2, "w8a8": 4, "int4": 4}.get(fmt, 1)
    if K % step:
        raise ValueError(f"{where}: {what} is {fmt}, whose kernels read inputs in {step}s; {K} inputs are not")
    if fmt in ("bf16", "w8a8") and group != 0:
        raise ValueError(f"{where}: {what}: {fmt} has no groups (group 0), got group {group}; {_REPACK}")
    if fmt == "int8" and not int8_group_ok(group):
        raise ValueError(f"{where}: {what}: int8 groups must be 0 (per row) or a multiple of 4 up to {INT8_MAX_GROUP}, "
                         f"got {group}; {_REPACK}")
    if fmt == "int4" and (group <= 0 or group % 4 or group > 4096):
        raise ValueError(f"{where}: {what}: int4 groups must be a multiple of 4 in 4..4096, got {group}; {_REPACK}")
    if group and K % group:
        raise ValueError(f"{where}: {what}: group {group} must divide its {K} inputs; {_REPACK}")


def _panels(t: torch.Tensor, alloc=None) -> torch.Tensor:
    """[E, M, X] -> [E, ceil(M/16), X, 16] with zero rows padding M, in memory from ``alloc(shape,
    dtype)`` (hugepages.huge_empty: the packed weights land in huge pages with no second copy)."""
    E, M, X = t.shape
    pad = (-M) % NR
    if pad:
        t = torch.cat([t, t.new_zeros(E, pad, X)], dim=1)
    return _into(t.reshape(E, -1, NR, X).transpose(2, 3), alloc)


def _into(t: torch.Tensor, alloc) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype) if alloc is None else alloc(t.shape, t.dtype)
    out.copy_(t)
    return out


def _f16_scales(ws: list) -> bool:
    """Grouped int8 or int4 weights whose scales (and zero points) are all fp16 values: packed in 2 bytes
    (GGUF Q8_0's and Q4_0's, quantize's)."""
    return all(isinstance(w, QuantizedWeight)
               and ((w.format is Quant.INT8 and w.group_size < w.in_features) or w.format is Quant.INT4)
               and fp16_exact(w.scales) and (w.zeros is None or fp16_exact(w.zeros)) for w in ws)


def _pack_proj(w, bias: Optional[torch.Tensor], f16: bool = False, alloc=None, in_place: bool = False) -> PackedProj:
    """``f16``: grouped int8's or int4's scales (and zero points) stored as fp16 (the values must be
    fp16's: _f16_scales); ``alloc(shape, dtype)``: the packed codes' memory; ``in_place``: a quantized
    weight's codes are the caller's to give up: laid out in their own memory where ``_in_place`` can."""
    b = None if bias is None else bias.float().contiguous()
    if isinstance(w, torch.Tensor):
        return PackedProj(_panels(w.view(torch.int16), alloc), None, None, b)
    if w.format in (Quant.INT8, Quant.W8A8):
        scale = _panels(w.scales.half() if f16 else w.scales.float())  # [E, P, G, 16]
        if w.group_size == w.in_features:
            scale = scale.reshape(w.scales.shape[0], -1).contiguous()  # one per row: [E, P*16]
        zero = None if w.zeros is None else _panels(w.zeros.half() if f16 else w.zeros.float())  # grouped int8
        # inputs of a row side by side, [E, P, K/step, 16, step]: the panels of step-byte words
        step, word = (4, torch.int32) if w.format is Quant.W8A8 else (2, torch.int16)
        E, M, K = w.qdata.shape
        words = w.qdata.contiguous().view(word)
        data = _in_place(words, _panel_block) if in_place else None
        data = (_panels(words, alloc) if data is None else data).view(torch.int8)
        return PackedProj(data.view(E, -(-M // NR), K // step, NR, step), scale, zero, b)
    half = f16 and w.format is Quant.INT4
    scale = _panels(w.scales.half() if half else w.scales.float())  # [E, P, G, 16]
    zero = None if w.zeros is None else _panels(w.zeros.half() if half else w.zeros.float())
    data = _in_place(w.qdata, _panel_block if w.format is Quant.FP8 else _quad_block) if in_place else None
    if data is None:
        data = _panels(w.qdata, alloc) if w.format is Quant.FP8 else _int4_quads(w.qdata, alloc)
    return PackedProj(data, scale, zero, b)


IN_PLACE_BYTES = 4 << 20  # codes laid out in their own memory this many at a time (a copy of them held)


def _in_place(t: torch.Tensor, block) -> Optional[torch.Tensor]:
    """Codes [E, M, X] laid out as their panels in their own memory (each panel of NR rows takes the bytes
    its rows did: M a multiple of NR, no padding), a block of panels at a time: ``block(codes, out)``
    writes the packed form of a copy of the block's codes [panels, NR, X] into its bytes ``out``. The
    packed tensor (a view of t's memory, t's codes gone), or None where the layout does not allow it."""
    if t.dim() != 3 or not t.is_contiguous() or t.device.type != "cpu" or t.shape[1] % NR or not t.numel():
        return None
    E, M, X = t.shape
    panels = E * M // NR
    src, flat = t.view(panels, NR, X), t.view(-1)
    per = max(1, IN_PLACE_BYTES // (NR * X * t.element_size()))
    for p0 in range(0, panels, per):
        p1 = min(panels, p0 + per)
        block(src[p0:p1].clone(), flat[p0 * NR * X:p1 * NR * X])
    return flat.view((E, M // NR) + block.packed(X))


def _panel_block(codes: torch.Tensor, out: torch.Tensor) -> None:
    """``_panels``' layout [P, X, NR] of codes [P, NR, X] written into ``out`` (their bytes)."""
    out.view(codes.shape[0], codes.shape[2], NR).copy_(codes.transpose(1, 2))


def _quad_block(codes: torch.Tensor, out: torch.Tensor) -> None:
    """``_int4_quads``' layout [P, K/4, 32] of int4 codes [P, NR, K/2] written into ``out`` (their bytes)."""
    P, _, half = codes.shape
    _int4_quads(codes.reshape(1, P * NR, half), lambda shape, dtype: out.view(dtype).view(shape))


_panel_block.packed = lambda X: (X, NR)  # a panel's packed shape, from its rows' width X
_quad_block.packed = lambda X: (X // 2, 2 * NR)


def _int4_quads(qdata: torch.Tensor, alloc=None) -> torch.Tensor:
    """int4 codes [E, M, K/2] (low nibble = even input) -> the kernel's quad layout
    [E, P, K/4, 32] bytes (native/kernels.hpp): per 4 inputs of a panel, 16 little-endian
    16-bit words; word 2l+e holds code(row l + 8h, input 4q + 2s + e) in its nibble h + 2s.
    So byte s of word 2l+e is code(row l, input 4q+2s+e) | code(row l+8, same input) << 4: the
    nibble e of byte 2q+s of rows l and l+8. The two bytes s of a quad are handled as one int16
    (three times the speed of splitting every nibble out: loading a 30B-A3B-shaped model packs
    ~2.4 GB of codes); the native library does it in one pass (native_quant.try_pack_int4)."""
    from kt_backends.cpu import native_quant

    native = native_quant.try_pack_int4(qdata, alloc)
    if native is not None:
        return native
    E, M, half = qdata.shape
    pad = (-M) % NR
    if pad:
        qdata = torch.cat([qdata, qdata.new_zeros(E, pad, half)], dim=1)
    P, K4 = qdata.shape[1] // NR, half // 2
    rows = qdata.contiguous().view(torch.int16).view(E, P, 2, NR // 2, K4)  # [E, P, h, l, q]
    top, bottom = rows[:, :, 0], rows[:, :, 1]  # rows l and l + 8 of each panel
    low = 0x0F0F  # the low nibble of both bytes
    even = (top & low) | ((bottom & low) << 4)  # e = 0: the even inputs' codes
    odd = ((top >> 4) & low) | (bottom & ~low)  # e = 1: the odd inputs' codes
    words = torch.stack((even, odd), dim=-1)  # [E, P, l, q, e]
    return _into(words.transpose(2, 3), alloc).view(torch.uint8).view(E, P, K4, 2 * NR)


def _check_experts(ex: ExpertWeights) -> None:
    """The ExpertWeights agree with themselves (a .ktq file or a caller could hand in any
    sizes): gate / up [E, I, H], down [E, H, I], and each quantized weight's codes, scales and
    zero points have the sizes its in_features and group_size say."""
    E = int(ex.expert_ids.numel())
    if len(ex.gate.shape) != 3:
        raise ValueError(f"expert gate weights must be [experts, width, hidden], got shape {tuple(ex.gate.shape)}")
    I, H = int(ex.gate.shape[1]), int(ex.gate.shape[2])
    for name, w, want in (("gate", ex.gate, (E, I, H)), ("up", ex.up, (E, I, H)), ("down", ex.down, (E, H, I))):
        if tuple(w.shape) != want:
            raise ValueError(f"expert {name} weights have shape {tuple(w.shape)}, expected {want} "
                             f"(gate / up [E, I, H], down [E, H, I])")
        if isinstance(w, torch.Tensor):
            continue
        E_, M, K = want
        q_last = K // 2 if w.format is Quant.INT4 else K
        if (w.format is Quant.INT4 and K % 2) or tuple(w.qdata.shape) != (E_, M, q_last):
            raise ValueError(f"expert {name}: {w.format.value} codes have shape {tuple(w.qdata.shape)}, but "
                             f"in_features={K} needs {(E_, M, q_last)}")
        if not isinstance(w.group_size, int) or w.group_size <= 0 or K % w.group_size:
            raise ValueError(f"expert {name}: group_size {w.group_size!r} must be positive and divide "
                             f"in_features {K}")
        G = K // w.group_size
        for part, t in (("scales", w.scales), ("zeros", w.zeros)):
            if t is not None and tuple(t.shape) != (E_, M, G):
                raise ValueError(f"expert {name}: {part} have shape {tuple(t.shape)}, expected {(E_, M, G)} "
                                 f"for in_features {K} in groups of {w.group_size}")
    for name, b, M in (("gate_bias", ex.gate_bias, I), ("up_bias", ex.up_bias, I), ("down_bias", ex.down_bias, H)):
        if b is not None and tuple(b.shape) != (E, M):
            raise ValueError(f"expert {name} has shape {tuple(b.shape)}, expected {(E, M)}")


def _kind(ws: list) -> Optional[tuple[str, int]]:
    """(format, group) the kernels run these weights in (gate with up, or down alone), or None."""
    fmt = weight_format(ws[0])
    if any(weight_format(w) is not fmt for w in ws):
        return None
    if fmt is Quant.NONE:  # fp32 / fp16 weights: the torch path keeps their precision
        return ("bf16", 0) if all(w.dtype == torch.bfloat16 for w in ws) else None
    if fmt in (Quant.INT8, Quant.W8A8):
        per_row = [w.group_size == w.in_features for w in ws]
        group = 0 if all(per_row) else ws[0].group_size
        if group and (fmt is Quant.W8A8 or any(per_row) or not int8_group_ok(group)
                      or any(w.group_size != group for w in ws)):
            return None  # groups: int8 only, one size, 4..256 inputs (one int32 sum each)
        if any(w.zeros is not None for w in ws) and (not group or any(w.zeros is None for w in ws)):
            return None  # zero points: grouped int8 only (GGUF Q5_1 / Q5_K / Q2_K), on all of them or none
        if any(w.in_features % (4 if fmt is Quant.W8A8 else 2) for w in ws):
            return None  # the integer dot products take inputs in pairs (w8a8: fours)
        return fmt.value, group
    if fmt is Quant.FP8:
        if any(w.zeros is not None for w in ws):
            return None
        per_row = all(w.group_size == w.in_features for w in ws)
        group = 0 if per_row else ws[0].group_size  # 0: one scale per row, whatever K is
        return None if not per_row and any(w.group_size != group for w in ws) else ("fp8", group)
    group = ws[0].group_size  # int4: inputs in fours (a 16-bit word per row pair of inputs); a group's
    if any(w.group_size != group for w in ws) or group % 4 or group > 4096 or len({w.zeros is None for w in ws}) > 1:
        return None  # int32 sum of code x int16 activation must not overflow (4096)
    return "int4", group


def _kinds(ex: ExpertWeights) -> Optional[tuple[tuple[str, int], tuple[str, int]]]:
    """((format, group) of gate / up, of down) as pack() stores them, or None (torch path)."""
    if any(w.device.type != "cpu" for w in (ex.gate, ex.up, ex.down)):
        return None
    _check_experts(ex)
    first, second = _kind([ex.gate, ex.up]), _kind([ex.down])
    return None if first is None or second is None else (first, second)


def pack_formats(ex: ExpertWeights) -> Optional[tuple[str, str]]:
    """(gate / up format, down format) as pack() would store them, or None when it would not pack
    these experts (torch path then). ValueError when the weights disagree with their own sizes."""
    kinds = _kinds(ex)
    return None if kinds is None else (kinds[0][0], kinds[1][0])


def pack(ex: ExpertWeights, release: bool = False) -> Optional[PackedExperts]:
    """The packed form, or None when the kernels do not take these formats (torch path then).
    Gate and up share one format; down may have its own (a GGUF Q4_K_M layer: Q4_K gate / up, Q6_K
    down). ValueError when the weights disagree with their own sizes. ``release``: ``ex`` is handed
    over (a backend's prepare_experts at load time): once a projection is packed, ``ex`` lets go of
    it (None), so loading a layer holds one unpacked projection beside the packed ones, not all three
    (a 2-layer Qwen3-30B-A3B-shaped bf16 model: peak RSS while loading 3.8 -> 3.0 GB). Nothing is
    let go when the result is None."""
    kinds = _kinds(ex)
    if kinds is None:
        return None
    first, second = kinds
    H, I = ex.gate.shape[2], ex.gate.shape[1]
    f16, f16_down = _f16_scales([ex.gate, ex.up]), _f16_scales([ex.down])
    ids = ex.expert_ids.long().contiguous()
    done = {}
    for name, bias, half in (("gate", ex.gate_bias, f16), ("up", ex.up_bias, f16), ("down", ex.down_bias, f16_down)):
        # streamed every step: packed into huge pages where the OS gives them
        done[name] = _pack_proj(getattr(ex, name), bias, half, alloc=huge_empty)
        if release:
            setattr(ex, name, None)
    return PackedExperts(ids, first[0], first[1], H, I, done["gate"], done["up"], done["down"],
                         down_fmt=second[0], down_group=second[1])


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _proj(p: PackedProj, E: int) -> _Proj:
    if E == 0:
        return _Proj(None, None, None, None, 0, 0)
    per_param = 0 if p.scale is None else p.scale.numel() // E
    return _Proj(p.data.data_ptr(), _ptr(p.scale), _ptr(p.zero), _ptr(p.bias),
                 p.data.numel() * p.data.element_size() // E, per_param)
