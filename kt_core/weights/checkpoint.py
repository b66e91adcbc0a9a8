"""Reading Hugging Face checkpoint folders without unpickling anything.

Safetensors files (single or sharded with ``model.safetensors.index.json``) are
memory-mapped and read tensor by tensor, so a layer is only read when it is
placed. ``.bin`` pickles are refused unless the caller allows them, and then
loaded with ``torch.load(weights_only=True)``. Every failure is a one-line
``KtError`` naming the file or tensor and what to do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import torch

from kt_core.errors import KtError

log = logging.getLogger(__name__)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KtError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KtError(f"{what} {path} is not valid JSON ({exc}); re-download or fix it") from None


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class Checkpoint:
    """Lazy tensor access to one HF-format model folder."""

    def __init__(self, path: str | Path, allow_bin: bool = False) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise KtError(f"model folder not found: {self.path}")
        self.config = read_json(self.path / "config.json", "config.json")
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        self._bin: dict[str, torch.Tensor] = {}
        self._index(allow_bin)

    # ---- discovery ------------------------------------------------------------
    def _index(self, allow_bin: bool) -> None:
        index = self.path / "model.safetensors.index.json"
        files = sorted(self.path.glob("*.safetensors"))
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map") or {}
            for name, fname in weight_map.items():
                self._where[name] = self.path / fname
            missing = sorted({p for p in self._where.values() if not p.is_file()})
            if missing:
                raise KtError(f"the safetensors index names shards that are missing: "
                              f"{', '.join(p.name for p in missing[:3])}; download them again")
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
                    raise KtError(f"{f.name} could not be loaded safely ({type(exc).__name__}: {exc}); "
                                  "convert it to safetensors") from None
                self._bin.update(state)
            return
        raise KtError(f"no weights in {self.path}: expected *.safetensors (or model.safetensors.index.json)")

    def _handle(self, f: Path):
        if f not in self._open:
            from safetensors import SafetensorError, safe_open

            try:
                self._open[f] = safe_open(str(f), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise KtError(f"{f.name} is corrupt or truncated ({exc}); download it again") from None
        return self._open[f]

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
        return name in self._where or name in self._bin

    def get(self, name: str, shape: Optional[Iterable[int]] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Read one tensor; ``shape`` is checked when given."""
        t = self._raw(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise KtError(f"tensor {name} has shape {tuple(t.shape)} but the config implies {tuple(shape)}; "
                          "config.json and the weights do not belong together")
        if t.dtype in FP8_DTYPES:  # fp8 checkpoints (DeepSeek-V3, Qwen3-FP8): codes x block scales
            from kt_core.weights.quant import dequantize

            t = dequantize(self.fp8_weight(name, t), torch.float32)
        return t if dtype is None else t.to(dtype)

    def is_fp8(self, name: str) -> bool:
        return name in self and f"{name}_scale_inv" in self

    def fp8_weight(self, name: str, raw: Optional[torch.Tensor] = None):
        """An fp8 weight kept as codes with its ``<name>_scale_inv`` block scales (QuantizedWeight)."""
        from kt_core.weights.quant import from_fp8_blocks

        if raw is None:
            raw = self._raw(name)
        if raw.dtype not in FP8_DTYPES:
            raise KtError(f"tensor {name} is {raw.dtype}, not float8")
        if raw.dtype != torch.float8_e4m3fn:
            raise KtError(f"tensor {name} is {raw.dtype}; kt-core reads float8 e4m3 (e4m3fn) checkpoints only")
        scale_name = f"{name}_scale_inv"
        if scale_name not in self:
            raise KtError(f"fp8 tensor {name} has no {scale_name} (block scales); this checkpoint's fp8 layout "
                          "is not supported: convert it to bf16")
        scales = self._raw(scale_name)
        block = int((self.config.get("quantization_config") or {}).get("weight_block_size", [128, 128])[-1])
        try:
            return from_fp8_blocks(raw, scales, block)
        except ValueError as exc:
            raise KtError(f"{name}: {exc}") from None

    def _raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (no dequantization, no checks)."""
        if name in self._bin:
            return self._bin[name]
        if name not in self._where:
            raise KtError(f"tensor {name} is missing from the checkpoint in {self.path}")
        try:
            return self._handle(self._where[name]).get_tensor(name)
        except KtError:
            raise
        except Exception as exc:
            raise KtError(f"tensor {name} in {self._where[name].name} could not be read ({exc}); "
                          "the file is probably truncated: download it again") from None

    def optional(self, name: str, shape=None, dtype=None) -> Optional[torch.Tensor]:
        return self.get(name, shape, dtype) if name in self else None
