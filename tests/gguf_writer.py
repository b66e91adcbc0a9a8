"""GGUF files for tests, written from a tiny Hugging Face checkpoint the way llama.cpp's converter
writes them, but with nothing of kt-core: tensor names come from the ``gguf`` package's own
name map, metadata from its writer, quantized blocks from ``gguf.quants.quantize``, and llama's
q/k row permutation from its definition (each head's two rope halves interleaved)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ARCH = {"LlamaForCausalLM": "LLAMA", "MixtralForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2",
        "Qwen2MoeForCausalLM": "QWEN2MOE", "Qwen3ForCausalLM": "QWEN3", "Qwen3MoeForCausalLM": "QWEN3MOE",
        "DeepseekV2ForCausalLM": "DEEPSEEK2", "DeepseekV3ForCausalLM": "DEEPSEEK2", "GptOssForCausalLM": "GPT_OSS"}
EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter order for llama q/k rows: per head, the two rope halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k).float()
    return out


def _merge_experts(ts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for k, v in ts.items():
        m = EXPERT.match(k)
        if m:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}.weight", {})[int(m.group(2))] = v
        else:
            out[k] = v
    for k, d in groups.items():
        out[k] = torch.stack([d[j] for j in sorted(d)])
    return out


def _split(c: dict, k: str, t: torch.Tensor, split_kv_b: bool) -> list[tuple[str, torch.Tensor]]:
    """One HF tensor as the converter hands it to the name map (llama.cpp's definitions): DeepSeek's
    kv_b_proj split per head into k_b (transposed, for MLA absorption) and v_b; gpt-oss's
    interleaved gate_up_proj split into gate (even columns) and up (odd), its expert weights
    transposed to [E, out, in]; sinks and the score-correction bias given a suffix."""
    if k.endswith("self_attn.kv_b_proj.weight") and split_kv_b:
        nope, v = c["qk_nope_head_dim"], c["v_head_dim"]
        kv_b = t.reshape(c["num_key_value_heads"], nope + v, t.shape[-1])
        return [(k.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].transpose(1, 2)),
                (k.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:])]
    if k.endswith("mlp.experts.gate_up_proj"):
        t = t.transpose(-1, -2)
        return [(k.replace("gate_up_proj", "gate_proj.weight"), t[:, ::2]),
                (k.replace("gate_up_proj", "up_proj.weight"), t[:, 1::2])]
    if k.endswith("mlp.experts.gate_up_proj_bias"):
        return [(k.replace("gate_up_proj_bias", "gate_proj.bias"), t[..., ::2]),
                (k.replace("gate_up_proj_bias", "up_proj.bias"), t[..., 1::2])]
    if k.endswith("mlp.experts.down_proj"):
        return [(k + ".weight", t.transpose(-1, -2))]
    if k.endswith("mlp.experts.down_proj_bias"):
        return [(k.replace("down_proj_bias", "down_proj.bias"), t)]
    if k.endswith("self_attn.sinks"):
        return [(k + ".weight", t)]
    return [(k.replace("e_score_correction_bias", "e_score_correction.bias"), t)]


def _convert(c: dict, ts: dict[str, torch.Tensor], split_kv_b: bool = True) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor, as llama.cpp's converter lays the HF checkpoint ``ts`` out."""
    import gguf

    hf_arch = c["architectures"][0]
    arch = getattr(gguf.MODEL_ARCH, ARCH[hf_arch])
    L, heads = c["num_hidden_layers"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(arch, L)
    out = {}
    for k0, t0 in sorted(_merge_experts(ts).items()):
        for k, t in _split(c, k0, t0, split_kv_b):
            base, _, suffix = k.rpartition(".")
            if suffix not in ("weight", "bias"):
                base, suffix = k, ""
            # a dense layer in an MoE model (Qwen2-MoE's mlp_only_layers): llama's names for it
            name = names.get_name(base) or gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, L).get_name(base)
            if name is None:
                raise ValueError(f"the gguf package maps no name for {k}")
            if ARCH[hf_arch] == "LLAMA" and base.endswith(("q_proj", "k_proj")):
                t = _permute(t, heads if base.endswith("q_proj") else kv)
            if base.endswith("shared_expert_gate"):
                t = t.reshape(-1)
            out[f"{name}.{suffix}" if suffix else name] = t
    return out


def _metadata(w, c: dict) -> None:
    """The hyperparameters, under the keys llama.cpp's converter writes them to."""
    import gguf

    arch = ARCH[c["architectures"][0]]
    L, H, heads = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    w.add_block_count(L)
    w.add_context_length(c.get("max_position_embeddings", 4096))
    w.add_embedding_length(H)
    w.add_head_count(heads)
    w.add_head_count_kv(1 if arch == "DEEPSEEK2" else c.get("num_key_value_heads") or heads)  # MLA as MQA
    if c.get("head_dim") and arch != "DEEPSEEK2":
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    rope = c.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    if c.get("intermediate_size"):
        w.add_feed_forward_length(c["intermediate_size"])
    n_exp = c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts")
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(c["num_experts_per_tok"])
        width = c["intermediate_size"] if arch == "GPT_OSS" else c.get("moe_intermediate_size")
        if width:
            w.add_expert_feed_forward_length(width)
        if c.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    if c.get("n_group") is not None:
        w.add_expert_group_count(c["n_group"])
    if c.get("topk_group") is not None:
        w.add_expert_group_used_count(c["topk_group"])
    if c.get("scoring_func") in ("softmax", "sigmoid"):
        w.add_expert_gating_func(getattr(gguf.ExpertGatingFuncType, c["scoring_func"].upper()))
    scaling = c.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(getattr(gguf.RopeScalingType, kind.upper()))
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(float(scaling[key]))
    if arch == "DEEPSEEK2":
        kv_lora, rope_dim = c["kv_lora_rank"], c["qk_rope_head_dim"]
        w.add_leading_dense_block_count(c.get("first_k_dense_replace") or 0)
        if c.get("q_lora_rank"):
            w.add_q_lora_rank(c["q_lora_rank"])
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope_dim)  # the "compressed" head MLA attends with
        w.add_value_length(kv_lora)
        w.add_key_length_mla(c["qk_nope_head_dim"] + rope_dim)
        w.add_value_length_mla(c["v_head_dim"])
        w.add_expert_shared_count(c.get("n_shared_experts") or 0)
        if c.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(c["routed_scaling_factor"])
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope_dim)
        if scaling.get("mscale_all_dim") is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])
    if arch == "GPT_OSS":
        w.add_sliding_window(c["sliding_window"])


