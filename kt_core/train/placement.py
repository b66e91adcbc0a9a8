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
from typing import Callable

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
