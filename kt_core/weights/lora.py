"""LoRA adapters in PEFT's format, merged into the base weights as they are read.

A PEFT LoRA folder holds ``adapter_config.json`` (r, lora_alpha, use_rslora, target modules, the
base model's name) and ``adapter_model.safetensors`` with, per adapted linear ``MODULE``,
``base_model.model.MODULE.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``. The adapted
weight is ``W + s * B @ A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). ``Adapted``
wraps a checkpoint so every reader (dense, MLA's kv_b, experts, the planner) sees the merged
weights: nothing downstream changes, and an adapter costs nothing per token. A merged weight is
never kept in its file's quantization (a GGUF's blocks), so the merge is exact before any
``quant.*`` format applies.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Optional

import torch

from kt_core.errors import KtError
from kt_core.jsonfile import read_json
from kt_core.weights.checkpoint import read_into

PREFIX = "base_model.model."


class LoraWeight:
    """A linear's frozen base weight with a trainable low-rank update: ``x W^T + s (x A^T) B^T``
    (A [r, in], B [out, r], float32). The torch ops' ``linear`` computes it (fine-tuning), with
    ``dropout`` on the update's input while gradients are taken (PEFT's lora_dropout)."""

    def __init__(self, base, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0) -> None:
        self.base, self.a, self.b, self.scaling, self.dropout = base, a, b, float(scaling), float(dropout)

    @property
    def shape(self):
        return self.base.shape


class Adapter:
    def __init__(self, path) -> None:
        from kt_core.runtime.folder_swap import current

        self.path = current(Path(path).expanduser())  # kt sft's save cut between its renames: the one before
        if not (self.path / "adapter_config.json").is_file():
            raise KtError(f"lora.path={self.path} holds no adapter_config.json; point it at a PEFT LoRA adapter folder")
        cfg = read_json(self.path / "adapter_config.json", "adapter_config.json")
        self.config = cfg
        problems = []
        if cfg.get("peft_type") != "LORA":
            problems.append(f"peft_type {cfg.get('peft_type')!r} (only LORA)")
        for key in ("use_dora", "fan_in_fan_out"):
            if cfg.get(key):
                problems.append(f"{key}=true")
        if cfg.get("bias", "none") != "none":
            problems.append(f"bias={cfg.get('bias')!r} (only 'none')")
        if cfg.get("modules_to_save"):
            problems.append("modules_to_save (full copies of modules)")
        from kt_core.weights import lora_experts

        self.expert_order = lora_experts.targets(cfg.get("target_parameters"))  # LoRA on the routed experts
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            problems.append("per-module rank_pattern / alpha_pattern")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        if type(r) is not int or r < 1 or type(alpha) not in (int, float) or not math.isfinite(alpha):
            problems.append(f"r={r!r}, lora_alpha={alpha!r}")
        if problems:
            raise KtError(f"{self.path / 'adapter_config.json'}: kt-core does not read this adapter: "
                          f"{'; '.join(problems)}")
        self.r = r
        if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
            raise KtError(f"{self.path / 'adapter_config.json'}: use_rslora is {cfg['use_rslora']!r}; it must be true "
                          "or false")
        self.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        self.base_model = cfg.get("base_model_name_or_path")
        self.pairs = self._read_tensors()

    def _read_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """weight name (``MODULE.weight``) -> (A [r, in], B [out, r])."""
        from safetensors.torch import load_file

        f = self.path / "adapter_model.safetensors"
        if not f.is_file():
            raise KtError(f"{self.path} has no adapter_model.safetensors (a .bin adapter is not unpickled: save it "
                          "with safe_serialization=True)")
        try:
            tensors = load_file(str(f))
        except Exception as exc:  # a corrupt file: safetensors' own message
            raise KtError(f"{f} could not be read ({type(exc).__name__}: {exc}); save the adapter again") from None
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            if not name.startswith(PREFIX) or not name.endswith((".lora_A.weight", ".lora_B.weight")):
                raise KtError(f"{f}: tensor {name} is not a LoRA A / B matrix; kt-core reads plain LoRA adapters")
            module, which = name[len(PREFIX):].rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            modules.setdefault(module, {})[which] = t
        from kt_core.weights import lora_experts

        self.expert_lora = lora_experts.split(modules, self.expert_order, self.r, f) if self.expert_order else {}
        pairs = {}
        for weight, ab in ((m + ".weight", ab) for m, ab in modules.items()):
            a, b = ab.get("lora_A"), ab.get("lora_B")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.r or b.shape[1] != self.r:
                raise KtError(f"{f}: {weight[:-7]} has lora_A {None if a is None else tuple(a.shape)} and lora_B "
                              f"{None if b is None else tuple(b.shape)}, not [r={self.r}, in] and [out, r]")
            pairs[weight] = (a, b)
        if not pairs and not self.expert_lora:
            raise KtError(f"{f} holds no LoRA matrices")
        return pairs

    def fingerprint(self) -> str:
        h = hashlib.sha256((self.path / "adapter_config.json").read_bytes())
        h.update((self.path / "adapter_model.safetensors").read_bytes())
        return h.hexdigest()


class Adapted:
    """A checkpoint whose adapted weights read as ``W + s * B @ A``; everything else passes through."""

    def __init__(self, ck, adapter: Adapter) -> None:
        self.ck, self.adapter = ck, adapter
        self.pairs = dict(adapter.pairs)
        if adapter.expert_lora:  # LoRA on the routed experts: a pair per expert weight
            from kt_core.models.spec import parse_config
            from kt_core.weights import lora_experts

            self.pairs.update(lora_experts.per_expert(adapter.expert_lora, parse_config(ck.config),
                                                      adapter.path / "adapter_model.safetensors"))
        foreign = sorted(n for n in self.pairs if n not in ck)
        if foreign:
            raise KtError(f"the LoRA adapter in {adapter.path} adapts {foreign[0][:-7]}, which this model does not "
                          f"have: it was made for another base model ({adapter.base_model or 'not recorded'})")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ck, name)

    def __contains__(self, name: str) -> bool:
        return name in self.ck

    def get(self, name: str, shape=None, dtype=None) -> torch.Tensor:
        if name not in self.pairs:
            return self.ck.get(name, shape, dtype)
        w = self.ck.get(name, shape, torch.float32)
        a, b = self.pairs[name]
        if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(w.shape):
            raise KtError(f"the LoRA adapter in {self.adapter.path} adapts {name[:-7]} as {b.shape[0]} x {a.shape[1]}, "
                          f"but this model's weight is {tuple(w.shape)}: it was made for another base model "
                          f"({self.adapter.base_model or 'not recorded'})")
        w = w + self.adapter.scaling * (b.float() @ a.float())
        return w if dtype is None else w.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, shape) -> None:
        if name in self.pairs:
            out.copy_(self.get(name, shape, out.dtype))
        else:
            read_into(self.ck, name, out, shape)

    def read_rows(self, name: str, shape, r0: int, r1: int, dtype) -> Optional[torch.Tensor]:
        """The base's rows of a weight the adapter leaves alone; None for an adapted one (``get`` merges it
        whole) or where the base cannot (a loader then reads the weight whole)."""
        read = None if name in self.pairs else getattr(self.ck, "read_rows", None)
        return None if read is None else read(name, shape, r0, r1, dtype)

    def keeps(self, name: str) -> bool:
        return name not in self.pairs and hasattr(self.ck, "keeps") and self.ck.keeps(name)

    def quantized(self, name: str, shape=None):
        return None if name in self.pairs else self.ck.quantized(name, shape)

    def is_fp8(self, name: str) -> bool:
        return name not in self.pairs and hasattr(self.ck, "is_fp8") and self.ck.is_fp8(name)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.ck.fingerprint()}|lora:{self.adapter.fingerprint()}".encode()).hexdigest()
