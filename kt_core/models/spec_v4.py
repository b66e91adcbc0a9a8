"""DeepSeek-V4's config.json: what differs from every other family.

- Attention: one shared key=value head (``head_dim`` 512) over a sliding window, with per-head sinks,
  plus *compressed* entries: "csa" layers pool every ``rate`` (4) tokens into one entry (two overlapping
  series) and a lightning indexer picks the top ``index_topk`` entries per query; "hca" layers pool every
  128 tokens and every query sees all completed entries. The query comes from a low-rank projection,
  the output goes through grouped low-rank projections (``o_groups`` x ``o_lora_rank``).
- Rotary: interleaved pairs on the *last* ``qk_rope_head_dim`` features; sliding layers use the "main"
  base, compressing layers and their compressors the "compress" one (optionally YaRN).
- Residual: ``hc_mult`` parallel streams mixed by manifold-constrained hyper-connections.
- MoE: sqrt(softplus) scores; the first layers route by a frozen token -> experts table (hash MoE);
  SwiGLU clamped at ``swiglu_limit``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kt_core.config.limits import DEEPSEEK_V4_SWIGLU_LIMIT
from kt_core.errors import KtError
from kt_core.models.spec import ModelSpec, MoESpec, RopeSpec

KINDS = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}
LEGACY_RATIOS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
SWIGLU_LIMIT = DEEPSEEK_V4_SWIGLU_LIMIT  # the native kernels' silu_clamp10; DeepSeek-V4-Flash and -Pro use it


@dataclass
class V4Spec:
    hc_mult: int
    hc_iters: int
    hc_eps: float
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    rope_dim: int
    window: int
    kinds: list[str]  # per layer: sliding | csa | hca
    rates: dict[str, int]  # csa / hca -> tokens pooled into one compressed entry
    index_heads: int
    index_dim: int
    index_topk: int
    rope_main: RopeSpec
    rope_compress: RopeSpec
    hash_layers: frozenset[int] = field(default_factory=frozenset)

    def rate(self, layer: int) -> Optional[int]:
        return self.rates.get(self.kinds[layer])

    def extra_dim(self, layer: int, head_dim: int) -> int:
        """Features each token keeps for ``layer``'s compressors beside its key: the projected kv and gate
        of its window (two series on csa layers), the pooled entry stored at a window's last token, and
        the same for the indexer's compressor."""
        kind = self.kinds[layer]
        if kind == "hca":
            return 3 * head_dim
        if kind == "csa":
            return 5 * head_dim + 5 * self.index_dim
        return 0


def _kinds(c: dict, L: int) -> list[str]:
    types = c.get("layer_types")
    if types is None and c.get("compress_ratios") is not None:
        types = [LEGACY_RATIOS.get(r, r) for r in c["compress_ratios"]]
    if types is None:  # the reference's default: two HCA layers, then CSA / HCA alternating
        types = ["heavily_compressed_attention"] * min(L, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(L - 2, 0))]
    types = list(types)[:L]
    bad = [t for t in types if t not in KINDS]
    if len(types) != L or bad:
        raise KtError(f"config.json: layer_types must name one of {', '.join(KINDS)} for each of the {L} layers "
                      f"(got {bad[:1] or len(types)}); fix config.json")
    return [KINDS[t] for t in types]


