"""A kt-core model with trainable LoRA adapters on its linears, for fine-tuning (``kt sft``).

The model is loaded as for inference, on a torch-autograd backend (every op differentiable), and the
weights of the targeted linears are wrapped as ``LoraWeight``: ``x W^T + s (x A^T) B^T`` with A, B
float32 parameters (the frozen base stays in its dtype). Targets are module names as PEFT writes them
(``q_proj``, ``kv_a_proj_with_mqa``, ``gate_proj``, ...); the adapters save in PEFT's format, so
``peft.PeftModel.from_pretrained`` and ``kt run lora.path=...`` both read them.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from kt_core.backend.torch_backend import TorchBackend
from kt_core.backend.types import ProbeResult
from kt_core.errors import KtError
from kt_core.models.layers import Attention, DenseMLP, MLAttention, MoEBlock
from kt_core.models.names import moe_names
from kt_core.weights.lora import PREFIX, LoraWeight
from kt_core.weights.quant import ExpertWeights

# kt-core's attention weight keys -> the module names checkpoints (and PEFT) use
ATTENTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
MLA = {"q": "q_proj", "q_a": "q_a_proj", "q_b": "q_b_proj", "kv_a": "kv_a_proj_with_mqa", "kv_b": "kv_b_proj",
       "o": "o_proj"}
MLP = ("gate_proj", "up_proj", "down_proj")


class AutogradBackend(TorchBackend):
    """The reference torch ops, which autograd differentiates; on the CPU, rmsnorm, rope, causal attention's
    backward and (with ``native_experts``) the frozen experts run on the native kernels with their own
    backward passes."""

    name = "autograd"
    device_type = "cpu"
    fuse_projections = False  # each linear stays its own weight: LoRA adapts them one by one

    def __init__(self, native_experts: bool = False, device_type: str = "cpu") -> None:
        """``native_experts``: frozen routed experts run on the native CPU kernels (forward and
        backward, ``train/native_experts.py``) in the formats they take; else the torch reference,
        which LoRA on the experts needs. ``device_type``: the torch device the ops run on (a
        hybrid topology's accelerator: ``train/placement.py``)."""
        super().__init__()
        self.native_experts = native_experts and device_type == "cpu"
        self.device_type = device_type

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("cpu") if self.device_type == "cpu" else torch.device(self.device_type, index)

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(True, "torch autograd on the CPU")

    def prepare_experts(self, experts, index: int = 0):
        if self.native_experts:
            from kt_core.train import native_experts

            packed = native_experts.pack(experts)
            if packed is not None:
                packed.pool = index  # the logical CPU device's worker pool (hybrid_cpu: cpu:1)
                return packed
        return super().prepare_experts(experts, index)

    def rmsnorm(self, x, weight, eps):
        if self.device_type == "cpu":  # the native kernels, forward and backward (train/native_norm_rope.py)
            from kt_core.train import native_norm_rope

            out = native_norm_rope.rmsnorm(x, weight, eps)
            if out is not None:
                return out
        return super().rmsnorm(x, weight, eps)

    def rope(self, q, k, positions, cos_sin, interleaved=False):
        if self.device_type == "cpu":
            from kt_core.train import native_norm_rope

            out = native_norm_rope.rope(q, k, positions, cos_sin, interleaved)
            if out is not None:
                return out
        return super().rope(q, k, positions, cos_sin, interleaved)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        super().write_kv(k, v, k_cache, v_cache, slot_mapping)
        # what attention_prefill may read in place of the cache (same values: the same dtype)
        same = v is not None and v_cache is not None and k.dtype == k_cache.dtype and v.dtype == v_cache.dtype
        self._written = (k_cache, v_cache, k, v) if same else None

    def attention_decode(self, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window=None,
                         sinks=None, chunk=None):
        self._written = None  # (what write_kv kept is for a prefill only)
        return super().attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, sinks,
                                        chunk)

    def attention_prefill(self, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                          causal=True, sliding_window=None, sinks=None, chunk=None):
        from kt_core.backend.torch_ops import attention
        from kt_core.train import native_attention  # causal attention's backward on the tiles

        written, self._written = getattr(self, "_written", None), None
        fresh = written[2:] if written is not None and written[0] is k_cache and written[1] is v_cache else None
        attend_fn = native_attention.attend if self.device_type == "cpu" else None
        return attention.attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                           causal, sliding_window, sinks, chunk, attend_fn=attend_fn, fresh_kv=fresh)

    def moe_experts(self, hidden, topk_ids, topk_weights, experts, activation="silu"):
        from kt_core.train import native_experts

        if isinstance(experts, native_experts.AdaptedExperts):  # LoRA on the packed experts
            return native_experts.moe_experts_adapted(hidden, topk_ids, topk_weights, experts, activation)
        if not isinstance(experts, ExpertWeights):  # packed by prepare_experts
            return native_experts.moe_experts(hidden, topk_ids, topk_weights, experts, activation)
        return super().moe_experts(hidden, topk_ids, topk_weights, experts, activation)


