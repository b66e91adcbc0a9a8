"""A GGUF file (or split set) behind the same read interface as a Hugging Face folder.

``GGUFCheckpoint`` gives the model loader what ``Checkpoint`` gives it: a ``config`` dict in
config.json's terms, tensors by their HF names (``get``), a fingerprint and the tokenizer (built
from ``tokenizer.ggml.*``). On top, ``quantized(name)`` hands over a weight whose GGUF block type
is exactly one of kt-core's formats (Q4_0, Q4_1, Q4_K as int4 groups of 32) without a round trip
through floats, so the loader keeps the file's quantization instead of blowing it up to bf16.
A checkpoint tensor the converter split in two (DeepSeek's MLA kv_b_proj, gpt-oss's interleaved
gate_up_proj) is joined back from both GGUF tensors and is always read as floats.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Optional

import torch

from kt_core.errors import KtError
from kt_core.models.shapes import GROUPS
from kt_core.weights.gguf_arch import Source, hf_config, tensor_names
from kt_core.weights.gguf_file import open_gguf
from kt_core.weights.quant import QuantizedWeight

log = logging.getLogger(__name__)

# control tokens that end a turn (llama.cpp stops at these too): ChatML, Llama 3, Phi / gpt-oss, Gemma, DeepSeek
END_OF_TURN = frozenset({"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>", "<|call|>",
                         "<|endoftext|>", "<end_of_turn>", "<｜end▁of▁sentence｜>", "</s>"})


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's converter permutation of q/k for ``heads`` heads
    (it interleaves each head's two rope halves): original = stored[perm]."""
    if heads <= 0 or rows % (2 * heads):
        raise KtError(f"llama q/k rows ({rows}) do not split into {heads} heads of two rope halves; "
                      "the GGUF's head counts do not match its tensors")
    return torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


