"""``CausalLM``: a decoder-only model assembled from a checkpoint and a ``ModelSpec``.

Weights are read tensor by tensor from the checkpoint, cast to the model dtype,
quantized where the quant config says so, and placed on the backend's device.
The forward pass goes layer by layer through the device contract.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kt_core.backend.contract import Backend
from kt_core.backend.torch_ops.norm_rope import rope_cos_sin
from kt_core.errors import KtError
from kt_core.kvcache.paged import Batch, PagedKVCache
from kt_core.models import deepseek_v4, linear_attn, shapes_v4
from kt_core.models.layers import Attention, DenseMLP, MLAttention, MoEBlock
from kt_core.models.expert_stream import Stacked
from kt_core.models.names import moe_names
from kt_core.models.spec import ModelSpec
from kt_core.progress import progress
from kt_core.weights.checkpoint import Checkpoint
from kt_core.models.kept import kept_experts as _kept_experts
from kt_core.models.reader import QuantPlan, _Reader  # noqa: F401  (QuantPlan: re-exported)
from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight


def _attention(r: _Reader, p: str, spec: ModelSpec, i: int):
    H, nh, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    a = p + "self_attn."
    if spec.mla is not None:
        m = spec.mla
        qd = nh * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        w = {"kv_a": r.dense(a + "kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.qk_rope_head_dim, H)),
             "kv_a_norm": r.t(a + "kv_a_layernorm.weight", (m.kv_lora_rank,)),
             "kv_b": r.t(a + "kv_b_proj.weight", (nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)),
             "o": r.dense(a + "o_proj.weight", (H, nh * m.v_head_dim))}
        if m.q_lora_rank:
            w.update(q_a=r.dense(a + "q_a_proj.weight", (m.q_lora_rank, H)),
                     q_a_norm=r.t(a + "q_a_layernorm.weight", (m.q_lora_rank,)),
                     q_b=r.dense(a + "q_b_proj.weight", (qd, m.q_lora_rank)))
        else:
            w["q"] = r.dense(a + "q_proj.weight", (qd, H))
        if spec.index is not None and spec.index.runs_at(i):
            from kt_core.models import indexer

            w["indexer"] = indexer.load(r, a, spec)
        return MLAttention(w, spec, i)
    q_rows = nh * hd * (2 if spec.attn_output_gate else 1)  # Qwen3-Next: each head's q, then its gate
    rows = (q_rows, nkv * hd, nkv * hd)
    qkv = r.dense_cat([a + f"{n}_proj.weight" for n in "qkv"], [(n, H) for n in rows])
    if qkv is not None:  # one product for q, k and v
        w = {"qkv": qkv, "qkv_rows": rows, "o": r.dense(a + "o_proj.weight", (H, nh * hd))}
        if spec.qkv_bias:
            w["qkv_bias"] = torch.cat([r.t(a + f"{n}_proj.bias", (m,)) for n, m in zip("qkv", rows)])
    else:
        w = {"q": r.dense(a + "q_proj.weight", (q_rows, H)), "k": r.dense(a + "k_proj.weight", (nkv * hd, H)),
             "v": r.dense(a + "v_proj.weight", (nkv * hd, H)), "o": r.dense(a + "o_proj.weight", (H, nh * hd))}
        if spec.qkv_bias:
            w.update(q_bias=r.t(a + "q_proj.bias", (q_rows,)), k_bias=r.t(a + "k_proj.bias", (nkv * hd,)),
                     v_bias=r.t(a + "v_proj.bias", (nkv * hd,)))
    if spec.o_bias:
        w["o_bias"] = r.t(a + "o_proj.bias", (H,))
    if spec.qk_norm:
        qn, kn = spec.qk_norm_dims
        w.update(q_norm=r.norm(a + "q_norm.weight", (qn,)), k_norm=r.norm(a + "k_norm.weight", (kn,)))
    if spec.sinks:
        w["sinks"] = r.t(a + "sinks", (nh,), torch.float32)
    if spec.qk_l2_norm and i not in spec.nope_layers:
        w["l2"] = torch.ones(hd, dtype=r.dtype, device=r.device)  # a weightless RMSNorm
    return Attention(w, spec, i)


def _mlp(r: _Reader, p: str, H: int, inter: int, names=("gate_proj", "up_proj", "down_proj"),
         activation: str = "silu") -> DenseMLP:
    g, u, d = names
    down = r.dense(f"{p}{d}.weight", (H, inter))
    gate_up = r.dense_cat([f"{p}{g}.weight", f"{p}{u}.weight"], [(inter, H), (inter, H)])
    if gate_up is not None:  # one product for gate and up
        return DenseMLP(None, None, down, activation, gate_up=gate_up)
    return DenseMLP(r.dense(f"{p}{g}.weight", (inter, H)), r.dense(f"{p}{u}.weight", (inter, H)), down, activation)


def load_experts(r: _Reader, p: str, spec: ModelSpec, ids: list[int], layer: Optional[int] = None,
                 keep: bool = True) -> ExpertWeights:
    """The experts ``ids`` of one MoE layer, in the checkpoint's naming for this family
    (or from the ``kt quantize`` file when one is in use); ``keep``: a GGUF's own quantization
    may be kept (``kt quantize`` asks for quant.experts instead)."""
    pre = r.qp.prequant
    if pre is not None and layer is not None and pre.has_layer(layer):
        return pre.experts(layer, ids, r.device)
    ck, m, H = r.ck, spec.moe, spec.hidden_size
    I = m.intermediate
    idx = torch.tensor(ids, dtype=torch.long)
    kept = _kept_experts(r, p, spec, ids, idx) if keep else None
    if kept is not None:
        return kept
    names = moe_names(spec.family)
    if names.fused:
        e = names.experts(p)
        gate_up = ck.get(e + "gate_up_proj", (m.num_experts, H, 2 * I))[idx]
        down = ck.get(e + "down_proj", (m.num_experts, I, H))[idx].transpose(1, 2)
        gate, up = (gate_up[..., ::2], gate_up[..., 1::2]) if names.interleaved else (gate_up[..., :I], gate_up[..., I:])
        biases = {}
        if m.expert_bias:
            bias = ck.get(e + "gate_up_proj_bias", (m.num_experts, 2 * I))[idx]
            biases = dict(gate_bias=bias[..., ::2] if names.interleaved else bias[..., :I],
                          up_bias=bias[..., 1::2] if names.interleaved else bias[..., I:],
                          down_bias=ck.get(e + "down_proj_bias", (m.num_experts, H))[idx])
        return r.experts(gate.transpose(1, 2), up.transpose(1, 2), down, idx, **biases)
    lists = names.expert_lists(p, ids)
    if r.qp.experts is Quant.FP8 and all(ck.is_fp8(n) for n in lists[0][:1] + lists[2][:1]):
        # an fp8 checkpoint served in fp8: keep its codes and block scales, no requantization
        g, u, d = (_stack_fp8(ck, ns, shape) for ns, shape in zip(lists, ((I, H), (I, H), (H, I))))
        return ExpertWeights(idx.to(r.device), g.to(r.device), u.to(r.device), d.to(r.device))
    return r.experts(Stacked(ck, lists[0], (I, H)), Stacked(ck, lists[1], (I, H)), Stacked(ck, lists[2], (H, I)), idx)


def _stack_fp8(ck: Checkpoint, names: list[str], shape) -> QuantizedWeight:
    ws = []
    for n in names:
        w = ck.fp8_weight(n)
        if tuple(w.shape) != tuple(shape):
            raise KtError(f"tensor {n} has shape {tuple(w.shape)} but the config implies {tuple(shape)}")
        ws.append(w)
    return QuantizedWeight(Quant.FP8, torch.stack([w.qdata for w in ws]), torch.stack([w.scales for w in ws]), None,
                           ws[0].group_size, ws[0].in_features)


# layer -> [(backend, device index, expert ids)] for every device that holds experts of that layer
ExpertPlacer = Callable[[int], list[tuple[Backend, int, list[int]]]]


def _moe(r: _Reader, p: str, spec: ModelSpec, i: int, be: Backend, placer: Optional[ExpertPlacer]) -> MoEBlock:
    m, H = spec.moe, spec.hidden_size
    E = m.num_experts
    names = moe_names(spec.family)
    router = r.t(names.router_weight(p), (E, H), torch.float32)
    if torch.equal(router.bfloat16().float(), router):  # a bf16 checkpoint's: kept in bf16, exactly
        router = router.bfloat16()
    rbias = r.t(names.router_bias_name(p), (E,), torch.float32) if names.router_bias else None
    hashed = spec.v4 is not None and i in spec.v4.hash_layers  # DeepSeek-V4: routed by a token table, no bias
    score_bias = r.t(names.score_bias_name(p), (E,), torch.float32) if m.score_bias and not hashed else None
    groups = placer(i) if placer else [(be, 0, list(range(E)))]
    shards = []
    for shard_be, index, ids in groups:
        if ids:
            device = shard_be.torch_device(index)
            sub = _Reader(r.ck, spec, r.dtype, device, r.qp)
            shards.append((shard_be, device, shard_be.prepare_experts(load_experts(sub, p, spec, ids, i), index)))
    shared = shared_gate = None
    if m.shared_intermediate:
        shared = _mlp(r, names.shared_prefix(p), H, m.shared_intermediate, names.shared_projections, m.activation)
        if m.shared_gate:
            shared_gate = r.t(names.shared_gate(p), (1, H))
    block = MoEBlock(spec, router, rbias, score_bias, shards, shared, shared_gate)
    block.layer = i
    if hashed:
        block.tid2eid = r.ck.get(f"{p}{names.block}.gate.tid2eid", (spec.vocab_size, m.top_k)).long().to(r.device)
        if int(block.tid2eid.min()) < 0 or int(block.tid2eid.max()) >= E:
            raise KtError(f"{p}{names.block}.gate.tid2eid names experts outside 0..{E - 1}; the checkpoint is "
                          "damaged: re-download it")
    return block


# layer -> (backend, device index) that holds its attention, norms, dense MLP / router / shared experts
LayerPlacer = Callable[[int], tuple[Backend, int]]


def _prepare(be: Backend, w, index: int, owned: bool):
    """``be.prepare_dense``, told ``owned`` only when true (a backend plugin written before the argument
    keeps working)."""
    return be.prepare_dense(w, index, owned=True) if owned else be.prepare_dense(w, index)


class Layer:
    def __init__(self, attn, ffn, norm1: torch.Tensor, norm2: torch.Tensor, be: Backend, device: torch.device,
                 cos_sin: torch.Tensor) -> None:
        self.attn, self.ffn, self.norm1, self.norm2 = attn, ffn, norm1, norm2
        self.be, self.device, self.cos_sin = be, device, cos_sin


class CausalLM:
    """Layers may live on different devices (layers split over accelerators): the hidden states
    move to a layer's device once, at its start; logits come from the last layer's device."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, embed: torch.Tensor, layers: list[Layer],
                 norm: torch.Tensor, lm_head) -> None:
        self.spec, self.dtype = spec, dtype
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.be, self.device = layers[-1].be, layers[-1].device  # where logits and sampling happen
        self.cos_sin = layers[0].cos_sin
        self.backends = list({id(layer.be): layer.be for layer in layers}.values())  # each told of every step
        self.checkpoint_layers = False  # activation checkpointing per layer (fine-tuning)
        self.hc_head: Optional[dict] = None  # DeepSeek-V4: collapses the residual streams before the norm

    @classmethod
    def load(cls, ck: Checkpoint, spec: ModelSpec, backend: Backend, dtype: torch.dtype,
             qp: Optional[QuantPlan] = None, max_positions: Optional[int] = None,
             placer: Optional[ExpertPlacer] = None, deferred_experts: int = 0,
             homes: Optional[LayerPlacer] = None) -> "CausalLM":
        qp = qp or QuantPlan()
        H, V = spec.hidden_size, spec.vocab_size
        inv_freq, mscale = spec.rope.inv_freq()
        table = rope_cos_sin(spec.rope.rot_dim, max_positions or spec.max_positions, inv_freq=inv_freq, mscale=mscale)
        tables: dict[torch.device, torch.Tensor] = {}
        layers = []
        v4_tables = deepseek_v4.rope_tables(spec, max_positions or spec.max_positions) if spec.v4 else None
        with progress(f"loading {spec.arch} ({spec.num_layers} layers)", spec.num_layers) as advance:
            for i in range(spec.num_layers):
                be, index = homes(i) if homes else (backend, 0)
                device = be.torch_device(index)
                r = _Reader(ck, spec, dtype, device, qp,
                            lambda w, owned=False, be=be, index=index: _prepare(be, w, index, owned),
                            fuse=getattr(be, "fuse_projections", True),
                            alloc=lambda shape, dt, be=be, index=index: be.dense_empty(shape, dt, index))
                p = f"model.layers.{i}."
                if spec.v4 is not None:  # DeepSeek-V4: hyper-connected streams, compressed attention
                    if device not in tables:
                        tables[device] = {k: t.to(device) for k, t in v4_tables.items()}
                    if deferred_experts:
                        raise KtError(f"expert deferral does not apply to {spec.arch} (its experts feed hyper-"
                                      "connected residual streams); set topology.deferred_experts=0")
                    ffn = _moe(r, p, spec, i, be, placer)
                    layers.append(deepseek_v4.load_layer(r, spec, i, ffn, be, device, tables[device]))
                    advance()
                    continue
                attn = linear_attn.load(r, p, spec) if spec.is_linear(i) else _attention(r, p, spec, i)
                if spec.index is not None and not spec.index.runs_at(i):  # GLM-5: reuse the last indexer's choice
                    attn.source = next(layer.attn for layer in reversed(layers) if layer.attn.source is None)
                if spec.is_moe(i):
                    ffn = _moe(r, p, spec, i, be, placer)
                    if deferred_experts and spec.moe.weight_input:
                        raise KtError(f"expert deferral does not apply to {spec.arch} (its routing weight scales "
                                      "the expert's input); set topology.deferred_experts=0")
                    ffn.deferred = deferred_experts
                else:
                    ffn = _mlp(r, moe_names(spec.family).dense_prefix(p), H, spec.intermediate_size)
                if device not in tables:
                    tables[device] = table.to(device)
                layers.append(Layer(attn, ffn, r.norm(p + "input_layernorm.weight", (H,)),
                                    r.norm(p + "post_attention_layernorm.weight", (H,)), be, device, tables[device]))
                advance()
        last_be, last_index = homes(spec.num_layers - 1) if homes else (backend, 0)  # the head sits with the last layer
        first = _Reader(ck, spec, dtype, layers[0].device, qp)
        last = _Reader(ck, spec, dtype, layers[-1].device, qp,
                       lambda w, owned=False: _prepare(last_be, w, last_index, owned),
                       alloc=lambda shape, dt: last_be.dense_empty(shape, dt, last_index))
        head = shapes_v4.GLOBALS["head"] if spec.v4 is not None else "lm_head.weight"
        tied = spec.tie_embeddings or head not in ck
        # a tied head multiplies the embedding: it stays in the model's dtype then
        embed = (first.t if tied else first.embedding)("model.embed_tokens.weight", (V, H))
        norm = last.norm("model.norm.weight", (H,))
        if tied:
            lm_head = embed if layers[0].device == layers[-1].device else last.t("model.embed_tokens.weight", (V, H))
        else:
            lm_head = last.dense(head, (V, H), qp.head_format)
        model = cls(spec, dtype, embed, layers, norm, lm_head)
        if spec.v4 is not None:
            model.hc_head = deepseek_v4.load_head(last, spec)
        return model

    def weight_bytes(self) -> int:
        """Bytes of every weight this model holds (shared tensors counted once)."""
        seen: dict[int, int] = {}

        def add(obj) -> None:
            if isinstance(obj, torch.Tensor):
                seen[obj.data_ptr()] = obj.numel() * obj.element_size()
            elif hasattr(obj, "nbytes") and callable(obj.nbytes):
                seen[id(obj)] = obj.nbytes()
            elif isinstance(obj, dict):
                for v in obj.values():
                    add(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    add(v)
            elif hasattr(obj, "__dict__") and not isinstance(obj, type):
                for k, v in vars(obj).items():
                    if k not in ("spec", "moe", "be", "w_uk", "w_uv", "cos_sin", "device", "tables"):  # w_uk/w_uv: kv_b views
                        add(v)
        add([self.embed, self.layers, self.norm, self.lm_head])
        return sum(seen.values())

    def new_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        s = self.spec
        devices = [layer.device for layer in self.layers]
        if s.linear is not None:  # Qwen3-Next: KV blocks for the attention layers, state for the others
            from kt_core.kvcache.state import StatePool

            states = StatePool(s.linear, s.linear_layers, self.dtype, {i: devices[i] for i in s.linear_layers})
            return PagedKVCache(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim, self.dtype,
                                self.device, layer_devices=devices, states=states)
        if s.v4 is not None:  # one key=value head; the compressors' features per token beside it
            return PagedKVCache(s.num_layers, num_blocks, block_size, 1, s.head_dim, self.dtype, self.device,
                                latent=True, layer_devices=devices,
                                extra_dims=[s.v4.extra_dim(i, s.head_dim) for i in range(s.num_layers)])
        if s.mla is not None:
            return PagedKVCache(s.num_layers, num_blocks, block_size, 1, s.mla.kv_lora_rank + s.mla.qk_rope_head_dim,
                                self.dtype, self.device, latent=True, layer_devices=devices,
                                index_dim=s.index.head_dim if s.index is not None else 0,
                                index_layers=None if s.index is None else
                                [i for i in range(s.num_layers) if s.index.runs_at(i)])
        return PagedKVCache(s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim, self.dtype, self.device,
                            layer_devices=devices)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: PagedKVCache) -> torch.Tensor:
        """Logits (float32) of ``batch.logits_rows``."""
        return self.forward_train(batch, cache)

    def forward_train(self, batch: Batch, cache: PagedKVCache) -> torch.Tensor:
        """``forward`` without inference mode: autograd records it (fine-tuning on an autograd backend)."""
        from kt_core.runtime.executor import run_step

        return run_step(self, batch, cache)

    def forward_hidden(self, batch: Batch, cache: PagedKVCache) -> torch.Tensor:
        """``forward_train`` up to the LM head: the final normed hidden states of ``batch.logits_rows``."""
        from kt_core.runtime.executor import run_hidden

        return run_hidden(self, batch, cache)

    def head_products(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's products on final hidden states, in the model's dtype (fine-tuning's
        log-probabilities take them a block at a time: train/token_logprobs.py)."""
        return self.be.linear(h, self.lm_head)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states: float32 logits."""
        return self.head_products(h).float()
