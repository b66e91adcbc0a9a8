"""config.json checks: a value of the wrong type or range is a one-line KtError naming the field,
raised before any value is used, and the parsed fields must agree with each other."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kt_core.errors import KtError

if TYPE_CHECKING:
    from kt_core.models.spec import ModelSpec

# a layer count of 10**12 would otherwise build a set that large before any check
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
    "bos_token_id": (0, INT_MAX, True), "rotary_dim": (2, MAX_HEAD_DIM, True),
    "attention_chunk_size": (1, INT_MAX, True), "intermediate_size_mlp": (1, INT_MAX, True),
    "interleave_moe_layer_step": (1, 4096, True), "no_rope_layer_interval": (1, 4096, True),
    "floor_scale": (1, INT_MAX, False), "full_attention_interval": (1, 4096, True),
    "linear_num_key_heads": (1, 65536, True), "linear_num_value_heads": (1, 65536, True),
    "linear_key_head_dim": (1, MAX_HEAD_DIM, True), "linear_value_head_dim": (1, MAX_HEAD_DIM, True),
    "linear_conv_kernel_dim": (1, 64, True), "index_n_heads": (1, 65536, True),
    "index_head_dim": (1, MAX_HEAD_DIM, True), "index_topk": (1, INT_MAX, True),
    "hc_mult": (1, 64, True), "hc_sinkhorn_iters": (1, 1000, True), "o_groups": (1, 65536, True),
    "o_lora_rank": (1, INT_MAX, True),
}
# float fields: smallest, whether the smallest itself is excluded, largest, whether null is allowed
_FLOATS = {"rms_norm_eps": (0.0, False, math.inf, False), "rope_theta": (1.0, True, math.inf, False),
           "routed_scaling_factor": (0.0, True, math.inf, False), "partial_rotary_factor": (0.0, True, 1.0, False),
           "attn_scale": (0.0, False, math.inf, False)}
_ROPE_FLOATS = {"factor": (0.0, True, math.inf, False), "low_freq_factor": (0.0, True, math.inf, False),
                "high_freq_factor": (0.0, True, math.inf, False), "beta_fast": (0.0, False, math.inf, True),
                "beta_slow": (0.0, False, math.inf, True), "mscale": (0.0, False, math.inf, True),
                "mscale_all_dim": (0.0, False, math.inf, True), "attention_factor": (0.0, True, math.inf, True),
                "rope_theta": (1.0, True, math.inf, False), "partial_rotary_factor": (0.0, True, 1.0, False),
           "attn_scale": (0.0, False, math.inf, False)}
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


# true / false fields the parser reads (spec.py, spec_families.py)
_FLAGS = ("tie_word_embeddings", "attention_bias", "norm_topk_prob", "use_qk_norm", "rope_interleave")


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
    for key in _FLAGS:  # "false" as a string would read as true
        if c.get(key) is not None and not isinstance(c[key], bool):
            raise _invalid(key, c[key], "true or false")
    for key in ("architectures", "layer_types"):
        if c.get(key) is not None and not _is_list_of(c[key], str):
            raise _invalid(key, c[key], "a list of strings")
    f = c.get("rope_freq_factors")
    if f is not None and not (isinstance(f, list) and f and all(type(v) in (int, float) and math.isfinite(v) and v > 0
                                                                for v in f)):
        raise _invalid("rope_freq_factors", f, "a list of positive numbers")
    for key in ("mlp_only_layers", "moe_layers", "no_rope_layers"):
        if c.get(key) is not None and not _is_list_of(c[key], int):
            raise _invalid(key, c[key], "a list of whole numbers")
    eos = c.get("eos_token_id")
    if eos is not None and not (_is_list_of(eos, int) or type(eos) is int) or \
            any(not 0 <= e <= INT_MAX for e in (eos if isinstance(eos, list) else [eos or 0])):
        raise _invalid("eos_token_id", eos, "a token id, a list of token ids, or null")
    if not c.get("head_dim") and "hidden_size" in c and "num_attention_heads" in c and \
            c["hidden_size"] < c["num_attention_heads"]:
        raise _invalid("hidden_size", c["hidden_size"], "at least num_attention_heads, or set head_dim")
    from kt_core.models.spec import _rope_params

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
    if spec.rope.kind == "freq_factors" and len(spec.rope.params["freq_factors"]) != spec.rope.rot_dim // 2:
        raise KtError(f"the model's rope_freqs holds {len(spec.rope.params['freq_factors'])} factors for a rotary "
                      f"dimension of {spec.rope.rot_dim} (one per pair); the file is inconsistent: convert it again")
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