class GGUFCheckpoint:
    """Lazy tensor access to a GGUF model file (memory-mapped; a tensor is read when asked for)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.parts = open_gguf(self.path)
        first = self.parts[0]
        self.arch = first.value("general.architecture")
        if not isinstance(self.arch, str):
            raise KtError(f"{self.path.name} has no general.architecture; it is not a GGUF model file")
        self._tensors = {}
        for part in self.parts:
            for t in part.reader.tensors:
                if t.name in self._tensors:
                    raise KtError(f"tensor {t.name} is in both {self._tensors[t.name][0].path.name} and "
                                  f"{part.path.name}; the split files do not belong together")
                self._tensors[t.name] = (part, t)
        shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, (_, t) in self._tensors.items()}
        self.shapes = shapes
        try:
            self.config = hf_config(self.arch, first.value, shapes)
        except (TypeError, ValueError, ArithmeticError) as exc:  # a metadata value of the wrong type or range
            raise KtError(f"{self.path.name}: the {self.arch} metadata holds a value kt-core cannot use "
                          f"({type(exc).__name__}: {exc}); per-layer arrays and zero sizes are not supported: "
                          "re-convert the file") from None
        self._src = tensor_names(self.config, self.arch, list(self._tensors), shapes)
        self._told: set[str] = set()
        if "rope_freqs" in self._src:  # Llama-3.1-style rope scaling as per-frequency divisors
            self.config["rope_freq_factors"] = [float(v) for v in self.get("rope_freqs").reshape(-1).tolist()]

    # ---- metadata ----------------------------------------------------------------
    def meta(self, key: str, default=None):
        return self.parts[0].value(key, default)

    def gguf_type(self, name: str) -> str:
        """The GGUF block type (e.g. ``Q4_K``) of checkpoint tensor ``name``."""
        return self._tensor(name)[1].tensor_type.name

    def tensor_types(self) -> dict[str, int]:
        """GGUF block type -> number of tensors of it."""
        out: dict[str, int] = {}
        for _, t in self._tensors.values():
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
        return out

    def keeps(self, name: str) -> bool:
        """Whether ``quantized(name)`` hands over the file's blocks (no tensor is read to tell)."""
        from kt_core.weights.gguf_repack import REPACKABLE

        return self._tensor(name)[1].tensor_type in REPACKABLE and self._src[name].plain

    def eos_ids(self) -> tuple[int, ...]:
        """Ids generation stops at, as llama.cpp stops: eos, eot and eom, and the control tokens
        that end a turn in the common chat formats."""
        ids = [self.meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        tokens, types = self.meta("tokenizer.ggml.tokens") or [], self.meta("tokenizer.ggml.token_type") or []
        for i, (text, kind) in enumerate(zip(tokens, types)):
            if kind == 3 and text in END_OF_TURN:  # 3: a control token
                ids.append(i)
        n = len(tokens) or int(self.config["vocab_size"])
        return tuple(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < n))

    @staticmethod
    def kept_groups(quant) -> frozenset:
        from kt_core.weights.keep import kept_groups

        return kept_groups(quant)

    def plan_tensors(self, tensors: list, keep: frozenset = frozenset(GROUPS)) -> list:
        """The planner's tensor list with the bytes of every weight the loader keeps in the file's
        quantization (experts only where all three are kept, gate and up alike); ``keep``:
        the tensor groups whose quant format is none (the others are requantized as configured)."""
        import dataclasses

        from kt_core.weights.gguf_repack import kept_as, kept_bytes

        def kind(name):
            return kept_as(self._tensor(name)[1].tensor_type) if name in self and self.keeps(name) else None
        firsts: dict[int, set] = {}  # per MoE layer: the kinds of gate and up (one, kept), down's (kept)
        downs: dict[int, set] = {}
        for t in tensors:
            if t.group == "experts":
                down = ".down_proj." in t.name or ".w2." in t.name
                (downs if down else firsts).setdefault(t.layer, set()).add(kind(t.name))
        kept_layers = {i for i, ks in firsts.items() if len(ks) == 1 and None not in ks and None not in downs.get(i, {None})}
        out = []
        for t in tensors:
            k = kind(t.name) if t.linear and t.group in keep else None
            if k is not None and (t.group != "experts" or t.layer in kept_layers):
                t = dataclasses.replace(t, stored=kept_bytes(self._tensor(t.name)[1].tensor_type, t.numel))
            out.append(t)
        return out

    def tokenizer(self):
        from kt_core.models.gguf_tokenizer import tokenizer_from_gguf

        meta = {k: self.meta(k) for k in self.parts[0].keys() if k.startswith("tokenizer.")}
        return tokenizer_from_gguf(meta) if "tokenizer.ggml.model" in meta else None

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"gguf;")
        for part in self.parts:
            st = part.path.stat()
            h.update(f"{part.path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    def close(self) -> None:
        """Close the files read so far (a later read opens them again)."""
        for part in self.parts:
            part.close()

    # ---- access ------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._src)

    def __contains__(self, name: str) -> bool:
        return name in self._src

    def file_of(self, name: str) -> str:
        src = self._src.get(name)
        return self._tensors[src.gguf][0].path.name if src is not None else self.path.name

    def is_fp8(self, name: str) -> bool:
        return False

    def _tensor(self, name: str):
        src = self._src.get(name)
        if src is None:
            raise KtError(f"tensor {name} is missing from {self.path.name} (a {self.arch} GGUF); the file is "
                          "incomplete or of another architecture")
        return self._tensors[src.gguf]

    def _raw(self, name: str, gguf: Optional[str] = None) -> tuple[torch.Tensor, int, tuple, Source]:
        """The stored bytes of ``name`` (one expert's slice of a merged tensor), its block type and
        its torch shape; ``gguf``: the second tensor of a joined source instead of the first."""
        src = self._src[name]
        part, t = self._tensors[gguf] if gguf else self._tensor(name)
        shape = self.shapes[gguf or src.gguf]
        offset, nbytes = int(t.data_offset), int(t.n_bytes)
        if src.expert is not None:  # experts are the outermost dim: each one's bytes are contiguous
            nbytes //= shape[0]
            offset, shape = offset + src.expert * nbytes, shape[1:]
        return part.read(offset, nbytes), int(t.tensor_type), shape, src

    def _check(self, name: str, got: tuple, shape: Optional[Iterable[int]]) -> None:
        if shape is not None and tuple(got) != tuple(shape):
            raise KtError(f"tensor {name} ({self._src[name].gguf} in {self.file_of(name)}) has shape {tuple(got)} "
                          f"but the GGUF metadata implies {tuple(shape)}; the file is inconsistent: convert it again")

    def _decode(self, name: str, gguf: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        from kt_core.weights.gguf_blocks import T, dequantize

        raw, qtype, gshape, src = self._raw(name, gguf)
        stored = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}.get(qtype)
        if stored is not None and dtype is not None and raw.numel() == stored.itemsize * torch.Size(gshape).numel():
            # float files straight to the dtype asked for, block types rounded to it chunk by chunk: a
            # bf16 model never holds a float32 copy (a 129k x 7168 embedding: 3.7 GB)
            return raw.view(stored).reshape(tuple(gshape)).to(dtype)
        try:
            return dequantize(raw, qtype, gshape, dtype or torch.float32)
        except ValueError as exc:
            raise KtError(f"tensor {gguf or src.gguf} in {self.file_of(name)}: {exc}") from None

    def _join(self, name: str, src: Source, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two GGUF tensors back into the one HF tensor the converter split (see ``Source``)."""
        if src.join == "kv_b" and a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0] and a.shape[1] == b.shape[2]:
            # k_b [heads, kv_lora, nope] (transposed for absorption) and v_b [heads, v, kv_lora]
            return torch.cat([a.transpose(1, 2), b], dim=1).reshape(-1, a.shape[1])
        if src.join == "gate_up" and a.shape == b.shape and a.dim() in (2, 3):
            if a.dim() == 3:  # weights [E, I, H] -> [E, H, I]
                a, b = a.transpose(1, 2), b.transpose(1, 2)
            return torch.stack([a, b], dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
        raise KtError(f"tensor {name}: {src.gguf} {tuple(a.shape)} and {src.other} {tuple(b.shape)} in "
                      f"{self.file_of(name)} do not join into it; the file is inconsistent: convert it again")

    def get(self, name: str, shape=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One tensor as floats (float32 unless ``dtype``), dequantized from its block type."""
        self._tensor(name)
        src = self._src[name]
        t = self._decode(name, dtype=dtype)
        if src.join:
            t = self._join(name, src, t, self._decode(name, src.other, dtype))
        if src.transpose:
            t = t.transpose(-1, -2).contiguous()
        if src.unpermute_heads:
            t = t[_unpermute_rows(t.shape[0], src.unpermute_heads)]
        if src.reshape is not None:
            t = t.reshape(src.reshape)
        self._check(name, tuple(t.shape), shape)
        return t if dtype is None else t.to(dtype)

    def optional(self, name: str, shape=None, dtype=None) -> Optional[torch.Tensor]:
        return self.get(name, shape, dtype) if name in self else None

    def quantized(self, name: str, shape=None) -> Optional[QuantizedWeight]:
        """The weight in a kt-core format that holds its GGUF blocks exactly, or None when its type
        has none (the caller then reads floats with ``get``)."""
        from kt_core.weights.gguf_repack import REPACKABLE, repack

        kind = self._tensor(name)[1].tensor_type
        if not self._src[name].plain:
            return None
        if kind not in REPACKABLE:
            if kind.name not in self._told and kind.name not in ("F32", "F16", "BF16"):
                self._told.add(kind.name)
                log.info("GGUF %s tensors have no exact kt-core format yet: dequantized at load", kind.name)
            return None
        raw, qtype, gshape, src = self._raw(name)
        if len(gshape) != 2 or src.reshape is not None:
            return None
        try:
            q = repack(raw, qtype, gshape)
        except ValueError as exc:
            raise KtError(f"tensor {src.gguf} in {self.file_of(name)}: {exc}") from None
        if q is None:
            return None
        if src.unpermute_heads:
            perm = _unpermute_rows(q.qdata.shape[0], src.unpermute_heads)
            q = QuantizedWeight(q.format, q.qdata[perm], q.scales[perm], None if q.zeros is None else q.zeros[perm],
                                q.group_size, q.in_features)
        self._check(name, tuple(q.shape), shape)
        return q
