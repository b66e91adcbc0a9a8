"""Reading a layer's weights: ``QuantPlan`` (which formats the model's weights take) and ``_Reader``
(reads, checks, casts, quantizes and places one layer's tensors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kt_core.errors import KtError
from kt_core.models.expert_stream import Stacked
from kt_core.models.kept import kept as _kept
from kt_core.models.spec import ModelSpec
from kt_core.weights.checkpoint import Checkpoint, read_into
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight, quantize, rows_into


@dataclass
class QuantPlan:
    experts: Quant = Quant.NONE
    dense: Quant = Quant.NONE
    group_size: int = 128
    symmetric: bool = True
    prequant: Optional[object] = None  # a PrequantFile (kt quantize) to take the experts from
    head: Optional[Quant] = None  # the untied lm_head; None: as dense
    down: Optional[Quant] = None  # the experts' down projection; None: as experts
    int8_group: int = 0  # int8's group (quant.int8_group_size); 0: one scale per row
    embed: Optional[Quant] = None  # the token embedding; None: model.dtype (int8 the one other choice)

    @classmethod
    def from_config(cls, q) -> "QuantPlan":
        """The plan of a composed config's ``quant`` group."""
        from kt_core.config.schema import choice

        head = choice(q.head) if q.get("head") is not None else None
        down = choice(q.experts_down) if q.get("experts_down") is not None else None
        embed = Quant(choice(q.embed)) if q.get("embed") is not None else None
        if embed not in (None, Quant.NONE, Quant.INT8):
            raise KtError(f"quant.embed={embed.value}: the token embedding takes int8 or none (a lookup table "
                          f"gathers rows; it is never multiplied); use quant.embed=int8")
        return cls(Quant(choice(q.experts)), Quant(choice(q.dense)), int(q.group_size), bool(q.symmetric),
                   head=None if head is None else Quant(head), int8_group=int(q.get("int8_group_size") or 0),
                   down=None if down is None else Quant(down), embed=embed)

    @property
    def down_format(self) -> Quant:
        return self.experts if self.down is None else self.down

    def group_of(self, fmt: Quant) -> int:
        """The group size that names a kt quantize file of ``fmt``: int8's own when it has groups
        (per-row int8 files keep the name they always had)."""
        return self.int8_group if fmt is Quant.INT8 and self.int8_group else self.group_size

    @property
    def head_format(self) -> Quant:
        return self.dense if self.head is None else self.head


STREAM_BYTES = 64 << 20  # a quantized dense weight larger than this (in the model's dtype) is read in blocks ...
STREAM_BLOCK_BYTES = 8 << 20  # ... of rows this large


