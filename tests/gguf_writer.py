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
        "Qwen2MoeForCausalLM": "QWEN2MOE", "Qwen3ForCausalLM": "QWEN3", "Qwen3MoeForCausalLM": "QWEN3MOE"}
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


def write_gguf(folder: Path, out: Path, qtype: str = "F32", split_max_tensors: int = 0,
               tokenizer: Optional[dict] = None) -> Path:
    """Write the checkpoint in ``folder`` as ``out``. Float weight matrices whose rows split into
    blocks are stored as ``qtype`` (embedding included, routers and norms stay F32, as llama.cpp
    does); ``tokenizer``: extra ``tokenizer.*`` metadata."""
    import gguf

    c = json.loads((folder / "config.json").read_text())
    hf_arch = c["architectures"][0]
    arch = getattr(gguf.MODEL_ARCH, ARCH[hf_arch])
    L, H, heads = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(arch, L)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch], split_max_tensors=split_max_tensors)
    w.add_block_count(L)
    w.add_context_length(c.get("max_position_embeddings", 4096))
    w.add_embedding_length(H)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if c.get("head_dim"):
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    rope = c.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    if c.get("intermediate_size"):
        w.add_feed_forward_length(c["intermediate_size"])
    n_exp = c.get("num_experts") or c.get("num_local_experts")
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(c["num_experts_per_tok"])
        if c.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        if c.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    scaling = c.get("rope_scaling") or rope
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    for k, v in (tokenizer or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_array(k, v)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    block = gguf.GGML_QUANT_SIZES[q][0]
    for k, t in sorted(_merge_experts(_tensors(folder)).items()):
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
        full = f"{name}.{suffix}" if suffix else name
        arr = t.contiguous().numpy().astype(np.float32)
        quantize = (t.dim() >= 2 and t.shape[-1] % block == 0 and "ffn_gate_inp" not in name
                    and q != gguf.GGMLQuantizationType.F32)
        if quantize:
            w.add_tensor(full, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(full, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def dequantized_folder(gguf_path: Path, hf_folder: Path, out: Path) -> Path:
    """An HF folder holding what the GGUF's blocks decode to (``gguf.quants.dequantize``), in the
    original names and order: the reference a quantized GGUF must match."""
    import gguf
    from safetensors.torch import save_file

    r = gguf.GGUFReader(gguf_path)
    decoded = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        decoded[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())
    c = json.loads((hf_folder / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, ARCH[c["architectures"][0]])
    names = gguf.get_tensor_name_map(arch, c["num_hidden_layers"])
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    src = _tensors(hf_folder)
    outs = {}
    for k, v in src.items():
        m = EXPERT.match(k)
        base, _, suffix = (f"{m.group(1)}.{m.group(3)}.weight" if m else k).rpartition(".")
        gname = names.get_name(base) or gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["num_hidden_layers"]).get_name(base)
        t = decoded[f"{gname}.{suffix}"]
        if m:
            t = t[int(m.group(2))]
        if ARCH[c["architectures"][0]] == "LLAMA" and base.endswith(("q_proj", "k_proj")):
            n = heads if base.endswith("q_proj") else kv
            t = t.reshape(n, t.shape[0] // n // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        outs[k] = t.reshape(v.shape).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(outs, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(c))
    return out
