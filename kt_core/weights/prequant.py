"""Quantize once: the experts of a checkpoint, quantized, saved in one file for fast reload.

``kt quantize`` writes ``<model folder>/kt-experts-<tag>.ktq`` (or ``out=FILE``); loading a
model with the same quant settings then maps that file instead of reading and quantizing
every expert again. The file is::

    b"KTQW" | u32 header length | JSON header | payload (tensors, 64-byte aligned)

The header names the format and its version, the quant settings, the model architecture
and the **source checksum** (the checkpoint's fingerprint: config.json plus every weight
file's name, size and mtime). A file made from another checkpoint, with other settings,
by another format version, or truncated, is refused with a message that says what to do;
it is never misread. Tensors are read through a memory map, never unpickled.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Optional

import torch

from kt_core.errors import KtError
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight

MAGIC = b"KTQW"
VERSION = 1
ALIGN = 64
_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "int64": torch.int64}


def tag(experts: str, group_size: int, symmetric: bool) -> str:
    return f"{experts}-g{group_size}-{'sym' if symmetric else 'asym'}"


def default_path(model_path, experts: str, group_size: int, symmetric: bool) -> Path:
    return Path(model_path) / f"kt-experts-{tag(experts, group_size, symmetric)}.ktq"


def _expected(fingerprint: str, arch: str, experts: str, group_size: int, symmetric: bool) -> dict:
    return {"format": "kt-core-quantized-experts", "version": VERSION, "source_checksum": fingerprint,
            "arch": arch, "quant": tag(experts, group_size, symmetric)}


class Writer:
    """Streams layers into ``path`` (a temp file renamed into place when complete)."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.header = Path(path), dict(header, layers={})
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.offset = 0

    def _put(self, t: torch.Tensor) -> dict:
        t = t.contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        pad = (-self.offset) % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        entry = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "offset": self.offset,
                 "nbytes": len(raw)}
        self.f.write(raw)
        self.offset += len(raw)
        return entry

    def add_layer(self, layer: int, ex: ExpertWeights) -> None:
        rec: dict = {"expert_ids": ex.expert_ids.tolist()}
        for name in ("gate", "up", "down"):
            w = getattr(ex, name)
            if not isinstance(w, QuantizedWeight):
                raise KtError(f"kt quantize writes quantized experts; layer {layer} {name} is not quantized")
            rec[name] = {"group_size": w.group_size, "in_features": w.in_features, "qdata": self._put(w.qdata),
                         "scales": self._put(w.scales), "zeros": None if w.zeros is None else self._put(w.zeros)}
        for name in ("gate_bias", "up_bias", "down_bias"):
            b = getattr(ex, name)
            rec[name] = None if b is None else self._put(b.float())
        self.header["layers"][str(layer)] = rec

    def close(self) -> Path:
        self.f.close()
        head = json.dumps(self.header).encode()
        payload_at = 8 + len(head)
        payload_at += (-payload_at) % ALIGN
        final = self.path.with_name(self.path.name + ".part")
        with open(final, "wb") as out, open(self.tmp, "rb") as src:
            out.write(MAGIC + struct.pack("<I", len(head)) + head + b"\0" * (payload_at - 8 - len(head)))
            while True:
                chunk = src.read(1 << 24)
                if not chunk:
                    break
                out.write(chunk)
        self.tmp.unlink()
        os.replace(final, self.path)  # appears whole or not at all
        return self.path

    def abort(self) -> None:
        self.f.close()
        for p in (self.tmp, self.path.with_name(self.path.name + ".part")):
            p.unlink(missing_ok=True)