def write_gguf(folder: Path, out: Path, qtype: str = "F32", split_max_tensors: int = 0,
               tokenizer: Optional[dict] = None, split_kv_b: bool = True, types: Optional[dict] = None) -> Path:
    """Write the checkpoint in ``folder`` as ``out``. Float weight matrices whose rows split into
    blocks are stored as ``qtype`` (embedding included, routers and norms stay F32, as llama.cpp
    does); ``tokenizer``: extra ``tokenizer.*`` metadata; ``split_kv_b``: DeepSeek's kv_b_proj as
    attn_k_b + attn_v_b (today's converter) rather than one attn_kv_b (older ones)."""
    import gguf

    c = json.loads((folder / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, ARCH[c["architectures"][0]])
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch], split_max_tensors=split_max_tensors)
    _metadata(w, c)
    for k, v in (tokenizer or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_array(k, v)
    for name, t in _convert(c, _tensors(folder), split_kv_b).items():
        kind = next((v for k, v in (types or {}).items() if k in name), qtype)  # types: name part -> type
        q = getattr(gguf.GGMLQuantizationType, kind)
        block = gguf.GGML_QUANT_SIZES[q][0]
        arr = t.contiguous().numpy().astype(np.float32)
        quantize = (t.dim() >= 2 and t.shape[-1] % block == 0 and "ffn_gate_inp" not in name
                    and q != gguf.GGMLQuantizationType.F32)
        if quantize:
            blocks = q5_k_blocks(arr) if kind == "Q5_K" else gguf.quants.quantize(arr, q)
            w.add_tensor(name, blocks, raw_dtype=q)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def q5_k_blocks(x: np.ndarray) -> np.ndarray:
    """float32 ``[..., n]`` (n a multiple of 256) as Q5_K blocks (the gguf package quantizes no K
    type), from the format's definition (ggml-common.h's block_q5_K): per super-block of 256, f16 d and
    dmin, twelve bytes of 6-bit scales and mins of its 8 sub-blocks of 32, qh[32] (bit i of byte l: the
    5th bit of element l of sub-block i), qs[128] (bytes 32c..32c+31: sub-block 2c in the low nibbles,
    2c+1 in the high); x = d*sc*q - dmin*m with q in 0..31. Rounding is plain (no search): the tests
    compare against what these bytes decode to, not against the floats."""
    lead, n = x.shape[:-1], x.shape[-1]
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale, mins = (sub.max(-1) - lo) / 31.0, -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, mf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    ls = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(np.divide(mins, mf, out=np.zeros_like(mins), where=mf > 0)), 0, 63).astype(np.uint8)
    step = (df * ls)[..., None]
    q = np.rint(np.divide(sub + (mf * lm)[..., None], step, out=np.zeros_like(sub), where=step > 0))
    q = np.clip(q, 0, 31).astype(np.uint8)  # [b, 8, 32]
    sc = np.zeros((q.shape[0], 12), np.uint8)
    sc[:, 0:4] = (ls[:, :4] & 63) | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = (lm[:, :4] & 63) | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)  # [b, 32]
    low = q & 0xF
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qh, qs], axis=1)
    return np.ascontiguousarray(out.reshape(*lead, n // 256 * 176))


def dequantized_folder(gguf_path: Path, hf_folder: Path, out: Path) -> Path:
    """An HF folder holding what the GGUF's blocks decode to (``gguf.quants.dequantize``), in the
    original names and order: the reference a quantized GGUF must match. Where each decoded value
    goes comes from laying out the checkpoint's element indices as the converter lays out its
    values (``_convert`` on index tensors): no inverse of any layout is written by hand."""
    import gguf
    from safetensors.torch import save_file

    r = gguf.GGUFReader(gguf_path)
    decoded = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        decoded[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())
    c = json.loads((hf_folder / "config.json").read_text())
    src = _tensors(hf_folder)
    index, starts, start = {}, {}, 0
    for k, v in src.items():
        index[k], starts[k] = torch.arange(start, start + v.numel(), dtype=torch.float64).reshape(v.shape), start
        start += v.numel()
    flat = torch.full((start,), float("nan"))
    for name, ix in _convert(c, index, split_kv_b=any(n.endswith("attn_k_b.weight") for n in decoded)).items():
        flat[ix.reshape(-1).long()] = decoded[name].reshape(-1)
    assert not flat.isnan().any(), "every checkpoint value is somewhere in the GGUF"
    outs = {k: flat[starts[k]:starts[k] + ix.numel()].reshape(ix.shape).clone() for k, ix in index.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(outs, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(c))
    return out
