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
import re
import struct
from pathlib import Path
from typing import Optional

import torch

from kt_core.errors import KtError
from kt_core.weights.paths import is_gguf
from kt_core.weights.quant import INT8_MAX_GROUP, ExpertWeights, Quant, QuantizedWeight, int8_group_ok

MAGIC = b"KTQW"
VERSION = 1
ALIGN = 64
_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "int64": torch.int64}


def tag(experts: str, group_size: int, symmetric: bool) -> str:
    return f"{experts}-g{group_size}-{'sym' if symmetric else 'asym'}"


def default_path(model_path, experts: str, group_size: int, symmetric: bool) -> Path:
    """Inside a model folder; beside a GGUF file, named after it."""
    p = Path(model_path)
    if is_gguf(p):  # a split set's parts all name one file
        stem = re.sub(r"-\d{5}-of-\d{5}$", "", p.stem)
        return p.with_name(f"{stem}.kt-experts-{tag(experts, group_size, symmetric)}.ktq")
    return p / f"kt-experts-{tag(experts, group_size, symmetric)}.ktq"


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


def _show(value, limit: int = 60, plain: bool = False) -> str:
    """A header value for a one-line message: its repr (plain: a printable string as it is), cut short."""
    text = value if plain and isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same(got, want) -> bool:
    """Equal and of the same type (JSON true must not pass for version 1)."""
    return type(got) is type(want) and got == want


class _Damaged(Exception):
    """A header field that disagrees with the data or the model; becomes a KtError naming the file."""


_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in _DTYPES.items()}
_PROJS = ("gate", "up", "down")
_BIASES = ("gate_bias", "up_bias", "down_bias")
_MAX_EXPERT_ID = 1 << 24


