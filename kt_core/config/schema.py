"""Structured-config schema of every Hydra group; registered in Hydra's ConfigStore.

The root ``KtConfig`` types every group, so a misspelled key or a wrong type
fails at compose time naming the key. Each group's dataclass is also stored
under ``schema/<group>`` so a vendor package can extend or reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def choice(v) -> str:
    """The plain string of a config value that the schema types as an Enum."""
    return v.value if isinstance(v, Enum) else str(v)


class ExpertStrategy(str, Enum):
    uniform = "uniform"  # the same number of experts per layer on each accelerator
    front_loading = "front_loading"  # fill accelerators from the first MoE layer on
    frequency = "frequency"  # most-activated experts first (needs stats_file)
    auto = "auto"  # fill free memory minus reserve, most-used first when stats exist
    explicit = "explicit"  # the per-layer lists in ``layers``


class WeightFormat(str, Enum):
    none = "none"  # weights stay in model.dtype
    int8 = "int8"  # per-channel symmetric, weight-only
    int4 = "int4"  # group-wise (quant.group_size; 0 = one group a row), symmetric or not
    fp8 = "fp8"  # float8 e4m3, a scale per (row, group_size inputs); 0 = per channel
    w8a8 = "w8a8"  # int8 weights and int8 activations quantized per token at run time


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class DeviceConfig:
    """One device kind the run uses. Keyed by a name under ``device`` (cpu, cuda, ...)."""

    backend: str = MISSING  # registry name of the plugin
    count: Optional[int] = None  # devices of this kind to use; null = all visible (1 if absent)
    memory_gb: Optional[float] = None  # budget per device; null = its free memory at start
    reserve_gb: float = 1.0  # kept free on each device for the runtime and fragmentation
    threads: Optional[int] = None  # cpu: worker threads; null = physical cores
    visible: Optional[str] = None  # device ids to expose, e.g. "0,2" (sets the plugin's env var)
    bandwidth_gbps: Optional[float] = None  # memory bandwidth for plan estimates; null = kind default
    tflops: Optional[float] = None  # dense bf16 compute for plan estimates; null = kind default


@dataclass
class ExpertPolicyConfig:
    strategy: ExpertStrategy = ExpertStrategy.auto
    per_device: Optional[int] = None  # experts per MoE layer on each accelerator; null = fill
    fraction: Optional[float] = None  # or this share of each layer's experts per accelerator (0..1)
    stats_file: Optional[str] = None  # routing statistics for ``frequency`` / ``auto``
    layers: Dict[int, List[int]] = field(default_factory=dict)  # explicit: layer -> expert ids


@dataclass
class TopologyConfig:
    """Who does what. Device references: ``accel`` (all accelerators, layers split evenly),
    ``accel:N`` (the N-th accelerator device), ``cpu``, or a device name / ``name:N``."""

    name: str = MISSING
    description: str = ""
    attention: List[str] = field(default_factory=lambda: ["cpu"])
    dense: List[str] = field(default_factory=lambda: ["cpu"])
    experts: List[str] = field(default_factory=lambda: ["cpu"])  # priority order; last takes the rest
    min_accelerators: int = 0
    expert_policy: ExpertPolicyConfig = field(default_factory=ExpertPolicyConfig)
    deferred_experts: int = 0  # routes per token that finish on CPU one layer later


@dataclass
class ModelConfig:
    name: str = MISSING
    path: Optional[str] = None  # HF-format folder; null = the embedded synthetic default
    dtype: DType = DType.bfloat16
    max_seq_len: int = 4096
    allow_bin_weights: bool = False  # .bin checkpoints (loaded with weights_only=True) only if set
    hf_config: Optional[Dict[str, Any]] = None  # a config.json copy: plan a model without its files


@dataclass
class QuantConfig:
    name: str = MISSING
    experts: WeightFormat = WeightFormat.none
    dense: WeightFormat = WeightFormat.none
    # the output head (lm_head) when it is not tied to the embedding; null = as quant.dense.
    # llama.cpp keeps it at 6-8 bits in its 4-bit files: quant.head=int8 is that choice here
    head: Optional[WeightFormat] = None
    # the token embedding (a lookup table); null = model.dtype. int8: int8 rows in groups of
    # quant.int8_group_size (32 when that is 0), each looked-up row dequantized, as GGUF's Q8_0 token_embd
    embed: Optional[WeightFormat] = None
    # the experts' down projection; null = as quant.experts (llama.cpp's Q4_K_M keeps many at 6 bits:
    # quant=int4 quant.experts_down=int8 is that choice here)
    experts_down: Optional[WeightFormat] = None
    # int4 / fp8 group along the input dim; 0 = one scale (and zero point) per row: int4 as kt-kernel's
    # AMXInt4 keeps it, the fastest int4 on AMX and the least accurate (native CPU kernels: rows of up
    # to 4096 inputs)
    group_size: int = 128
    # int8 (weight-only): inputs per scale, a multiple of 4 up to 256 (32 = llama.cpp's Q8_0);
    # 0 = one scale per output row
    int8_group_size: int = 0
    symmetric: bool = True
    # `kt quantize` output to load the experts from; null = <model.path>/kt-experts-<tag>.ktq when present
    prepacked: Optional[str] = None


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = "KT_API_KEY"  # name of the env var holding the key; never the key itself
    max_queue: int = 64  # waiting requests beyond this get 429
    max_batch: int = 16  # sequences in the running batch (also sizes the KV cache unless plan.kv_tokens)
    request_timeout_s: float = 600.0
    shutdown_grace_s: float = 10.0  # on Ctrl+C / SIGTERM running requests get this long to finish
    model_id: Optional[str] = None  # the name clients send as "model"; null = model.name, or the folder's name
    prefix_cache: bool = True
    prefix_host_gb: float = 2.0  # host-RAM tier for prefix blocks pushed out of the KV cache
    prefix_disk_dir: Optional[str] = None  # disk tier folder; null = <kt cache dir>/prefix-cache
    prefix_disk_gb: float = 10.0  # 0 disables the disk tier


@dataclass
class GenerateConfig:
    """Sampling settings of ``kt run`` / ``kt chat`` (the server takes them per request)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    chat: bool = False  # kt run: wrap the prompt in the model's chat template