class PrequantFile:
    """A validated ``.ktq`` file; ``experts(layer, ids)`` gives that layer's held experts."""

    def __init__(self, path: Path, fingerprint: str, arch: str, experts: str, group_size: int,
                 symmetric: bool) -> None:
        self.path = Path(path)
        redo = f"run `kt quantize` again for this model and quant, or delete {self.path}"
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise KtError(f"cannot open the quantized experts file {self.path}: {exc}") from None
        with f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None
        data = self._map if self._map is not None else b""
        if len(data) < 8 or data[:4] != MAGIC:
            raise KtError(f"{self.path} is not a kt-core quantized experts file; {redo}")
        head_len = struct.unpack("<I", data[4:8])[0]
        try:
            self.header = json.loads(bytes(data[8:8 + head_len]))
        except ValueError:
            raise KtError(f"{self.path} has a damaged header (truncated?); {redo}") from None
        want = _expected(fingerprint, arch, experts, group_size, symmetric)
        for key, value in want.items():
            got = self.header.get(key)
            if got != value:
                what = {"source_checksum": "was made from a different checkpoint (or the checkpoint changed)",
                        "version": f"has format version {got}, this kt-core reads {value}",
                        "quant": f"holds {got} experts, the config asks for {value}",
                        "arch": f"holds a {got} model, this one is {value}"}.get(key, f"has {key}={got!r}")
                raise KtError(f"{self.path} is stale: it {what}; {redo}")
        self.base = 8 + head_len + (-(8 + head_len)) % ALIGN
        end = max((e["offset"] + e["nbytes"] for e in self._entries()), default=0)
        if self.base + end > len(data):
            raise KtError(f"{self.path} is truncated ({len(data)} bytes, its header needs {self.base + end}); {redo}")
        self.quant = Quant(experts)

    def _entries(self):
        for rec in self.header["layers"].values():
            for name in ("gate", "up", "down"):
                for part in ("qdata", "scales", "zeros"):
                    if rec[name][part] is not None:
                        yield rec[name][part]
            for name in ("gate_bias", "up_bias", "down_bias"):
                if rec[name] is not None:
                    yield rec[name]

    def has_layer(self, layer: int) -> bool:
        return str(layer) in self.header["layers"]

    def _tensor(self, e: dict) -> torch.Tensor:
        if e["nbytes"] == 0:
            return torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]])
        import warnings

        start = self.base + e["offset"]
        with warnings.catch_warnings():  # a read-only map: we only ever copy out of it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=e["nbytes"], offset=start)
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])

    def experts(self, layer: int, ids: list[int], device: torch.device) -> ExpertWeights:
        rec = self.header["layers"].get(str(layer))
        if rec is None:
            raise KtError(f"{self.path} has no experts for layer {layer}; re-run kt quantize")
        pos = {e: i for i, e in enumerate(rec["expert_ids"])}
        missing = [e for e in ids if e not in pos]
        if missing:
            raise KtError(f"{self.path} lacks experts {missing[:4]} of layer {layer}; re-run kt quantize")
        idx = torch.tensor([pos[e] for e in ids], dtype=torch.long)

        def take(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, idx).to(device)  # copies out of the map

        ws = []
        for name in ("gate", "up", "down"):
            r = rec[name]
            z = None if r["zeros"] is None else self._tensor(r["zeros"])
            ws.append(QuantizedWeight(self.quant, take(self._tensor(r["qdata"])), take(self._tensor(r["scales"])),
                                      take(z), r["group_size"], r["in_features"]))
        biases = {n: take(None if rec[n] is None else self._tensor(rec[n])) for n in ("gate_bias", "up_bias", "down_bias")}
        return ExpertWeights(torch.tensor(ids, dtype=torch.long, device=device), *ws, **biases)


def write_model(ck, spec, qp, out: Path, dtype: torch.dtype) -> Path:
    """Quantize every MoE layer's experts of checkpoint ``ck`` and save them to ``out``."""
    from kt_core.models.model import _Reader, load_experts
    from kt_core.progress import progress

    header = _expected(ck.fingerprint(), spec.arch, qp.experts.value, qp.group_size, qp.symmetric)
    writer = Writer(out, header)
    layers = [i for i in range(spec.num_layers) if spec.is_moe(i)]
    try:
        with progress(f"quantizing experts to {header['quant']}", len(layers)) as advance:
            for i in layers:
                r = _Reader(ck, spec, dtype, torch.device("cpu"), qp)
                writer.add_layer(i, load_experts(r, f"model.layers.{i}.", spec, list(range(spec.moe.num_experts))))
                advance()
        return writer.close()
    except BaseException:
        writer.abort()
        raise