class PrequantFile:
    """A validated ``.ktq`` file; ``experts(layer, ids)`` gives that layer's held experts.

    Every header field is checked when the file is opened, before any tensor is formed from
    the map: each tensor entry's dtype, shape, offset and byte count against the payload, each
    projection's codes / scales / zero points against its in_features, group size and the quant
    format, gate / up / down against each other, and (given ``spec``, the model's ModelSpec)
    the hidden size, expert width, expert ids, MoE layers and biases against the model. A file
    that fails is refused with a one-line KtError naming it and what to do; it is never misread.
    """

    def __init__(self, path: Path, fingerprint: str, arch: str, experts: str, group_size: int,
                 symmetric: bool, spec=None) -> None:
        self.path = Path(path)
        self._map: Optional[mmap.mmap] = None
        self._redo = f"run `kt quantize` again for this model and quant, or delete {self.path}"
        try:
            self._open(fingerprint, arch, experts, group_size, symmetric, spec)
        except KtError:
            self.close()
            raise
        except _Damaged as exc:
            self.close()
            raise KtError(f"{self.path} is damaged: {exc}; {self._redo}") from None
        except Exception as exc:  # noqa: BLE001 - a check missed: still one line naming the file, never a crash
            self.close()
            what = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise KtError(f"{self.path} could not be read (unexpectedly: {what}); {self._redo}") from None

    def close(self) -> None:
        """Unmap the file (on Windows a mapped file cannot be deleted or replaced)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views the map: it closes when that goes
                return
            self._map = None

    def _open(self, fingerprint, arch, experts, group_size, symmetric, spec) -> None:
        redo = self._redo
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise KtError(f"cannot open the quantized experts file {self.path}: {exc}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            except (OSError, ValueError) as exc:
                raise KtError(f"cannot map the quantized experts file {self.path}: {exc}") from None
        data = self._map if self._map is not None else b""
        if len(data) < 8 or data[:4] != MAGIC:
            raise KtError(f"{self.path} is not a kt-core quantized experts file; {redo}")
        head_len = struct.unpack("<I", data[4:8])[0]
        if 8 + head_len > len(data):
            raise KtError(f"{self.path} is truncated: its header needs {8 + head_len} bytes, the file has "
                          f"{len(data)}; {redo}")
        try:
            header = json.loads(bytes(data[8:8 + head_len]))
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, nesting too deep
            raise KtError(f"{self.path} has a damaged header (truncated?); {redo}") from None
        if not isinstance(header, dict):
            raise KtError(f"{self.path} has a damaged header (not a JSON object); {redo}")
        want = _expected(fingerprint, arch, experts, group_size, symmetric)
        for key, value in want.items():
            got = header.get(key)
            if not _same(got, value):
                what = {"format": f"is not a kt-core quantized experts file (format {_show(got)})",
                        "source_checksum": "was made from a different checkpoint (or the checkpoint changed)",
                        "version": f"has format version {_show(got)}, this kt-core reads {value}",
                        "quant": f"holds {_show(got, plain=True)} experts, the config asks for {value}",
                        "arch": f"holds a {_show(got, plain=True)} model, this one is {value}"}[key]
                raise KtError(f"{self.path} is stale: it {what}; {redo}")
        self.header = header
        self.base = 8 + head_len + (-(8 + head_len)) % ALIGN
        self.quant = Quant(experts)
        layers = header.get("layers")
        if not isinstance(layers, dict):
            raise _Damaged(f"the header's 'layers' is {_show(layers)}, not an object of layers")
        # 1. every entry's own fields, then 2. the payload holds them all, then 3. sizes vs format and model
        entries = []
        for key, rec in layers.items():
            self._check_record(key, rec, entries)
        end = max((e["offset"] + e["nbytes"] for _, e in entries), default=0)
        if self.base + end > len(data):
            raise KtError(f"{self.path} is truncated ({len(data)} bytes, its header needs {self.base + end}); {redo}")
        for key, rec in layers.items():
            self._check_sizes(key, rec, symmetric, spec)

    def _check_entry(self, what: str, e) -> None:
        """A tensor entry's fields: a known dtype, a shape of ints >= 0, an aligned offset >= 0 and
        exactly shape x itemsize bytes."""
        if not isinstance(e, dict):
            raise _Damaged(f"{what} is {_show(e)}, not a tensor entry")
        dtype, shape, offset, nbytes = e.get("dtype"), e.get("shape"), e.get("offset"), e.get("nbytes")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _Damaged(f"{what} has dtype {_show(dtype)}, not one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise _Damaged(f"{what} has shape {_show(shape)}, not a list of sizes >= 0")
        if not _is_int(offset) or offset < 0 or offset % ALIGN:
            raise _Damaged(f"{what} has offset {_show(offset)}, not a multiple of {ALIGN} >= 0")
        count = 1
        for n in shape:
            count *= n
        if not _is_int(nbytes) or nbytes != count * _ITEMSIZE[dtype]:
            raise _Damaged(f"{what} has nbytes {_show(nbytes)}, but {dtype} {_show(shape)} takes "
                           f"{count * _ITEMSIZE[dtype]}")

    def _check_record(self, key, rec, entries: list) -> None:
        if not isinstance(key, str) or not (key.isascii() and key.isdigit()) or str(int(key)) != key:
            raise _Damaged(f"layer key {_show(key)} is not a layer number")
        where = f"layer {key}"
        if not isinstance(rec, dict):
            raise _Damaged(f"{where} is {_show(rec)}, not an object")
        ids = rec.get("expert_ids")
        if not isinstance(ids, list) or not all(_is_int(i) and 0 <= i < _MAX_EXPERT_ID for i in ids):
            raise _Damaged(f"{where} expert_ids is {_show(ids)}, not a list of expert ids")
        if len(set(ids)) != len(ids):
            raise _Damaged(f"{where} lists an expert twice")
        for name in _PROJS:
            r = rec.get(name)
            if not isinstance(r, dict):
                raise _Damaged(f"{where} {name} is {_show(r)}, not an object")
            for field in ("group_size", "in_features"):
                if not _is_int(r.get(field)) or not 0 < r[field] < _MAX_EXPERT_ID:
                    raise _Damaged(f"{where} {name}.{field} is {_show(r.get(field))}, not a positive size")
            for part in ("qdata", "scales", "zeros"):
                if part not in r:
                    raise _Damaged(f"{where} {name} has no {part} field")
                if part == "zeros" and r[part] is None:
                    continue
                self._check_entry(f"{where} {name}.{part}", r.get(part))
                entries.append((f"{where} {name}.{part}", r[part]))
        for name in _BIASES:
            if name not in rec:
                raise _Damaged(f"{where} has no {name} field")
            if rec[name] is not None:
                self._check_entry(f"{where} {name}", rec[name])
                entries.append((f"{where} {name}", rec[name]))

    def _check_sizes(self, key: str, rec: dict, symmetric: bool, spec) -> None:
        """Each projection's tensors against its in_features, group size and the format, the three
        projections against each other, and all of it against the model (when spec is given)."""
        where, fmt = f"layer {key}", self.quant
        E = len(rec["expert_ids"])
        g = rec["gate"]
        if len(g["qdata"]["shape"]) != 3:
            raise _Damaged(f"{where} gate.qdata has shape {_show(g['qdata']['shape'])}, not [experts, rows, inputs]")
        I, H = g["qdata"]["shape"][1], g["in_features"]
        code = {Quant.INT4: "uint8", Quant.FP8: "uint8"}.get(fmt, "int8")
        for name, M, K in (("gate", I, H), ("up", I, H), ("down", H, I)):
            r = rec[name]
            if r["in_features"] != K:
                raise _Damaged(f"{where} {name}.in_features is {r['in_features']}, the layer's sizes need {K}")
            group = r["group_size"]
            if fmt is Quant.INT8 and group != K and (not int8_group_ok(group) or K % group):
                raise _Damaged(f"{where} {name}.group_size is {group}; int8 takes one scale per row (group_size = "
                               f"in_features = {K}) or groups of 4..{INT8_MAX_GROUP} inputs that divide {K}")
            if fmt is Quant.W8A8:
                if group != K:
                    raise _Damaged(f"{where} {name}.group_size is {group}; {fmt.value} has one scale per row "
                                   f"(group_size = in_features = {K})")
            elif K % group or (fmt is Quant.INT4 and K % 2):
                raise _Damaged(f"{where} {name}.group_size {group} does not divide in_features {K}"
                               + (" (int4 needs an even in_features)" if fmt is Quant.INT4 else ""))
            G = K // group
            want = {"qdata": (code, [E, M, K // 2 if fmt is Quant.INT4 else K]), "scales": ("float32", [E, M, G])}
            zeros = fmt is Quant.INT4 and not symmetric
            if zeros:
                want["zeros"] = ("float32", [E, M, G])
            elif r["zeros"] is not None:
                raise _Damaged(f"{where} {name} has zero points, which {self.header['quant']} experts do not")
            for part, (dtype, shape) in want.items():
                e = r[part]
                if e is None:
                    raise _Damaged(f"{where} {name} has no {part}, which {self.header['quant']} experts need")
                if e["dtype"] != dtype or e["shape"] != shape:
                    raise _Damaged(f"{where} {name}.{part} is {e['dtype']} {e['shape']}, expected {dtype} {shape} "
                                   f"(in_features {K}, group_size {group}, {E} experts)")
        for name, M in (("gate_bias", I), ("up_bias", I), ("down_bias", H)):
            e = rec[name]
            if e is not None and (e["dtype"] != "float32" or e["shape"] != [E, M]):
                raise _Damaged(f"{where} {name} is {e['dtype']} {e['shape']}, expected float32 {[E, M]}")
        if spec is None:
            return
        layer, m = int(key), spec.moe
        if m is None or not 0 <= layer < spec.num_layers or not spec.is_moe(layer):
            raise _Damaged(f"{where} is not an MoE layer of this model")
        if H != spec.hidden_size or I != m.intermediate:
            raise _Damaged(f"{where} holds experts of hidden size {H} and width {I}, this model's are "
                           f"{spec.hidden_size} and {m.intermediate}")
        if any(i >= m.num_experts for i in rec["expert_ids"]):
            raise _Damaged(f"{where} lists expert {max(rec['expert_ids'])}, this model has {m.num_experts}")
        has_bias = [rec[n] is not None for n in _BIASES]
        if has_bias != [bool(m.expert_bias)] * 3:
            raise _Damaged(f"{where} {'lacks' if m.expert_bias else 'has'} expert biases, which this model's "
                           f"experts {'have' if m.expert_bias else 'do not have'}")

    @staticmethod
    def _layer_entries(rec: dict):
        for name in _PROJS:
            yield from (rec[name][part] for part in ("qdata", "scales", "zeros") if rec[name][part] is not None)
        yield from (rec[name] for name in _BIASES if rec[name] is not None)

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
        if self._map is None and any(e["nbytes"] for e in self._layer_entries(rec)):
            raise KtError(f"{self.path} was closed; open it again")
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

    header = _expected(ck.fingerprint(), spec.arch, qp.experts.value, qp.group_of(qp.experts), qp.symmetric)
    writer = Writer(out, header)
    layers = [i for i in range(spec.num_layers) if spec.is_moe(i)]
    try:
        with progress(f"quantizing experts to {header['quant']}", len(layers)) as advance:
            for i in layers:
                r = _Reader(ck, spec, dtype, torch.device("cpu"), qp)
                writer.add_layer(i, load_experts(r, f"model.layers.{i}.", spec, list(range(spec.moe.num_experts)),
                                                 keep=False))  # in quant.experts, whatever a GGUF holds
                advance()
        return writer.close()
    except BaseException:
        writer.abort()
        raise
