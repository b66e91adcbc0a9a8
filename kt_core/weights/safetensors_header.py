"""The safetensors header check: a file's header (length field, JSON, each tensor's dtype, shape and
data_offsets) checked against the file's size before anything is read or allocated."""
from __future__ import annotations

import json
from pathlib import Path

from kt_core.errors import KtError
from kt_core.jsonfile import brief, json_error, show

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# bits per element of every dtype the safetensors format defines
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
                    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def check_safetensors_header(f: Path) -> tuple[dict, int]:
    """Check a safetensors file's header against its size before anything is read or allocated:
    the 8-byte length, the JSON, each tensor's dtype, shape and data_offsets (inside the data section,
    spanning exactly shape x dtype size, tiling it without gaps or overlaps). Raises a one-line KtError.
    Returns the tensors (name -> (dtype, shape, begin, end)) and where the data section starts."""

    def bad(problem: str) -> KtError:
        return KtError(f"{f.name} is corrupt or truncated ({problem}); download it again or re-convert "
                       "the checkpoint")

    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            text = fh.read(n) if n is not None and n <= min(size - 8, MAX_HEADER_BYTES) else b""
    except OSError as exc:
        raise KtError(f"{f} could not be read ({brief(exc.strerror or exc)}); check the file") from None
    if n is None:
        raise bad(f"{size} bytes, too short for the 8-byte header length")
    if n > size - 8:
        raise bad(f"the header length field says {n} bytes but only {size - 8} follow")
    if n > MAX_HEADER_BYTES:
        raise bad(f"a {n}-byte header, over safetensors' {MAX_HEADER_BYTES}-byte limit")
    try:
        header = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("the header is not UTF-8") from None
    except RecursionError:
        raise bad("the header JSON is nested too deeply") from None
    except ValueError as exc:
        raise bad(f"the header is not valid JSON: {json_error(exc)}") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    data_len = size - 8 - n
    spans, entries = [], {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad(f"__metadata__ must map names to strings, got {show(entry)}")
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {show(name)} is described by {show(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            raise bad(f"tensor {show(name)} has unknown dtype {show(dtype)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {show(name)} has shape {show(shape)}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {show(name)} has data_offsets {show(offsets)}, not [begin, end] with "
                      "0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise bad(f"tensor {show(name)} ends at byte {end} of a {data_len}-byte data section")
        elements = 0 if 0 in shape else 1
        for d in shape:  # stops once past what the file could hold: a shape of huge dims stays cheap
            if elements > 8 * data_len:
                break
            elements *= d
        bits = elements * SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise bad(f"tensor {show(name)} is {dtype} {show(shape)} but its data_offsets span {end - begin} "
                      "bytes, not the size of that")
        spans.append((begin, end, name))
        entries[name] = (dtype, tuple(shape), begin, end)
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise bad(f"tensors {show(prev)} and {show(name)} overlap")
        if begin > pos:
            raise bad(f"{begin - pos} unclaimed bytes before tensor {show(name)}")
        pos, prev = end, name
    if pos != data_len:
        raise bad(f"{data_len - pos} bytes after the last tensor's data")
    return entries, 8 + n