def linear_slots(model) -> dict[str, tuple[object, str]]:
    """Every linear a LoRA adapter can target: module name -> (its holder, the key or attribute)."""
    out: dict[str, tuple[object, str]] = {}
    names = moe_names(model.spec.family)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn = layer.attn
        if isinstance(attn, (Attention, MLAttention)):
            table = MLA if isinstance(attn, MLAttention) else ATTENTION
            for key, module in table.items():
                if key in attn.w:
                    out[f"{p}self_attn.{module}"] = (attn.w, key)
        mlps = []
        if isinstance(layer.ffn, DenseMLP):
            mlps.append((names.dense_prefix(p), layer.ffn))
        elif isinstance(layer.ffn, MoEBlock) and layer.ffn.shared is not None:
            mlps.append((names.shared_prefix(p), layer.ffn.shared))
        for prefix, mlp in mlps:
            for attr, module in zip(("gate", "up", "down"), MLP):
                out[prefix + module] = (mlp, attr)
    return out


def _get(holder, key):
    return holder[key] if isinstance(holder, dict) else getattr(holder, key)


def _set(holder, key, value) -> None:
    if isinstance(holder, dict):
        holder[key] = value
    else:
        setattr(holder, key, value)


class LoraModel:
    def __init__(self, model, targets: list[str], r: int, alpha: float, init: Optional[Path] = None,
                 seed: int = 0, dropout: float = 0.0) -> None:
        """``targets``: module name endings (``q_proj``...); ``init``: a PEFT adapter folder to start from
        (its r / alpha win), else PEFT's initialisation (A Kaiming-uniform, B zero); ``dropout``: PEFT's
        lora_dropout on the adapters' inputs while training."""
        from kt_core.runtime.heap import keep_freed_memory
        from kt_core.train import expert_lora

        keep_freed_memory()  # each step's tensors on the pages the last step freed, not fresh ones
        if not 0.0 <= dropout < 1.0:
            raise KtError(f"train.lora.dropout={dropout} must be in [0, 1)")
        if dropout and set(targets) & set(expert_lora.TARGETS):
            raise KtError("train.lora.dropout applies to module adapters; the routed experts' adapters take none (as "
                          "PEFT's target_parameters): set train.lora.dropout=0 or drop the experts.* targets")
        if dropout and "kv_b_proj" in targets:
            raise KtError("train.lora.dropout cannot apply to kv_b_proj, whose update is absorbed into MLA's "
                          "attention weights: drop kv_b_proj from train.lora.targets or set train.lora.dropout=0")
        self.model, self.r, self.alpha, self.dropout, self.rslora = model, r, alpha, float(dropout), False
        slots = linear_slots(model)
        chosen = {m: s for m, s in slots.items() if m.rsplit(".", 1)[-1] in targets}
        missing = sorted(set(targets) - {m.rsplit(".", 1)[-1] for m in chosen} - set(expert_lora.TARGETS))
        if missing:
            kinds = sorted({m.rsplit(".", 1)[-1] for m in slots})
            raise KtError(f"train.lora.targets {missing} name no linear of {model.spec.arch}; it has {kinds}, and "
                          f"the routed experts: {', '.join(expert_lora.TARGETS)}")
        pairs, fused = {}, {}
        if init is not None:
            from kt_core.weights.lora import Adapter
            from kt_core.weights.lora_experts import stacked

            adapter = Adapter(init)
            self.r, self.alpha = adapter.r, adapter.config["lora_alpha"]
            self.rslora = bool(adapter.config.get("use_rslora", False))  # its scale alpha / sqrt(r), kept
            pairs = adapter.pairs
            foreign = sorted(name[:-len(".weight")] for name in pairs
                             if name.endswith(".weight") and name[:-len(".weight")] not in chosen)
            if foreign:
                raise KtError(f"train.init={init} adapts {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                              f"which this model's train.lora.targets do not name (or it lacks): it was made for "
                              f"another base model ({adapter.base_model or 'not recorded'}) or other targets")
            fused = stacked(adapter.expert_lora, model.spec, init) if adapter.expert_lora else {}
            dropped = sorted({param for _, param in fused} - {expert_lora.TARGETS[t] for t in targets
                                                              if t in expert_lora.TARGETS})
            if dropped:
                raise KtError(f"train.init={init} adapts the routed experts' {', '.join(dropped)}, which "
                              f"train.lora.targets does not name: add experts.{dropped[0]} to the targets")
        scaling = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
        g = torch.Generator().manual_seed(seed)
        self.modules: dict[str, LoraWeight] = {}
        for module, (holder, key) in sorted(chosen.items()):
            base = _get(holder, key)
            out_f, in_f = base.shape
            if module + ".weight" in pairs:
                a, b = (t.float().clone() for t in pairs[module + ".weight"])
                if tuple(a.shape) != (self.r, in_f) or tuple(b.shape) != (out_f, self.r):
                    raise KtError(f"train.init={init}: {module}'s A / B are {tuple(a.shape)} / {tuple(b.shape)}, but "
                                  f"this model's weight is {tuple(base.shape)}: it was made for another base model")
            else:
                bound = 1 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)), as torch.nn.Linear and peft
                a = (torch.rand(self.r, in_f, generator=g) * 2 - 1) * bound
                b = torch.zeros(out_f, self.r)
            device = base.device if isinstance(base, torch.Tensor) else base.qdata.device  # the layer's device
            lw = LoraWeight(base, a.to(device).requires_grad_(), b.to(device).requires_grad_(), scaling,
                            self.dropout)
            _set(holder, key, lw)
            self.modules[module] = lw
        self.experts = expert_lora.attach(model, targets, self.r, scaling, fused, g) \
            if set(targets) & set(expert_lora.TARGETS) else {}
        self.targets = sorted(set(targets) - set(expert_lora.TARGETS))
        self.expert_targets = sorted({f"{p.rsplit('.experts', 1)[0].split('.', 3)[-1]}.experts.{param}"
                                      for p, param in self.experts})

    @contextmanager
    def disabled(self):
        """The base model alone while inside (DPO's reference): every adapter's scale is 0."""
        held = [*self.modules.values(), *self.experts.values()]
        scales = [x.scaling for x in held]
        try:
            for x in held:
                x.scaling = 0.0
            yield self
        finally:
            for x, scale in zip(held, scales):
                x.scaling = scale

    def parameters(self) -> list[torch.Tensor]:
        return [t for lw in [*self.modules.values(), *self.experts.values()] for t in (lw.a, lw.b)]

    def state(self) -> dict[str, torch.Tensor]:
        """PEFT's tensor names -> the adapter's matrices."""
        out = {}
        for module, lw in self.modules.items():
            out[f"{PREFIX}{module}.lora_A.weight"] = lw.a.detach().cpu().contiguous()
            out[f"{PREFIX}{module}.lora_B.weight"] = lw.b.detach().cpu().contiguous()
        from kt_core.train import expert_lora

        out.update(expert_lora.state(self.experts, PREFIX))
        return out

    def save(self, folder: Path, base_model: str) -> Path:
        """Write a PEFT LoRA adapter folder (written beside, flushed, then renamed into place:
        runtime/folder_swap.py; an adapter already there is replaced, any other folder refused:
        ``check_output``)."""
        from safetensors.torch import save_file

        from kt_core.runtime.folder_swap import partial_of, swap_in

        folder = check_output(folder, base_model)
        tmp = partial_of(folder)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                  "lora_dropout": self.dropout, "target_modules": self.targets, "base_model_name_or_path": base_model,
                  "bias": "none", "fan_in_fan_out": False, "use_rslora": self.rslora, "use_dora": False,
                  "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
                  "rank_pattern": {}, "alpha_pattern": {}}
        if self.expert_targets:  # LoRA on the routed experts: PEFT's adapters on fused parameters
            config["target_parameters"] = self.expert_targets
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(self.state(), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        return swap_in(tmp, folder)


ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md"})


def check_output(folder, model_path=None) -> Path:
    """``folder`` as an adapter's destination: a new or empty folder, or an adapter folder (its files
    only: ADAPTER_FILES), which is replaced; never the model's own folder or one holding other files,
    which saving would delete."""
    folder = Path(folder).expanduser()
    if not folder.resolve().name:
        raise KtError(f"train.output={folder} names no folder (the root or '.'); give a new folder's path")
    model = Path(str(model_path)).expanduser() if model_path is not None else None
    if model is not None and model.exists() and folder.resolve() == model.resolve():
        raise KtError(f"train.output={folder} is the model's own folder; give a new folder for the adapter")
    if folder.exists():
        if not folder.is_dir():
            raise KtError(f"train.output={folder} is a file; give a folder for the adapter")
        other = sorted(p.name for p in folder.iterdir() if p.name not in ADAPTER_FILES)
        if other:
            raise KtError(f"train.output={folder} holds files that are not a LoRA adapter ({', '.join(other[:3])}"
                          f"{', ...' if len(other) > 3 else ''}), which writing the adapter would delete; pick a new "
                          "folder or empty it")
    return folder
