"""A GGUF file's header (metadata and tensor table), parsed from the format's definition.

The ``gguf`` package's reader builds a numpy view per array item: a 152k-token vocabulary took
~6 s to open, on every load and every ``kt plan``. This parser reads the header in one pass, with
numeric arrays as one numpy read each (~0.1 s). Every read is checked against the file's size, so
a truncated or corrupt header fails naming the byte offset. Layout (little-endian, versions 2 and 3):

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata: key (u64 length + UTF-8) | value type u32 | value
    tensors:  name | n_dims u32 | dims u64[n_dims] (innermost first) | type u32 | offset u64
    data: at the header's end rounded up to general.alignment (32 by default); offsets are from there

Value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array (item type
u32, count u64, items), 10 u64, 11 i64, 12 f64. The quantization types stay the ``gguf`` package's.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NUMERIC = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}
STRING, ARRAY, BOOL = 8, 9, 7
MAX_ITEMS = 1 << 31  # a tensor or metadata count beyond this is a corrupt header, not a model
MAX_ARRAY = 1 << 26  # items of one metadata array (vocabularies are ~10^5): a bigger claim is corruption
MAX_NESTING = 4  # arrays of arrays (real files nest once, if at all)


class OutOfFile(Exception):
    def __init__(self, offset: int, need: int, size: int) -> None:
        super().__init__(offset, need, size)
        self.offset, self.need, self.size = offset, need, size


class BadHeader(Exception):
    """A value the format does not allow (an unknown type, a bad version), with its offset."""


@dataclass
class Field:
    offset: int
    value: Any

    def contents(self) -> Any:
        return self.value


@dataclass
class Header:
    """What the parts of kt-core read of a GGUF file's header (the gguf reader's ``fields`` and ``tensors``)."""

    fields: dict
    tensors: list


@dataclass
class TensorInfo:
    name: str
    shape: np.ndarray  # GGUF order: innermost dim first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_bytes: int


class _Cursor:
    def __init__(self, buf, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise OutOfFile(self.pos, n, self.size)
        at, self.pos = self.pos, self.pos + n
        return at

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        at = self.take(n)
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise BadHeader(f"the string at byte {at} is not UTF-8") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in NUMERIC:
            dt = np.dtype(NUMERIC[kind])
            v = np.frombuffer(self.buf, dt, 1, self.take(dt.itemsize))[0].item()
            return bool(v) if kind == BOOL else v
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            at = self.pos
            item, count = self.u32(), self.u64()
            if count > MAX_ARRAY or depth >= MAX_NESTING:
                raise BadHeader(f"the array at byte {at} claims {count} items at nesting depth {depth + 1}")
            if item in NUMERIC:
                dt = np.dtype(NUMERIC[item])
                arr = np.frombuffer(self.buf, dt, count, self.take(dt.itemsize * count))
                return [bool(x) for x in arr] if item == BOOL else arr.tolist()
            if item not in (STRING, ARRAY):
                raise BadHeader(f"unknown item type {item} in the array at byte {at}")
            return [self.value(item, depth + 1) for _ in range(count)]
        raise BadHeader(f"unknown value type {kind} at byte {self.pos - 4}")


def parse(path: Path) -> tuple[dict[str, Field], list[TensorInfo]]:
    """(metadata key -> Field, the tensors) of a little-endian GGUF file. Raises OutOfFile or BadHeader."""
    import gguf

    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    try:
        c = _Cursor(buf, size)
        if bytes(buf[c.take(4):4]) != b"GGUF":
            raise BadHeader("the file does not start with b'GGUF'")
        version = c.u32()
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            raise BadHeader("it is a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {version} is not "
                            "2 or 3")
        n_tensors, n_kv = c.u64(), c.u64()
        if n_tensors > MAX_ITEMS or n_kv > MAX_ITEMS:
            raise BadHeader(f"the header claims {n_tensors} tensors and {n_kv} metadata entries")
        fields: dict[str, Field] = {}
        for _ in range(n_kv):
            at = c.pos
            key = c.string()
            if key in fields:
                raise BadHeader(f"metadata {key!r} is listed twice (again at byte {at})")
            fields[key] = Field(at, c.value(c.u32()))
        infos, names = [], set()
        for _ in range(n_tensors):
            at = c.pos
            name = c.string()
            if name in names:
                raise BadHeader(f"tensor {name!r} is listed twice (again at byte {at})")
            names.add(name)
            n_dims = c.u32()
            if n_dims > 8:
                raise BadHeader(f"tensor {name!r} at byte {at} has {n_dims} dims")
            dims = np.frombuffer(buf, "<u8", n_dims, c.take(8 * n_dims)).copy()
            kind, offset = c.u32(), c.u64()
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise BadHeader(f"tensor {name!r} at byte {at} has unknown type {kind}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = 1
            for d in dims.tolist():  # Python ints: a product past 2**64 does not wrap around
                n *= d
            if n > size * 8:  # more values than the file has bits, whatever their type
                raise BadHeader(f"tensor {name!r} at byte {at} claims {n} values, more than the file holds")
            if n % block:
                raise BadHeader(f"tensor {name!r} at byte {at} holds {n} values, not whole {qtype.name} blocks")
            infos.append(TensorInfo(name, dims, qtype, offset, n // block * type_size))
        align = fields["general.alignment"].value if "general.alignment" in fields else 32
        if not isinstance(align, int) or align < 1:
            raise BadHeader(f"general.alignment is {align!r}")
        start = (c.pos + align - 1) // align * align
        for t in infos:
            t.data_offset += start
            if t.data_offset + t.n_bytes > size:
                raise OutOfFile(t.data_offset, t.n_bytes, size)
        return fields, infos
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()
