"""Where a fine-tuned model's parts live: the topology group, as at inference.

Attention, norms, dense MLPs, shared experts, the embedding and the LM head (and every LoRA adapter
on them) sit on the topology's attention device, run by the torch reference ops (which autograd
differentiates on any device: CUDA, ROCm, XPU, NPU or the CPU). The frozen routed experts sit in host
RAM on the CPU (the topology's last CPU expert device: ``hybrid_cpu``'s cpu:1, ``hybrid_1gpu``'s cpu),
on the native kernels forward and backward; hidden states and their gradients cross between the two
once per MoE layer, as at inference. Without a CPU among the expert devices (``single_gpu``) the
experts train where the attention does, on torch.

    kt sft model.path=DIR train.data=FILE train.output=OUT topology=hybrid_1gpu
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from kt_core.errors import KtError


@dataclass
class TrainPlacement:
    backend: object          # the attention device's autograd backend (the model's default)
    homes: Callable          # layer -> (backend, device index) of its attention / dense weights
    placer: Callable         # layer -> [(backend, device index, expert ids)]
    where: str               # one line for the log


def place(cfg, spec, native_experts: bool) -> TrainPlacement:
    from kt_core.backend.registry import registry
    from kt_core.config.validate import resolve_topology
    from kt_core.runtime.engine import apply_visible_devices, configure_cpu_threads
    from kt_core.train.lora_model import AutogradBackend

    topo = resolve_topology(cfg, check_devices=True)
    apply_visible_devices(cfg)
    configure_cpu_threads(cfg)
    attn = topo.roles["attention"][0]
    if len({s.label for s in topo.roles["attention"]}) > 1 or \
            {s.label for s in topo.roles["dense"]} != {s.label for s in topo.roles["attention"]}:
        raise KtError(f"kt sft trains with attention and dense layers on one device; topology "
                      f"{topo.name} spreads them over {sorted({s.label for s in topo.roles['attention']})} and "
                      f"{sorted({s.label for s in topo.roles['dense']})}: use topology=hybrid_1gpu or cpu_only")
    device_type = registry().get(attn.backend).device_type
    dense = AutogradBackend(device_type=device_type)
    cpus = [s for s in topo.roles["experts"] if s.is_cpu]
    host = cpus[-1] if cpus else None
    experts = AutogradBackend(native_experts, "cpu") if host is not None else dense
    index = host.index if host is not None else attn.index
    E = spec.moe.num_experts if spec.moe is not None else 0
    where = (f"attention and adapters on {attn.label}, the frozen experts on "
             f"{host.label if host is not None else attn.label}")
    return TrainPlacement(dense, lambda layer: (dense, attn.index), lambda layer: [(experts, index, list(range(E)))],
                          where)


def activation_bytes(spec, tokens: int) -> int:
    """An upper estimate of what the backward pass keeps of one forward of ``tokens`` tokens through
    every layer, without activation checkpointing: float32 throughout (a bf16 model keeps less), per
    token and layer the residual stream and norms (8 hidden), q / k / v before and after rope and the
    attention output (3 x all heads), and the MLP's inputs and gate / up outputs (3 x its width, top_k
    times for routed experts, whose gate / up outputs the native backward keeps). On the 2-layer
    benchmark model at 512 tokens it says 207 MB; its peak RSS is ~90 MB higher without checkpointing."""
    attn = 8 * spec.hidden_size + 3 * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    mlp = 3 * (spec.moe.top_k * spec.moe.intermediate + spec.moe.num_experts if spec.moe is not None
               else spec.intermediate_size)
    return 4 * tokens * spec.num_layers * (attn + mlp)


def checkpointing(setting: Optional[bool], spec, tokens: int, on_accelerator: bool,
                  available: int) -> tuple[bool, str]:
    """Whether to recompute each layer in the backward pass (train.checkpoint_layers), and why, for
    the log. ``None`` (auto): on when the attention sits on an accelerator (its memory is the scarce
    one) or ``activation_bytes`` exceeds a quarter of the ``available`` host RAM; off otherwise, since
    recomputing costs a second forward of every layer (the 2-layer benchmark model: ~0.8x tokens/s)."""
    if setting is not None:
        return bool(setting), f"train.checkpoint_layers={str(bool(setting)).lower()}"
    need = activation_bytes(spec, tokens)
    size = f"{need / 2**30:.1f} GB" if need >= 2**30 else f"{need / 2**20:.0f} MB"
    gb = f"~{size} of activations at {tokens} tokens, {available / 2**30:.1f} GB of RAM free"
    if on_accelerator:
        return True, "auto: on, the attention runs on an accelerator"
    if need > available // 4:
        return True, f"auto: on ({gb})"
    return False, f"auto: off ({gb}; train.checkpoint_layers=true to save that memory)"
