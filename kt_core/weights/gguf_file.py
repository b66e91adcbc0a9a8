"""Opening GGUF files (llama.cpp's format).

``open_gguf(path)`` takes one file or any part of a split set (``NAME-00001-of-00003.gguf``)
and returns the parts, each a :class:`GGUFPart`. ``gguf_header`` parses the header (metadata,
tensor names, types, shapes, offsets) from the format's definition (the ``gguf`` package's reader
took ~6 s on a 152k-token vocabulary; the quantization types stay the package's); every read is
bounds-checked first, so a truncated or corrupt file fails with the file and the byte offset (a
one-line ``KtError``), never with a numpy error or a crash. Tensor bytes are then read with plain file
reads (``GGUFPart.read``), not through the map: pages of a map stay in the process's RSS until it
closes, so a file read through it would sit in memory beside the weights made from it.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kt_core.errors import KtError

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise KtError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


@dataclass
class GGUFPart:
    """One mapped GGUF file: its metadata (key -> Python value, read on demand) and tensors."""

    path: Path
    reader: Any
    _fh: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes at ``offset`` into a fresh uint8 tensor (a plain read, see the module doc)."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            try:
                if self._fh is None:
                    self._fh = open(self.path, "rb")  # noqa: SIM115 (kept open; close() ends it)
                self._fh.seek(offset)
                got = self._fh.readinto(memoryview(buf.numpy())) if nbytes else 0
            except OSError as exc:
                raise KtError(f"{self.path.name} could not be read at offset {offset} "
                              f"({exc.strerror or exc}); check the file") from None
        if got != nbytes:
            raise KtError(f"{self.path.name} ends after {offset + got} bytes, inside a tensor at offset {offset} "
                          f"({nbytes} bytes): it is truncated, download it again")
        return buf

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:  # a field whose parts do not decode (corrupt string, bad type)
            raise KtError(f"{self.path.name}: metadata {key} at byte {field.offset} does not decode "
                          f"({type(exc).__name__}: {exc}); the file is corrupt: download it again") from None

    def keys(self) -> list[str]:
        return list(self.reader.fields)


def _open_part(path: Path) -> GGUFPart:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise KtError(f"{path} could not be read ({exc.strerror or exc}); check the path") from None
    if size < 24:
        raise KtError(f"{path.name} is {size} bytes, too short for a GGUF header; download it again")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise KtError(f"{path} could not be read ({exc.strerror or exc}); check the path and its permissions") from None
    if magic != b"GGUF":
        raise KtError(f"{path.name} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                      "model.path takes a .gguf file or a Hugging Face model folder")
    from kt_core.weights import gguf_header

    gguf_module()  # the quantization types are the gguf package's
    try:
        reader = gguf_header.Header(*gguf_header.parse(path))
    except gguf_header.OutOfFile as exc:
        raise KtError(f"{path.name} is truncated or corrupt: a read of {exc.need} bytes at offset {exc.offset} "
                      f"runs past the end of the {exc.size}-byte file; download it again") from None
    except gguf_header.BadHeader as exc:
        if "big-endian" in str(exc):  # the tensors would decode as little-endian numbers
            raise KtError(f"{path.name} is a big-endian GGUF; kt-core reads little-endian files: convert it again "
                          "without --bigendian") from None
        raise KtError(f"{path.name} is not a GGUF file kt-core can read ({exc}); download it again or re-convert "
                      "it") from None
    except OSError as exc:
        raise KtError(f"{path} could not be read ({exc.strerror or exc}); check the path and its permissions") from None
    except (RecursionError, MemoryError, OverflowError, ValueError) as exc:  # a header too large to be real
        raise KtError(f"{path.name} is not a GGUF file kt-core can read ({type(exc).__name__} in its header); "
                      "download it again or re-convert it") from None
    return GGUFPart(path, reader)


def split_paths(path: Path) -> list[Path]:
    """All parts of a split GGUF (given any one of them), in order; ``[path]`` for a single file."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    if count < 1:
        raise KtError(f"{path.name}: a split GGUF name says 'of {m.group('count')}'; rename the file")
    parts = [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise KtError(f"{path.name} is part of a {count}-file split GGUF but {', '.join(missing[:3])} "
                      f"{'is' if len(missing) == 1 else 'are'} missing; download every part into "
                      f"{path.parent}")
    return parts


def open_gguf(path: str | Path) -> list[GGUFPart]:
    """The parts of a GGUF model file (split sets joined); checked to belong together."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KtError(f"GGUF file not found: {path}")
    parts = [_open_part(p) for p in split_paths(path)]
    if len(parts) > 1:
        for i, part in enumerate(parts):
            no, count = part.value("split.no"), part.value("split.count")
            if no is not None and not (isinstance(no, int) and isinstance(count, int)):
                raise KtError(f"{part.path.name}: split.no / split.count are {no!r} / {count!r}, not integers; the "
                              "file is damaged")
            if no is not None and (no != i or count != len(parts)):
                raise KtError(f"{part.path.name} says it is part {no + 1} of {count}, but its name makes it part "
                              f"{i + 1} of {len(parts)}; the split files do not belong together")
    return parts