class PlanFormat(str, Enum):
    table = "table"
    json = "json"


@dataclass
class PlanConfig:
    """``kt plan`` settings: output format and what the KV cache must hold."""

    format: PlanFormat = PlanFormat.table
    kv_tokens: Optional[int] = None  # tokens of KV cache to reserve; null = model.max_seq_len x batch
    batch: int = 1  # concurrent sequences the KV budget is sized for
    context_tokens: int = 1024  # context length the decode estimate assumes
    prefill_chunk: int = 512  # tokens per prefill step (sizes activations)


@dataclass
class ProfileConfig:
    """``kt profile``: prompts to route, where to write the statistics."""

    prompts: Optional[str] = None  # text file, one prompt per line (or .jsonl with "prompt"); null = built-in
    out: str = "routing_stats.json"
    max_new_tokens: int = 0  # also route this many generated tokens per prompt


@dataclass
class LoraConfig:
    """A LoRA adapter (PEFT format: adapter_config.json + adapter_model.safetensors) merged into the
    base weights at load: ``kt run lora.path=DIR``."""

    path: Optional[str] = None


@dataclass
class TrainLoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on each adapter's input while training (PEFT's lora_dropout)
    targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    """``kt sft``: LoRA fine-tuning (the ``train/`` group: sft)."""

    name: str = "sft"
    data: Optional[str] = None  # JSON lines: {"messages": [...]} or alpaca's {"instruction", "input", "output"}
    output: Optional[str] = None  # the adapter folder written (PEFT format)
    max_steps: int = 100
    lr: float = 2e-4
    batch: int = 1  # examples per optimizer step (gradients accumulated one example at a time)
    packing: bool = False  # a step's examples as sequences of one forward pass (faster; holds them all at once)
    max_seq_len: int = 2048  # an example over this many tokens is an error naming its line
    seed: int = 0
    log_every: int = 10
    init: Optional[str] = None  # an adapter folder to start from (its r / alpha win)
    beta: float = 0.1  # DPO: the strength of the preference (kt dpo)
    label_smoothing: float = 0.0  # DPO: the assumed share of flipped preference labels
    # activation checkpointing, each layer recomputed in the backward pass; null (auto): on when the
    # activations might take over a quarter of the free RAM, or the attention runs on an accelerator
    checkpoint_layers: Optional[bool] = None
    save_every: int = 50  # steps between checkpoints (<output>.ckpt: adapters, optimizer, data position, RNG)
    resume: bool = False  # continue from <output>.ckpt: the same loss curve as an uninterrupted run
    lora: TrainLoraConfig = field(default_factory=TrainLoraConfig)


@dataclass
class KtConfig:
    device: Dict[str, DeviceConfig] = field(default_factory=dict)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompt: Optional[str] = None  # kt run: the text to continue


GROUP_SCHEMAS = {
    "device": DeviceConfig,
    "topology": TopologyConfig,
    "model": ModelConfig,
    "quant": QuantConfig,
    "server": ServerConfig,
    "generate": GenerateConfig,
    "plan": PlanConfig,
    "profile": ProfileConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="kt_schema", node=KtConfig)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=group, node=node)
