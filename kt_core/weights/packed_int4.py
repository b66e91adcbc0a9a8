"""compressed-tensors' "pack-quantized" int4 weights (Kimi-K2-Thinking / K2.5's routed experts), kept.

A checkpoint whose config.json has ``quantization_config`` with ``quant_method: compressed-tensors``,
``format: pack-quantized`` and 4-bit symmetric integer weights in groups stores each quantized linear
``NAME.weight`` as three tensors:

- ``NAME.weight_packed``: int32 ``[out, in / 8]``; input j of a row is bits ``4 * (j % 8)`` ..
  ``4 * (j % 8) + 3`` of word ``j // 8``, holding ``q + 8`` for the signed value q in [-8, 7];
- ``NAME.weight_scale``: ``[out, in / group]`` (bf16 or float), one scale per group of inputs;
- ``NAME.weight_shape``: int ``[2]``, the weight's ``(out, in)``; the weight is ``q * scale``.

On a little-endian machine the words' bytes are kt-core's own int4 layout (two codes a byte, the even
input in the low nibble, codes biased by 8, symmetric groups), so the weight is kept as kt-core int4
exactly, with no repacking. Every size is checked against the config's shape before it is used.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kt_core.errors import KtError

if TYPE_CHECKING:  # torch loads on first use: kt plan reads the scheme and names without it
    import torch

    from kt_core.weights.quant import QuantizedWeight

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


@dataclass(frozen=True)
class PackScheme:
    group_size: int


def scheme(config: dict) -> Optional[PackScheme]:
    """The pack-quantized int4 scheme config.json declares, None when it declares no compressed-tensors
    quantization, or a KtError naming what is not supported."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    groups = qc.get("config_groups")
    fmt = qc.get("format")
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    w = weights[0] if len(weights) == 1 and isinstance(weights[0], dict) else None
    ok = (fmt == "pack-quantized" and w is not None and w.get("num_bits") == 4 and w.get("type") == "int"
          and w.get("symmetric") is True and w.get("strategy") == "group" and type(w.get("group_size")) is int
          and w["group_size"] > 0 and w["group_size"] % 2 == 0)
    if not ok:
        raise KtError(f"config.json: compressed-tensors quantization {fmt!r} with weights "
                      f"{ {k: w.get(k) for k in ('num_bits', 'type', 'symmetric', 'strategy', 'group_size')} if w else w }"
                      " is not supported (kt-core reads pack-quantized 4-bit symmetric int weights in groups, as "
                      "Kimi-K2.5 ships them); dequantize the checkpoint to bf16 first")
    if sys.byteorder != "little":
        raise KtError("pack-quantized int4 checkpoints are read on little-endian machines only")
    return PackScheme(int(w["group_size"]))


def to_quantized(name: str, packed: "torch.Tensor", scale: "torch.Tensor", shape_t: "torch.Tensor", group: int,
                 shape) -> "QuantizedWeight":
    """``NAME.weight`` as kt-core int4 from its three stored tensors, every size checked first."""
    import torch

    from kt_core.weights.quant import Quant, QuantizedWeight
    out, inp = (int(shape[0]), int(shape[1])) if shape is not None else tuple(int(v) for v in shape_t.tolist())

    def bad(problem: str) -> KtError:
        return KtError(f"tensor {name}: {problem}; the pack-quantized checkpoint is corrupt or does not match "
                       "config.json (download it again)")

    if shape_t.numel() != 2 or [int(v) for v in shape_t.tolist()] != [out, inp]:
        raise bad(f"weight_shape is {shape_t.tolist()}, config.json implies {[out, inp]}")
    if inp % 8 or inp % group:
        raise bad(f"{inp} inputs are not a multiple of 8 and of the group size {group}")
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out, inp // 8):
        raise bad(f"weight_packed is {packed.dtype} {tuple(packed.shape)}, expected int32 {(out, inp // 8)}")
    if not scale.is_floating_point() or tuple(scale.shape) != (out, inp // group):
        raise bad(f"weight_scale is {scale.dtype} {tuple(scale.shape)}, expected float {(out, inp // group)}")
    codes = packed.contiguous().view(torch.uint8)  # [out, inp / 2]: kt-core's int4 bytes, as they lie
    return QuantizedWeight(Quant.INT4, codes, scale.float().contiguous(), None, group, inp)


def packed_names(folder: Path) -> set[str]:
    """The ``NAME.weight`` of every pack-quantized weight in a model folder, from the safetensors index
    or the files' headers (no tensor read, no torch)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = list((json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}))
    else:
        names = []
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                names += [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
    return {n[: -len("_packed")] for n in names if n.endswith(".weight_packed")}


def plan_tensors(tensors: list, packed: set[str], group: int, keep: frozenset) -> list:
    """The planner's tensor list with the stored bytes of the pack-quantized weights a load keeps:
    half a byte a weight and a float32 scale a group."""
    return [replace(t, stored=t.numel // 2 + t.numel // group * 4) if t.name in packed and t.group in keep else t
            for t in tensors]