def _ropes(c: dict, rope_dim: int) -> tuple[RopeSpec, RopeSpec]:
    rp = c.get("rope_parameters") or {}
    main, comp = rp.get("main"), rp.get("compress")
    if not (isinstance(main, dict) and isinstance(comp, dict)):  # flat: the compress rope carries the scaling
        flat = {k: v for k, v in {**(c.get("rope_scaling") or {}), **rp}.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
        comp = {**flat, "rope_theta": c.get("compress_rope_theta", 160000.0)}
        comp.setdefault("rope_type", comp.get("type", "default"))
    out = []
    for name, p in (("main", main), ("compress", comp)):
        kind = str(p.get("rope_type", p.get("type", "default")) or "default")
        if kind not in ("default", "yarn"):
            raise KtError(f"config.json: DeepSeek-V4's {name} rope '{kind}' is not supported (default, yarn)")
        params = dict(p)
        if kind == "yarn":
            params.setdefault("attention_factor", 1.0)  # the reference does not scale cos / sin
            params.setdefault("original_max_position_embeddings", c.get("max_position_embeddings", 4096))
        out.append(RopeSpec(float(p.get("rope_theta", 10000.0)), rope_dim, kind, params, interleaved=True))
    return out[0], out[1]


def parse(spec: ModelSpec, c: dict) -> None:
    L, hd = spec.num_layers, spec.head_dim
    factor = c.get("partial_rotary_factor")
    rope_dim = int(c["qk_rope_head_dim"]) if c.get("qk_rope_head_dim") else int(hd * float(factor or 64 / 512))
    if rope_dim % 2 or not 0 < rope_dim <= hd:
        raise KtError(f"config.json: the rotary features ({rope_dim}) must be even and fit head_dim={hd}")
    rates = {"csa": 4, "hca": 128}
    given = c.get("compress_rates") or {}
    rates.update({KINDS[k]: int(v) for k, v in given.items() if k in KINDS})
    for k, legacy in (("csa", "compress_rate_csa"), ("hca", "compress_rate_hca")):
        if c.get(legacy):
            rates[k] = int(c[legacy])
    main, comp = _ropes(c, rope_dim)
    n_hash = c.get("num_hash_layers", 3)
    mlp = c.get("mlp_layer_types") or ["hash_moe"] * min(L, int(n_hash)) + ["moe"] * max(0, L - int(n_hash))
    if len(mlp) < L or set(mlp[:L]) - {"hash_moe", "moe"}:
        raise KtError(f"config.json: mlp_layer_types must list 'hash_moe' or 'moe' for each of the {L} layers")
    spec.v4 = V4Spec(int(c.get("hc_mult", 4)), int(c.get("hc_sinkhorn_iters", 20)), float(c.get("hc_eps", 1e-6)),
                     int(c["q_lora_rank"]), int(c.get("o_groups", 8)), int(c.get("o_lora_rank", 1024)), rope_dim,
                     int(c.get("sliding_window", 128)), _kinds(c, L), rates, int(c.get("index_n_heads", 64)),
                     int(c.get("index_head_dim", 128)), int(c.get("index_topk", 512)), main, comp,
                     frozenset(i for i in range(L) if mlp[i] == "hash_moe"))
    v = spec.v4
    if (spec.num_heads * hd) % v.o_groups:
        raise KtError(f"config.json: o_groups={v.o_groups} must divide the {spec.num_heads * hd} attention outputs")
    if v.index_dim < rope_dim or min(rates.values()) < 1 or v.window < 1:
        raise KtError("config.json: index_head_dim must hold the rotary features, compress rates and "
                      "sliding_window must be positive; fix config.json")
    limit = float(c.get("swiglu_limit", SWIGLU_LIMIT))
    if limit != SWIGLU_LIMIT:
        raise KtError(f"config.json: swiglu_limit={limit}; kt-core's expert kernels clamp at DeepSeek-V4's "
                      f"{SWIGLU_LIMIT:g}")
    if str(c.get("scoring_func", "sqrtsoftplus")) != "sqrtsoftplus" or c.get("hidden_act", "silu") != "silu":
        raise KtError("config.json: DeepSeek-V4 is supported with scoring_func sqrtsoftplus and hidden_act silu")
    spec.num_kv_heads, spec.sinks = 1, True
    spec.softmax_scale = hd ** -0.5
    spec.rope = comp
    inter = int(c["moe_intermediate_size"])
    spec.moe = MoESpec(int(c.get("n_routed_experts") or c.get("num_local_experts") or 0), int(c["num_experts_per_tok"]),
                       inter, scoring="sqrtsoftplus", renormalize=True,  # the reference always renormalises
                       routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)), score_bias=True,
                       activation="silu_clamp10", shared_intermediate=inter * int(c.get("n_shared_experts", 1) or 0))
    spec.moe_layers = frozenset(range(L))
    spec.intermediate_size = inter
