"""Reading Hugging Face checkpoint folders without unpickling anything.

Safetensors files (single or sharded with ``model.safetensors.index.json``) are
read tensor by tensor with plain reads (``safetensors_file.py``, no memory map), so a
layer is only read when it is placed and a converted weight leaves no resident copy. ``.bin`` pickles are refused unless the caller allows them, and then
loaded with ``torch.load(weights_only=True)``. Every failure is a one-line
``KtError`` naming the file or tensor and what to do: each safetensors header is
checked against the file's size (length field, dtypes, shapes, data_offsets)
before the file is mapped, so a corrupt or truncated download never allocates
what its header claims.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional

import torch

from kt_core.errors import KtError
from kt_core.jsonfile import brief, is_rust_panic, json_error, read_json, show  # noqa: F401 (re-exported)
from kt_core.weights.paths import is_gguf
from kt_core.weights.safetensors_file import SafetensorsFile
from kt_core.weights.safetensors_header import (  # noqa: F401 (re-exported)
    MAX_HEADER_BYTES, SAFETENSORS_BITS, check_safetensors_header)

log = logging.getLogger(__name__)


def _shard_name_ok(fname) -> bool:
    """A shard named by the index: a relative ``.safetensors`` path inside the model folder."""
    if not isinstance(fname, str) or not fname.endswith(".safetensors") or "\x00" in fname:
        return False
    p = Path(fname)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in fname


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class Checkpoint:
    """Lazy tensor access to one HF-format model folder."""

    def __init__(self, path: str | Path, allow_bin: bool = False) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise KtError(f"model folder not found: {self.path}")
        self.config = read_json(self.path / "config.json", "config.json")
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._index_file: Optional[Path] = None  # model.safetensors.index.json when the map came from it
        self._open: dict[Path, SafetensorsFile] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._stored: dict[str, str] = {}  # name the loader asks for -> name in the file, where they differ
        self._index(allow_bin)
        self._strip_backbone_prefix()
        from kt_core.weights import deepseek_release

        deepseek_release.rename(self)  # DeepSeek-V4's release names
        self._find_packed()
        self._mx = deepseek_release.mxfp4_weights(self)  # kept as int8 g32

    def _find_packed(self) -> None:
        """compressed-tensors pack-quantized int4 weights (Kimi-K2.5's experts): ``NAME.weight`` stands
        for ``NAME.weight_packed`` / ``_scale`` / ``_shape`` and is kept as kt-core int4."""
        from kt_core.weights.packed_int4 import scheme

        self._pack = scheme(self.config)
        self._packed: set[str] = set()
        if self._pack is None:
            return
        for n in list(self._where):
            if n.endswith(".weight_packed"):
                base = n[: -len("_packed")]
                missing = [x for x in ("_scale", "_shape") if base + x not in self._where]
                if missing:
                    raise KtError(f"tensor {n} has no {base + missing[0]}; the pack-quantized checkpoint is "
                                  "incomplete: download it again")
                self._packed.add(base)
    def _strip_backbone_prefix(self) -> None:
        """A multimodal checkpoint's language model is read under the plain names (``model.layers.0...``,
        ``lm_head.weight``); the rest (vision tower, projector) is not visible."""
        from kt_core.models.spec import text_backbone

        _, prefixes = text_backbone(self.config)
        if not prefixes:
            return
        for n in [*self._where, *self._bin]:
            stored = next((p for p in prefixes if n.startswith(p)), None)
            if stored is not None:
                self._stored[prefixes[stored] + n[len(stored):]] = n
        if not self._stored:
            raise KtError(f"{self.path} holds no tensor named {' or '.join(p + '*' for p in prefixes)}, where this "
                          "architecture keeps its language model; the weights do not match config.json")
        self._where = {k: self._where[n] for k, n in self._stored.items() if n in self._where}
        self._bin = {k: self._bin[n] for k, n in self._stored.items() if n in self._bin}

    # ---- discovery ------------------------------------------------------------
    def _index(self, allow_bin: bool) -> None:
        index = self.path / "model.safetensors.index.json"
        files = sorted(f for f in self.path.glob("*.safetensors") if f.is_file())
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise KtError(f"{index} has no weight_map (tensor name -> shard file), got {show(weight_map)}; "
                              "download model.safetensors.index.json again")
            for name, fname in weight_map.items():
                if not _shard_name_ok(fname):
                    raise KtError(f"{index.name} maps tensor {show(name)} to {show(fname)}, which is not a "
                                  ".safetensors file in the model folder; download the index again")
                self._where[name] = self.path / fname
            self._index_file = index
            missing = sorted({p for p in self._where.values() if not p.is_file()})
            if missing:
                raise KtError(f"{index.name} names shards that are missing: "
                              f"{', '.join(brief(p.name) for p in missing[:3])}; download them again")
            return
        if files:
            for f in files:
                for name in self._handle(f).keys():
                    self._where[name] = f
            return
        bins = sorted(self.path.glob("*.bin"))
        if bins:
            if not allow_bin:
                raise KtError(f"{self.path} holds only .bin (pickle) weights, which are not loaded by default; "
                              "convert them to safetensors, or set model.allow_bin_weights=true to load them "
                              "with torch.load(weights_only=True)")
            for f in bins:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:
                    raise KtError(f"{f.name} could not be loaded safely ({type(exc).__name__}: {brief(exc)}); "
                                  "convert it to safetensors") from None
                if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in state.items()):
                    raise KtError(f"{f.name} holds {type(state).__name__}, not a state dict of tensors; "
                                  "convert the checkpoint to safetensors")
                self._bin.update(state)
            return
        raise KtError(f"no weights in {self.path}: expected *.safetensors (or model.safetensors.index.json)")

    def _handle(self, f: Path) -> SafetensorsFile:
        if f not in self._open:
            entries, data_start = check_safetensors_header(f)
            self._open[f] = SafetensorsFile(f, entries, data_start)
        return self._open[f]

    def close(self) -> None:
        """Close the files read so far (a later read opens them again)."""
        for handle in self._open.values():
            handle.close()

    def fingerprint(self) -> str:
        """Names this exact checkpoint: its config plus every weight file's name, size and mtime
        (a re-downloaded or edited file gets a new fingerprint)."""
        import hashlib

        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in sorted(set(self._where.values())) or sorted(self.path.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    # ---- access ---------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(set(self._where) | set(self._bin))

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._bin or name in self._packed

    def keeps(self, name: str) -> bool:
        """Whether ``quantized(name)`` hands over the file's own quantization (pack-quantized int4, MXFP4)."""
        return name in self._packed or name in self._mx

    def quantized(self, name: str, shape=None):
        """A pack-quantized weight as kt-core int4, an MXFP4 one as int8 g32 (exact), else None."""
        if name in self._mx:
            from kt_core.weights.deepseek_release import mxfp4_as_int8, scale_name

            return mxfp4_as_int8(name, self._raw(name), self._raw(scale_name(name)), shape)
        if name not in self._packed:
            return None
        from kt_core.weights.packed_int4 import to_quantized

        return to_quantized(name, self._raw(name + "_packed"), self._raw(name + "_scale"), self._raw(name + "_shape"),
                            self._pack.group_size, shape)

    @staticmethod
    def kept_groups(quant) -> frozenset:
        from kt_core.weights.keep import kept_groups

        return kept_groups(quant)

    def plan_tensors(self, tensors: list, keep: frozenset) -> list:
        """The planner's tensor list with the stored bytes of the pack-quantized weights a load keeps."""
        from kt_core.weights.packed_int4 import plan_tensors

        from kt_core.weights import deepseek_release

        if self._mx:
            tensors = deepseek_release.plan_tensors(tensors, self._mx, keep)
        return plan_tensors(tensors, self._packed, self._pack.group_size, keep) if self._packed else tensors

    def get(self, name: str, shape: Optional[Iterable[int]] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Read one tensor; ``shape`` is checked when given."""
        if name in self._packed or name in self._mx:  # floats asked of a kept weight: q * scale
            from kt_core.weights.quant import dequantize

            t = dequantize(self.quantized(name, shape), torch.float32)
            return t if dtype is None else t.to(dtype)
        t = self._raw(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise KtError(f"tensor {name} in {self.file_of(name)} has shape {tuple(t.shape)} but config.json "
                          f"implies {tuple(shape)}; config.json and the weights do not belong together")
        if t.dtype in FP8_DTYPES:  # fp8 checkpoints (DeepSeek-V3, Qwen3-FP8): codes x block scales
            from kt_core.weights.quant import dequantize

            t = dequantize(self.fp8_weight(name, t), torch.float32)
        return t if dtype is None else t.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, shape: Iterable[int]) -> None:
        """Tensor ``name`` (of ``shape``) into ``out`` (contiguous, that shape): read straight into it
        where the file stores it in out's dtype (no second copy, no fresh pages), else converted."""
        f = self._where.get(name)
        if f is not None and name not in self._packed and name not in self._mx and tuple(out.shape) == tuple(shape):
            handle = self._handle(f)
            stored = self._stored.get(name, name)
            entry = handle.entries.get(stored)
            if entry is not None and list(entry[1]) == list(shape) and handle.stored_dtype(stored) == out.dtype \
                    and out.is_contiguous():
                handle.get_tensor(stored, out)
                return
        out.copy_(self.get(name, shape, out.dtype))

    def read_rows(self, name: str, shape, r0: int, r1: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Rows [r0, r1) of the 2-D float tensor ``name`` (of ``shape``) in ``dtype``, read alone (a
        safetensors file's byte range), or None where this tensor is not stored so (then ``get`` it whole)."""
        f = self._where.get(name)
        if f is None or name in self._packed or name in self._mx or len(tuple(shape)) != 2:
            return None
        handle = self._handle(f)
        stored = self._stored.get(name, name)
        entry = handle.entries.get(stored)
        if entry is None or list(entry[1]) != list(shape) or \
                handle.stored_dtype(stored) not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        return handle.get_rows(stored, r0, r1).to(dtype)

    def is_fp8(self, name: str) -> bool:
        return name in self and f"{name}_scale_inv" in self

    def fp8_block(self) -> int:
        """The fp8 scale block size from config.json's quantization_config (default 128)."""
        qc = self.config.get("quantization_config") or {}
        value = qc.get("weight_block_size", [128, 128]) if isinstance(qc, dict) else qc
        try:
            block = value[-1]
            if isinstance(block, float) and block.is_integer():
                block = int(block)
            if not isinstance(qc, dict) or type(block) is not int or not 1 <= block <= 1 << 20:
                raise ValueError
        except (TypeError, ValueError, KeyError, IndexError):
            raise KtError(f"config.json quantization_config.weight_block_size is {show(value)}; it must be a list "
                          "of two positive integers such as [128, 128]: fix config.json") from None
        return block

    def fp8_weight(self, name: str, raw: Optional[torch.Tensor] = None):
        """An fp8 weight kept as codes with its ``<name>_scale_inv`` block scales (QuantizedWeight)."""
        from kt_core.weights.quant import from_fp8_blocks

        if raw is None:
            raw = self._raw(name)
        where = self.file_of(name)
        if raw.dtype not in FP8_DTYPES:
            raise KtError(f"tensor {name} in {where} is {raw.dtype}, not float8")
        if raw.dtype != torch.float8_e4m3fn:
            raise KtError(f"tensor {name} in {where} is {raw.dtype}; kt-core reads float8 e4m3 (e4m3fn) checkpoints only")
        scale_name = f"{name}_scale_inv"
        if scale_name not in self:
            from kt_core.weights.deepseek_release import e8m0, scale_name as ue8m0_name

            ue8m0 = ue8m0_name(name)  # DeepSeek-V4's release: NAME.scale, powers of two
            if ue8m0 is None or ue8m0 not in self:
                raise KtError(f"fp8 tensor {name} in {where} has no {scale_name} (block scales); this checkpoint's "
                              "fp8 layout is not supported: convert it to bf16")
            scales = e8m0(self._raw(ue8m0), name)
        else:
            scales = self._raw(scale_name)
        block = self.fp8_block()
        try:
            return from_fp8_blocks(raw, scales, block)
        except ValueError as exc:
            raise KtError(f"{name} in {where}: {brief(exc)}") from None

    def file_of(self, name: str) -> str:
        """The name of the file that holds tensor ``name``, for messages."""
        f = self._where.get(name)
        return f.name if f is not None else "the .bin weights" if name in self._bin else str(self.path)

    def _raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (no dequantization, no checks)."""
        if name in self._bin:
            return self._bin[name]
        if name not in self._where:
            raise KtError(f"tensor {name} is missing from the checkpoint in {self.path}")
        f = self._where[name]
        handle = self._handle(f)
        stored = self._stored.get(name, name)
        if stored not in handle.entries:
            raise KtError(f"{self._index_file.name if self._index_file else 'the index'} maps tensor {show(stored)} "
                          f"to {f.name}, which does not hold it; download the checkpoint again")
        return handle.get_tensor(stored)

    def stored(self, name: str) -> tuple[str, torch.Tensor]:
        """(the name in the file, the tensor as stored): what ``kt merge`` copies unchanged."""
        return self._stored.get(name, name), self._raw(name)

    @property
    def packed_weights(self) -> set[str]:
        """The ``NAME.weight`` names stored pack-quantized (``NAME.weight_packed`` / ``_scale`` / ``_shape``)."""
        return set(self._packed)

    def optional(self, name: str, shape=None, dtype=None) -> Optional[torch.Tensor]:
        return self.get(name, shape, dtype) if name in self else None

    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from generation_config.json (what transformers' generate stops on)."""
        return generation_eos(self.path)

    def tokenizer(self):
        """The folder's tokenizer (tokenizer.json and its config), or None when it has none."""
        from kt_core.models.tokenizer import Tokenizer

        if not Tokenizer.present(self.path):
            return None
        log.info("tokenizer: the checkpoint's own, from %s", self.path)
        if not (self.path / "tokenizer.json").is_file():  # a tiktoken rank file only (Kimi's)
            try:
                return Tokenizer.from_dir(self.path)
            except KtError as exc:  # another model's tiktoken file: run on token ids, as without a tokenizer
                log.warning("%s; running on token ids (prompts as ids, no chat template)", exc)
                return None
        return Tokenizer.from_dir(self.path)


def read_into(ck, name: str, out: torch.Tensor, shape) -> None:
    """Tensor ``name`` of checkpoint ``ck`` (of ``shape``) into ``out``: straight into it where the
    checkpoint can (``read_into``: safetensors), else a copy of ``get`` in out's dtype (GGUF files)."""
    direct = getattr(ck, "read_into", None)
    if direct is not None:
        direct(name, out, shape)
    else:
        out.copy_(ck.get(name, shape, out.dtype))


def generation_eos(path) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json (what transformers' generate stops on)."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return ()
    eos = read_json(f, "generation_config.json").get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise KtError(f"{f} has eos_token_id={show(eos)}; it must be a token id or a list of token ids")
    return tuple(ids)


def open_checkpoint(path, allow_bin: bool = False):
    """A Hugging Face folder (Checkpoint) or a GGUF file (GGUFCheckpoint), by what ``path`` is."""
    if is_gguf(path):
        from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(path)
    return Checkpoint(path, allow_bin=allow_bin)