class _Reader:
    """Reads, checks, casts and places one layer's tensors."""

    def __init__(self, ck: Checkpoint, spec: ModelSpec, dtype: torch.dtype, device: torch.device, qp: QuantPlan,
                 prepare: Optional[Callable] = None, fuse: bool = False, alloc: Optional[Callable] = None):
        self.ck, self.spec, self.dtype, self.device, self.qp = ck, spec, dtype, device, qp
        self.prepare = prepare  # the device's Backend.prepare_dense(w, owned) for quantized dense weights
        self.alloc = alloc  # the device's Backend.dense_empty for unquantized ones (or None)
        self.fuse = fuse  # q / k / v and gate / up as one weight each (inference; training adapts them apart)

    def t(self, name: str, shape, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.dtype  # asked of the checkpoint: a GGUF's float tensors skip float32
        return self.ck.get(name, shape, dtype).to(dtype).to(self.device)

    def embedding(self, name: str, shape):
        """The token embedding: a tensor in the model's dtype, or with quant.embed=int8 a
        QuantizedEmbedding (a GGUF's int8 blocks kept as they are)."""
        if self.qp.embed is not Quant.INT8:
            return self.t(name, shape)
        from kt_core.weights.embedding import QuantizedEmbedding

        w = _kept(self.ck, [name], shape)
        if w is None or w.format is not Quant.INT8:
            group = self.qp.int8_group or 32
            w = quantize(self.ck.get(name, shape), Quant.INT8, int8_group=group)  # in row chunks
        return QuantizedEmbedding(w.to(self.device), self.dtype)

    def norm(self, name: str, shape) -> torch.Tensor:
        """An RMSNorm weight; a zero-centred one (Qwen3-Next) becomes its scale 1 + w, kept in float32 as
        the reference computes it."""
        if self.spec.norm_offset:
            return (1.0 + self.ck.get(name, shape).float()).to(self.device)
        return self.t(name, shape)

    def opt(self, name: str, shape, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        return self.t(name, shape, dtype) if name in self.ck else None

    def dense(self, name: str, shape, fmt: Optional[Quant] = None):
        """A dense linear's weight in ``fmt`` (default: quant.dense), prepared for its device."""
        fmt = self.qp.dense if fmt is None else fmt
        # a GGUF block type kt-core holds exactly is kept, unless a quant format was asked for
        kept = _kept(self.ck, [name], shape) if fmt is Quant.NONE else None
        if kept is not None:
            q = kept.to(self.device)
            return self.prepare(q) if self.prepare is not None else q
        if fmt is Quant.NONE:
            return self.rows([name], [shape])
        return self._quantized([name], [tuple(shape)], fmt)

    def _quantized(self, names: list[str], shapes: list, fmt: Quant):
        """The named weights stacked by rows, quantized to ``fmt`` and prepared for the device: on a CPU
        device streamed where they can be (``_streamed``) and their codes, made in its memory, handed over
        to its packer."""
        cpu = self.device.type == "cpu"
        q = self._streamed(names, shapes, fmt) if cpu else None
        if q is None:
            parts = [self.t(n, s) for n, s in zip(names, shapes)]
            w = parts[0] if len(parts) == 1 else torch.cat(parts)
            del parts
            q = _quantize(w, fmt, self.qp, names[0], self.alloc if cpu else None).to(self.device)
            del w  # the source is not held while the device packs the codes
        return self.prepare(q, cpu) if self.prepare is not None else q

    def _streamed(self, names: list[str], shapes: list, fmt: Quant) -> Optional[QuantizedWeight]:
        """Weights (stacked by rows) over STREAM_BYTES read and quantized a block of rows at a time, so
        their float rows are never all in memory beside the codes (an 8-bit 151936 x 2048 LM head peaked
        with its 622 MB of bf16 and its 311 MB of codes together), or None where the checkpoint reads them
        only whole. Each row's codes and scales depend on that row alone: the result is the whole weight's."""
        read = getattr(self.ck, "read_rows", None)
        if read is None or any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
            return None
        K, M = shapes[0][1], sum(s[0] for s in shapes)
        if M * K * self.dtype.itemsize <= STREAM_BYTES:
            return None
        step = max(1, STREAM_BLOCK_BYTES // (K * self.dtype.itemsize))
        out, at = None, 0
        for name, shape in zip(names, shapes):
            for r0 in range(0, shape[0], step):
                rows = read(name, shape, r0, min(shape[0], r0 + step), self.dtype)
                if rows is None:
                    return None
                out = rows_into(out, _quantize(rows, fmt, self.qp, name), at + r0, M, self.alloc)
            at += shape[0]
        return out

    def rows(self, names: list[str], shapes: list) -> torch.Tensor:
        """Unquantized weights stacked by rows, read straight into the memory the device offers for them
        (``Backend.dense_empty``: the CPU's huge pages), else into the reader's own tensor."""
        shapes = [tuple(s) for s in shapes]
        total = (sum(s[0] for s in shapes),) + shapes[0][1:]
        same = all(s[1:] == shapes[0][1:] for s in shapes)
        out = self.alloc(total, self.dtype) if self.alloc is not None and same else None
        if out is None:
            parts = [self.t(n, s) for n, s in zip(names, shapes)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        if tuple(out.shape) != total or out.dtype != self.dtype or not out.is_contiguous():
            raise KtError(f"the backend's dense_empty{total} gave a {out.dtype} tensor of shape {tuple(out.shape)}"
                          f"{'' if out.is_contiguous() else ' (not contiguous)'}; it must give a contiguous "
                          f"{self.dtype} tensor of exactly that shape, or None")
        at = 0
        for n, s in zip(names, shapes):
            read_into(self.ck, n, out[at:at + s[0]], s)  # rows of a contiguous tensor: contiguous
            at += s[0]
        return out

    def dense_rows(self, name: str, shape, parts: int, fmt: Optional[Quant] = None) -> list:
        """One weight cut into ``parts`` equal blocks of rows, each a dense weight in ``fmt`` (default:
        quant.dense), prepared for its device (DeepSeek-V4's grouped output projection)."""
        fmt = self.qp.dense if fmt is None else fmt
        out = []
        for i, block in enumerate(self.t(name, shape).chunk(parts)):
            w = block.contiguous() if fmt is Quant.NONE else \
                _quantize(block.contiguous(), fmt, self.qp, f"{name} group {i}").to(self.device)
            out.append(self.prepare(w) if self.prepare is not None and fmt is not Quant.NONE else w)
        return out

    def dense_cat(self, names: list[str], shapes: list, fmt: Optional[Quant] = None):
        """The named weights stacked by rows as one dense weight (fused projections: one product
        instead of several), or None where they load apart: fusing is off, the format's scales are not
        per row (fp8's blocks), or one is kept in its file's quantization (a GGUF's blocks)."""
        fmt = self.qp.dense if fmt is None else fmt
        if not self.fuse or fmt not in (Quant.NONE, Quant.INT8, Quant.INT4, Quant.W8A8):
            return None
        if fmt is Quant.NONE and hasattr(self.ck, "keeps") and any(self.ck.keeps(n) for n in names):
            return None  # a GGUF's blocks: each stays in its own format
        if fmt is Quant.NONE:
            return self.rows(names, shapes)
        return self._quantized(names, [tuple(s) for s in shapes], fmt)

    def experts(self, gate, up, down, ids: torch.Tensor, **biases):
        """gate / up / down: tensors, or callables that read them (then each projection is read and
        quantized before the next is read, so only one is ever held in the checkpoint's dtype), or
        ``Stacked`` experts (quantized a chunk at a time as the next chunk is read)."""
        qp = self.qp

        def q(w, fmt=qp.experts):
            if isinstance(w, Stacked) and fmt is not Quant.NONE:
                return w.quantized(self.dtype, lambda chunk: _quantize(chunk, fmt, qp, "experts")).to(self.device)
            w = (w() if callable(w) else w).to(self.dtype)
            if fmt is Quant.NONE:
                return w.to(self.device)
            return _quantize(w, fmt, qp, "experts").to(self.device)

        placed = {k: None if v is None else v.to(self.dtype).to(self.device) for k, v in biases.items()}
        return ExpertWeights(ids.to(self.device), q(gate), q(up), q(down, qp.down_format), **placed)


def _quantize(w: torch.Tensor, fmt: Quant, qp: QuantPlan, what: str, alloc=None):
    try:  # a chunk of rows at a time; alloc: the codes' memory (quant.codes_empty)
        return quantize(w, fmt, qp.group_size, qp.symmetric, qp.int8_group, alloc)
    except ValueError as exc:
        raise KtError(f"cannot quantize {what} to {fmt.value}: {exc}") from None
