"""``ModelSpec``: everything the runtime needs from a Hugging Face ``config.json``.

One parser serves every supported architecture; the differences between
families are data (which router, which activation, shared experts, MLA, sinks,
sliding windows), not classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from kt_core.errors import KtError

if TYPE_CHECKING:  # torch loads on first use: kt plan reads specs without it
    import torch

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
}


@dataclass
class RopeSpec:
    theta: float
    rot_dim: int
    kind: str = "default"  # default | linear | llama3 | yarn | dynamic(as default)
    params: dict[str, Any] = field(default_factory=dict)
    interleaved: bool = False

    def inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [rot_dim/2], cos/sin scale), as the reference defines them."""
        import torch

        dim, base, p = self.rot_dim, self.theta, self.params
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if self.kind == "linear":
            return inv / float(p["factor"]), 1.0
        if self.kind == "llama3":
            factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old = float(p["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * scaled / factor + smooth * scaled
            is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
            return torch.where(is_mid, mid, scaled), 1.0
        if self.kind == "yarn":
            return _yarn(dim, base, p)
        return inv, 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, p: dict) -> tuple[torch.Tensor, float]:
    import torch

    factor = float(p["factor"])
    old = float(p["original_max_position_embeddings"])
    att = p.get("attention_factor")
    if att is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            att = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
        else:
            att = yarn_mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr(rot: float) -> float:
        return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = corr(fast), corr(slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return inv, float(att)


@dataclass
class MoESpec:
    num_experts: int
    top_k: int
    intermediate: int
    scoring: str = "softmax"  # softmax | sigmoid | softmax_topk
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_bias: bool = False  # DeepSeek-V3 e_score_correction_bias
    router_bias: bool = False  # GPT-OSS router has a bias
    expert_bias: bool = False  # GPT-OSS experts have biases
    activation: str = "silu"
    shared_intermediate: int = 0  # 0 = no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) scales the shared expert


@dataclass
class MLASpec:
    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass
class ModelSpec:
    arch: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope: RopeSpec
    max_positions: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sinks: bool = False
    sliding_window: Optional[int] = None
    layer_types: list[str] = field(default_factory=list)  # "full" | "sliding" per layer
    moe: Optional[MoESpec] = None
    moe_layers: frozenset[int] = frozenset()
    mla: Optional[MLASpec] = None
    softmax_scale: float = 0.0
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def window(self, layer: int) -> Optional[int]:
        if self.layer_types and self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None


def _rope_params(c: dict) -> tuple[float, str, dict]:
    p = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or {}
    if isinstance(scaling, dict):
        p = {**scaling, **p}
    theta = float(p.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = str(p.get("rope_type", p.get("type", "default")) or "default")
    if kind in ("dynamic", "default", "mrope"):
        kind = "default"
    if kind == "yarn" and "original_max_position_embeddings" not in p:
        p["original_max_position_embeddings"] = c.get("original_max_position_embeddings") or c.get(
            "max_position_embeddings", 4096)
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise KtError(f"rope scaling '{kind}' is not supported (supported: default, linear, llama3, yarn)")
    return theta, kind, p


def _eos(c: dict) -> tuple[int, ...]:
    e = c.get("eos_token_id")
    if e is None:
        return ()
    return tuple(e) if isinstance(e, list) else (int(e),)


# ---- config.json checks: a value of the wrong type or range is a one-line KtError naming the field,
# raised before any value is used (a layer count of 10**12 would otherwise build a set that large) ----
INT_MAX = 2**31 - 1
MAX_HEAD_DIM = 1 << 16  # rope tables are built per head dim at load
# integer fields: smallest, largest, whether null is allowed (null and 0 mean "the default" where the
# parser reads the field with ``or``). Layer and expert counts are capped far above any real model.
_INTS = {
    "vocab_size": (1, INT_MAX, False), "hidden_size": (1, INT_MAX, False), "num_hidden_layers": (1, 4096, False),
    "num_attention_heads": (1, INT_MAX, False), "num_key_value_heads": (0, INT_MAX, True),
    "head_dim": (0, MAX_HEAD_DIM, True), "intermediate_size": (0, INT_MAX, True),
    "max_position_embeddings": (1, INT_MAX, False), "original_max_position_embeddings": (1, INT_MAX, True),
    "sliding_window": (0, INT_MAX, True), "max_window_layers": (0, INT_MAX, False),
    "num_experts": (0, 65536, True), "num_local_experts": (0, 65536, True), "n_routed_experts": (0, 65536, True),
    "num_experts_per_tok": (1, 65536, False), "moe_intermediate_size": (1, INT_MAX, False),
    "shared_expert_intermediate_size": (0, INT_MAX, True), "decoder_sparse_step": (1, INT_MAX, False),
    "n_shared_experts": (0, 65536, True), "first_k_dense_replace": (0, INT_MAX, False),
    "n_group": (0, 65536, True), "topk_group": (0, 65536, True), "q_lora_rank": (1, INT_MAX, True),
    "kv_lora_rank": (1, INT_MAX, False), "qk_nope_head_dim": (1, MAX_HEAD_DIM, False),
    "qk_rope_head_dim": (1, MAX_HEAD_DIM, False), "v_head_dim": (1, MAX_HEAD_DIM, False),
    "bos_token_id": (0, INT_MAX, True),
}
# float fields: smallest, whether the smallest itself is excluded, largest, whether null is allowed
_FLOATS = {"rms_norm_eps": (0.0, False, math.inf, False), "rope_theta": (1.0, True, math.inf, False),
           "routed_scaling_factor": (0.0, True, math.inf, False)}
_ROPE_FLOATS = {"factor": (0.0, True, math.inf, False), "low_freq_factor": (0.0, True, math.inf, False),
                "high_freq_factor": (0.0, True, math.inf, False), "beta_fast": (0.0, False, math.inf, True),
                "beta_slow": (0.0, False, math.inf, True), "mscale": (0.0, False, math.inf, True),
                "mscale_all_dim": (0.0, False, math.inf, True), "attention_factor": (0.0, True, math.inf, True),
                "rope_theta": (1.0, True, math.inf, False), "partial_rotary_factor": (0.0, True, 1.0, False)}
_ROPE_NEEDS = {"linear": ("factor",), "yarn": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _show(value: Any) -> str:
    """A config value for a message: repr'd (one line), bounded in length and depth."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 40, 40, 3, 3, 2
    return r.repr(value)


def _invalid(key: str, value: Any, want: str) -> KtError:
    return KtError(f"config.json: {key}={_show(value)} is invalid ({want}); fix config.json or download it again")


def _check_int(key: str, v: Any, lo: int, hi: int, null_ok: bool) -> None:
    if v is None and null_ok:
        return
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if type(v) is not int or not lo <= v <= hi:
        raise _invalid(key, v, f"a whole number from {lo} to {hi}" + (" or null" if null_ok else ""))


def _check_float(key: str, v: Any, lo: float, lo_open: bool, hi: float, null_ok: bool) -> None:
    if v is None and null_ok:
        return
    try:
        f = float(v) if type(v) in (int, float) else math.nan
    except OverflowError:
        f = math.nan
    if not (math.isfinite(f) and (f > lo if lo_open else f >= lo) and f <= hi):
        raise _invalid(key, v, f"a finite number {'above' if lo_open else 'from'} {lo:g}"
                               + (f" to {hi:g}" if hi < math.inf else "") + (" or null" if null_ok else ""))


def _is_list_of(v: Any, kind: type) -> bool:
    return isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _check_config(c: Any) -> None:
    """Types and ranges of every config.json field the parser reads (present fields only)."""
    if not isinstance(c, dict):
        raise KtError(f"config.json must hold a JSON object, not {type(c).__name__}; fix it or download it again")
    for key, (lo, hi, null_ok) in _INTS.items():
        if key in c:
            _check_int(key, c[key], lo, hi, null_ok)
    for key, (lo, lo_open, hi, null_ok) in _FLOATS.items():
        if key in c:
            _check_float(key, c[key], lo, lo_open, hi, null_ok)
    for key in ("rope_scaling", "rope_parameters"):
        rope = c.get(key)
        if rope is not None and not isinstance(rope, dict):
            raise _invalid(key, rope, "an object or null")
        for field_, (lo, lo_open, hi, null_ok) in _ROPE_FLOATS.items():
            if rope and field_ in rope:
                _check_float(f"{key}.{field_}", rope[field_], lo, lo_open, hi, null_ok)
        if rope and "original_max_position_embeddings" in rope:
            _check_int(f"{key}.original_max_position_embeddings", rope["original_max_position_embeddings"], 1,
                       INT_MAX, False)
    for key in ("architectures", "layer_types"):
        if c.get(key) is not None and not _is_list_of(c[key], str):
            raise _invalid(key, c[key], "a list of strings")
    if c.get("mlp_only_layers") is not None and not _is_list_of(c["mlp_only_layers"], int):
        raise _invalid("mlp_only_layers", c["mlp_only_layers"], "a list of layer numbers")
    eos = c.get("eos_token_id")
    if eos is not None and not (_is_list_of(eos, int) or type(eos) is int) or \
            any(not 0 <= e <= INT_MAX for e in (eos if isinstance(eos, list) else [eos or 0])):
        raise _invalid("eos_token_id", eos, "a token id, a list of token ids, or null")
    if not c.get("head_dim") and "hidden_size" in c and "num_attention_heads" in c and \
            c["hidden_size"] < c["num_attention_heads"]:
        raise _invalid("hidden_size", c["hidden_size"], "at least num_attention_heads, or set head_dim")
    _, kind, p = _rope_params(c)
    missing = [k for k in _ROPE_NEEDS.get(kind, ()) if p.get(k) is None]
    if missing:
        raise KtError(f"config.json: rope scaling '{kind}' needs {', '.join(missing)} in rope_scaling; fix "
                      "config.json or download it again")


def _check_spec(spec: ModelSpec) -> None:
    """What the fields must agree on across each other."""
    if not 1 <= spec.head_dim <= MAX_HEAD_DIM:
        raise KtError(f"config.json: the head dimension {spec.head_dim} (head_dim, or hidden_size / "
                      f"num_attention_heads) must be from 1 to {MAX_HEAD_DIM}; fix config.json")
    if spec.rope.rot_dim < 2 or spec.rope.rot_dim % 2:
        raise KtError(f"config.json: the rotary dimension {spec.rope.rot_dim} (head dimension {spec.head_dim} x "
                      "partial_rotary_factor, or qk_rope_head_dim) must be even and at least 2; fix config.json")
    if spec.mla is None and (spec.num_kv_heads > spec.num_heads or spec.num_heads % spec.num_kv_heads):
        raise KtError(f"config.json: num_key_value_heads={spec.num_kv_heads} must divide num_attention_heads="
                      f"{spec.num_heads}; fix config.json or download it again")
    if spec.layer_types and len(spec.layer_types) != spec.num_layers:
        raise KtError(f"config.json: layer_types has {len(spec.layer_types)} entries for {spec.num_layers} layers; "
                      "fix config.json or download it again")
    moe = spec.moe
    if moe is not None and spec.moe_layers:
        if not 1 <= moe.top_k <= moe.num_experts:
            raise KtError(f"config.json: num_experts_per_tok={moe.top_k} must be from 1 to the number of experts "
                          f"({moe.num_experts}); fix config.json or download it again")
        if moe.n_group > 1 and (moe.num_experts % moe.n_group or not 1 <= moe.topk_group <= moe.n_group):
            raise KtError(f"config.json: n_group={moe.n_group} must divide the {moe.num_experts} experts and "
                          f"topk_group={moe.topk_group} must be from 1 to n_group; fix config.json")


def parse_config(c: dict) -> ModelSpec:
    """Build the spec from a config.json dict. Every problem (an unsupported architecture, a missing
    field, a value of the wrong type or range) is a one-line KtError that names config.json."""
    try:
        _check_config(c)
        spec = _parse_config(c)
        _check_spec(spec)
        return spec
    except KtError as exc:
        if "config.json" in str(exc):
            raise
        raise KtError(f"config.json: {exc}") from None
    except KeyError as exc:
        raise KtError(f"config.json lacks {exc}, which {_show(c.get('architectures') or 'this model')} needs; "
                      "fix config.json or download it again") from None
    except (TypeError, ValueError, AttributeError, IndexError, ArithmeticError, RecursionError) as exc:
        raise KtError(f"config.json holds a value of the wrong type or range ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]}); fix config.json or download it again") from None


def _parse_config(c: dict) -> ModelSpec:
    """Build the spec from a config.json dict; unsupported architectures fail with the list."""
    archs = c.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:  # no architectures list: fall back to model_type
        arch = next((a for a, fam in ARCHITECTURES.items() if fam == c.get("model_type")), None)
    if arch is None:
        raise KtError(f"unsupported architecture {archs or c.get('model_type')!r}; supported: "
                      f"{', '.join(ARCHITECTURES)}")
    fam = ARCHITECTURES[arch]
    H, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or H // n_heads)
    theta, kind, params = _rope_params(c)
    L = int(c["num_hidden_layers"])
    spec = ModelSpec(
        arch=arch, family=fam, vocab_size=int(c["vocab_size"]), hidden_size=H, num_layers=L,
        num_heads=n_heads, num_kv_heads=int(c.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        intermediate_size=int(c.get("intermediate_size") or 0), rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope=RopeSpec(theta, int(head_dim * float(params.get("partial_rotary_factor", 1.0))), kind, params),
        max_positions=int(c.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=_eos(c),
    )
    spec.softmax_scale = head_dim ** -0.5
    if fam == "llama":
        spec.qkv_bias = spec.o_bias = bool(c.get("attention_bias", False))
    elif fam in ("qwen2", "qwen2_moe"):
        spec.qkv_bias = True
    elif fam in ("qwen3", "qwen3_moe"):
        spec.qkv_bias = spec.o_bias = bool(c.get("attention_bias", False))
        spec.qk_norm = True
    if fam in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral") and c.get("sliding_window") and \
            c.get("use_sliding_window", fam == "mixtral"):
        spec.sliding_window = int(c["sliding_window"])
        lt = c.get("layer_types")
        max_window_layers = int(c.get("max_window_layers", L))
        spec.layer_types = list(lt) if lt else ["sliding" if i >= max_window_layers or fam == "mixtral" else "full"
                                               for i in range(L)]
        spec.layer_types = ["sliding" if t == "sliding_attention" or t == "sliding" else "full"
                            for t in spec.layer_types]
    if fam == "mixtral":
        spec.moe = MoESpec(int(c["num_local_experts"]), int(c["num_experts_per_tok"]), spec.intermediate_size)
        spec.moe_layers = frozenset(range(L))
    elif fam in ("qwen2_moe", "qwen3_moe"):
        n_exp = int(c.get("num_experts") or c.get("num_local_experts") or 0)
        spec.moe = MoESpec(n_exp, int(c["num_experts_per_tok"]), int(c["moe_intermediate_size"]),
                           renormalize=bool(c.get("norm_topk_prob", False)))
        if fam == "qwen2_moe":
            spec.moe.shared_intermediate = int(c.get("shared_expert_intermediate_size") or 0)
            spec.moe.shared_gate = spec.moe.shared_intermediate > 0
        step, only = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
        spec.moe_layers = frozenset(i for i in range(L) if i not in only and spec.moe.num_experts > 0
                                    and (i + 1) % step == 0)
    elif fam in ("deepseek_v2", "deepseek_v3"):
        _deepseek(spec, c, params)
    elif fam == "gpt_oss":
        spec.qkv_bias = spec.o_bias = spec.sinks = True
        spec.moe = MoESpec(int(c["num_local_experts"]), int(c["num_experts_per_tok"]), spec.intermediate_size,
                           scoring="softmax_topk", router_bias=True, expert_bias=True, activation="swiglu_oai")
        spec.moe_layers = frozenset(range(L))
        spec.sliding_window = int(c.get("sliding_window") or 128)
        spec.layer_types = ["sliding" if t == "sliding_attention" else "full"
                            for t in (c.get("layer_types") or ["sliding_attention", "full_attention"] * (L // 2 + 1))][:L]
    return spec


def _deepseek(spec: ModelSpec, c: dict, rope_params: dict) -> None:
    mla = MLASpec(c.get("q_lora_rank"), int(c["kv_lora_rank"]), int(c["qk_nope_head_dim"]),
                  int(c["qk_rope_head_dim"]), int(c["v_head_dim"]))
    spec.mla = mla
    spec.head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    spec.num_kv_heads = spec.num_heads
    spec.rope.rot_dim = mla.qk_rope_head_dim
    # MLA ropes interleaved pairs (V2 always; V3 unless rope_interleave is false)
    spec.rope.interleaved = bool(c.get("rope_interleave", True)) or spec.family == "deepseek_v2"
    spec.softmax_scale = spec.head_dim ** -0.5
    if spec.rope.kind == "yarn" and rope_params.get("mscale_all_dim"):
        m = yarn_mscale(float(rope_params["factor"]), float(rope_params["mscale_all_dim"]))
        spec.softmax_scale *= m * m
    v3 = spec.family == "deepseek_v3"
    n_group = int(c.get("n_group") or 1)
    if not v3 and c.get("topk_method", "greedy") == "greedy":
        n_group = 1
    spec.moe = MoESpec(
        int(c.get("n_routed_experts") or c.get("num_local_experts") or 0), int(c["num_experts_per_tok"]),
        int(c["moe_intermediate_size"]), scoring="sigmoid" if v3 else "softmax",
        renormalize=bool(c.get("norm_topk_prob", False)) if v3 else False, n_group=n_group,
        topk_group=int(c.get("topk_group") or 1), routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        score_bias=v3, shared_intermediate=int(c["moe_intermediate_size"]) * int(c.get("n_shared_experts") or 0))
    first_dense = int(c.get("first_k_dense_replace", 0))
    spec.moe_layers = frozenset(i for i in range(spec.num_layers) if i >= first_dense)
