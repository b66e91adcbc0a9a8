"""One safetensors file read tensor by tensor with plain file reads, not a memory map.

Each tensor is read into memory of its own (``readinto`` a fresh buffer), so nothing of the file
stays mapped into the process: the pages the OS caches are not the process's RSS, and a weight
that is converted or packed at load leaves no second resident copy behind (with a map, every page
of every shard read stayed resident until the map closed). The header was checked before (see
``checkpoint.check_safetensors_header``, which hands over what this reads)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch

from kt_core.errors import KtError
from kt_core.jsonfile import brief, show

# safetensors dtype names -> torch dtypes this reader can return
TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                "F64": torch.float64}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                     ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)


class SafetensorsFile:
    """Tensors of one checked file: ``entries`` maps name -> (dtype, shape, begin, end) relative to
    the data section, which starts at byte ``data_start``."""

    def __init__(self, path: Path, entries: dict, data_start: int) -> None:
        self.path, self.entries, self.data_start = path, entries, data_start
        self._fh = None
        self._lock = threading.Lock()  # seek + read of one tensor at a time

    def keys(self) -> list[str]:
        return list(self.entries)

    def stored_dtype(self, name: str):
        """The torch dtype ``get_tensor`` returns for ``name`` (None: one it cannot read)."""
        dtype = self.entries[name][0]
        return torch.uint8 if dtype == "F4" else TORCH_DTYPES.get(dtype)

    def get_tensor(self, name: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor, read into fresh memory, or into ``out`` (a contiguous CPU tensor of its dtype
        and element count: a slot of a stacked tensor, a reused buffer) and returned reshaped."""
        dtype, shape, begin, end = self.entries[name]
        torch_dtype = torch.uint8 if dtype == "F4" else TORCH_DTYPES.get(dtype)  # F4: two codes a byte
        if dtype == "F4":
            shape = [*shape[:-1], shape[-1] // 2] if shape and shape[-1] % 2 == 0 else None
        if torch_dtype is None or shape is None:
            raise KtError(f"tensor {show(name)} in {self.path.name} is {dtype}, which kt-core cannot read; "
                          "convert the checkpoint to bf16")
        if out is not None:
            if (out.dtype != torch_dtype or not out.is_contiguous() or out.device.type != "cpu"
                    or out.numel() * out.element_size() != end - begin):
                raise ValueError(f"cannot read tensor {name} ({dtype}, {end - begin} bytes) into a {out.dtype} "
                                 f"tensor of {out.numel() * out.element_size()} bytes")
            buf = out.view(-1).view(torch.uint8)
        else:
            buf = torch.empty(end - begin, dtype=torch.uint8)
        self._read(name, begin, end, buf)
        return buf.view(torch_dtype).reshape(shape)

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the tensor (along its first dim), read alone into fresh memory: a large weight
        converted a block of rows at a time without the whole of it in memory."""
        dtype, shape, begin, end = self.entries[name]
        torch_dtype = TORCH_DTYPES.get(dtype)
        if torch_dtype is None or not shape or not 0 <= r0 <= r1 <= shape[0]:
            raise KtError(f"rows {r0}..{r1} of tensor {show(name)} in {self.path.name} ({dtype}, shape {shape}) "
                          "cannot be read")
        row = (end - begin) // shape[0] if shape[0] else 0
        buf = torch.empty((r1 - r0) * row, dtype=torch.uint8)
        self._read(name, begin + r0 * row, begin + r1 * row, buf)
        return buf.view(torch_dtype).reshape(r1 - r0, *shape[1:])

    def _read(self, name: str, begin: int, end: int, buf: torch.Tensor) -> None:
        """Bytes [begin, end) of the data section into ``buf`` (uint8, that many)."""
        with self._lock:
            try:
                if self._fh is None:
                    self._fh = open(self.path, "rb")  # noqa: SIM115 (kept open; close() ends it)
                self._fh.seek(self.data_start + begin)
                got = self._fh.readinto(memoryview(buf.numpy())) if end > begin else 0
            except OSError as exc:
                raise KtError(f"tensor {show(name)} in {self.path.name} could not be read "
                              f"({brief(exc.strerror or exc)}); check the file") from None
        if got != end - begin:  # the file shrank since its header was checked
            raise KtError(f"tensor {show(name)} in {self.path.name} could not be read (the file ends after "
                          f"{got} of its {end - begin} bytes); it is truncated: download it again")

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
