"""DeepSeek-V4 as DeepSeek releases it, next to the names transformers writes.

- Names: ``embed.weight``, ``layers.N....``, ``norm.weight``, ``hc_head_fn`` / ``_base`` / ``_scale`` and
  ``head.weight`` (the multi-token-prediction ``mtp.*`` tensors are not read). The loader asks for
  ``model.embed_tokens.weight``, ``model.layers.N....``, ``model.hc_head.hc_fn``, ...
- Dense weights in FP8 (e4m3) whose block scales (``NAME.scale``) are UE8M0: one byte e, the scale 2^(e-127).
- Routed experts in FP4 (MXFP4): two e2m1 codes a byte (the first in the low nibble), ``[out, in / 2]``,
  and a UE8M0 scale per 32 inputs, ``[out, in / 32]``. An e2m1 code is a sign bit and one of the
  magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; twice that is an integer of at most 12, so a block is kept
  exactly as kt-core int8 with groups of 32 (codes x 2, scales / 2).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable, Optional

from kt_core.errors import KtError

if TYPE_CHECKING:  # torch loads on first use: kt plan reads this module without it
    import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MX_GROUP = 32
_GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
           "hc_head_scale": "model.hc_head.hc_scale"}
_LAYER = re.compile(r"^layers\.\d+\.")


def release_names(config: dict, stored: Iterable[str]) -> dict[str, str]:
    """{name the loader asks for: name in the file} for a DeepSeek-V4 release; {} for other folders."""
    stored = list(stored)
    if config.get("model_type") != "deepseek_v4" or "embed.weight" not in stored:
        return {}
    out = {}
    for n in stored:
        if n in _GLOBAL:
            out[_GLOBAL[n]] = n
        elif _LAYER.match(n):
            out["model." + n] = n
        elif n == "head.weight":
            out[n] = n
    return out


def e8m0(scales: torch.Tensor, name: str) -> torch.Tensor:
    """UE8M0 scale bytes (float8_e8m0fnu or uint8) as float32 powers of two."""
    import torch

    if scales.dtype not in (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8)):
        raise KtError(f"the scales of {name} are {scales.dtype}, not UE8M0 bytes; the checkpoint's "
                      "quantization is not DeepSeek-V4's: download it again")
    e = scales.view(torch.uint8).to(torch.int32)
    if bool((e == 255).any()):
        raise KtError(f"the scales of {name} hold NaN (0xFF); the checkpoint is damaged: download it again")
    return torch.ldexp(torch.ones(e.shape), e - 127)


def fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """e2m1 pairs [out, in / 2] (uint8 / int8 bytes) as int8 twice their value, [out, in]."""
    import torch

    b = packed.view(torch.uint8)
    nib = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2).to(torch.int64)
    table = torch.tensor([int(2 * v) for v in E2M1] + [-int(2 * v) for v in E2M1], dtype=torch.int8)
    return table[nib]


def is_mxfp4(weight_dtype: torch.dtype, weight_shape, scale_shape) -> bool:
    """Whether a weight and its ``.scale`` are stored as MXFP4 (bytes of two codes, a scale per 32)."""
    import torch

    return weight_dtype in (torch.uint8, torch.int8) and len(weight_shape) == 2 and len(scale_shape) == 2 and \
        scale_shape[0] == weight_shape[0] and scale_shape[1] * MX_GROUP == weight_shape[1] * 2


def mxfp4_as_int8(name: str, packed: torch.Tensor, scales: torch.Tensor, shape=None):
    """An MXFP4 weight as kt-core int8 with groups of 32 (exact)."""
    from kt_core.weights.quant import Quant, QuantizedWeight

    out, half = packed.shape
    if shape is not None and tuple(shape) != (out, 2 * half):
        raise KtError(f"tensor {name} holds FP4 codes of shape ({out}, {2 * half}) but config.json implies "
                      f"{tuple(shape)}; config.json and the weights do not belong together")
    return QuantizedWeight(Quant.INT8, fp4_codes(packed), e8m0(scales, name) * 0.5, None, MX_GROUP, 2 * half)


def scale_name(weight: str) -> Optional[str]:
    """``NAME.scale`` of a ``NAME.weight``: where DeepSeek-V4's release keeps its block scales."""
    return weight[: -len(".weight")] + ".scale" if weight.endswith(".weight") else None


def rename(ck) -> None:
    """Let a Checkpoint of a DeepSeek-V4 release answer to the loader's names."""
    names = release_names(ck.config, [*ck._where, *ck._bin])
    if names:
        ck._stored.update(names)
        ck._where = {k: ck._where[n] for k, n in names.items() if n in ck._where}
        ck._bin = {k: ck._bin[n] for k, n in names.items() if n in ck._bin}


def mxfp4_weights(ck) -> set[str]:
    """The Checkpoint's weights stored as MXFP4 (found from the file headers, nothing read)."""
    from kt_core.weights.safetensors_file import TORCH_DTYPES

    out = set()
    for n, f in ck._where.items():
        s = scale_name(n)
        if s is None or s not in ck._where:
            continue
        dtype, shape = ck._handle(f).entries[ck._stored.get(n, n)][:2]
        scale_shape = ck._handle(ck._where[s]).entries[ck._stored.get(s, s)][1]
        if dtype == "F4":  # safetensors' own 4-bit type: the shape counts codes, the bytes hold two
            dtype, shape = "U8", [*shape[:-1], shape[-1] // 2]
        if is_mxfp4(TORCH_DTYPES.get(dtype), shape, scale_shape):
            out.add(n)
    return out


def fp4_experts(config: dict) -> bool:
    """A release that declares its routed experts FP4 (config.json's expert_dtype)."""
    qc = config.get("quantization_config")
    return config.get("model_type") == "deepseek_v4" and "fp4" in (
        config.get("expert_dtype"), qc.get("expert_dtype") if isinstance(qc, dict) else None)


def plan_tensors(tensors: list, names, keep: frozenset) -> list:
    """The planner's tensors with the bytes of kept MXFP4 weights as int8 g32 (a byte a weight, a float32
    scale per 32); ``names``: those weights, or None for every routed expert (kt plan reads no header)."""
    def kept(t) -> bool:
        return t.group in keep and (t.name in names if names is not None else t.group == "experts")

    return [replace(t, stored=t.numel + t.numel // MX_GROUP * 4) if kept(t) else t for t in tensors]
