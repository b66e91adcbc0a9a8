"""The decode step's whole-layer native call (kt_backends/cpu/native_layer.py, native/decode_layer.inc)
against the per-op path it replaces: same greedy tokens, logits within a few bf16 roundings, on tiny
checkpoints written by transformers, in the formats and layer kinds it takes."""
import pytest
import torch

import kt_core
from kt_backends.cpu import native_layer
from kt_core.kvcache.paged import Batch
from kt_core.runtime import executor

pytestmark = pytest.mark.skipif(not native_layer.enabled(), reason="native CPU kernels not built / KT_FUSED_DECODE=0")

PROMPTS = [[5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88], [19, 27, 50]]


def _decode(engine, monkeypatch) -> tuple[list, list]:
    """Greedy token ids of PROMPTS and the logits of every decode step."""
    seen, real = [], executor.run_step

    def spy(model, batch, cache):
        out = real(model, batch, cache)
        if batch.is_decode:
            seen.append(out.detach().float().clone())
        return out

    monkeypatch.setattr(executor, "run_step", spy)
    try:
        res = engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    finally:
        monkeypatch.setattr(executor, "run_step", real)
    return [r.token_ids for r in res], seen


CASES = [("qwen3_moe", ["model.dtype=bfloat16"]),
         ("qwen3_moe", ["model.dtype=bfloat16", "quant=int4", "quant.group_size=32", "quant.dense=int8"]),
         ("qwen3_moe", ["model.dtype=float32", "quant=int8", "quant.dense=int8"]),
         ("qwen2_moe", ["model.dtype=bfloat16"]),  # a gated shared expert, a dense layer, q/k/v biases
         ("mixtral_window", ["model.dtype=bfloat16", "quant=int8"]),  # sliding window, float32 router
         ("llama", ["model.dtype=bfloat16", "quant.dense=int4", "quant.group_size=32"])]


@pytest.mark.parametrize("name,overrides", CASES, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_fused_decode_matches_the_per_op_path(name, overrides, tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint(name)
    monkeypatch.setenv("KT_FUSED_DECODE", "0")
    ref_tokens, ref = _decode(kt_core.Engine.from_pretrained(path, overrides=overrides), monkeypatch)
    monkeypatch.setenv("KT_FUSED_DECODE", "1")
    engine = kt_core.Engine.from_pretrained(path, overrides=overrides)
    tokens, got = _decode(engine, monkeypatch)
    plan = getattr(engine.model, "_kt_decode_plan", None)
    assert isinstance(plan, native_layer.DecodePlan) and all(plan.takes), "every layer should take the fused call"
    assert tokens == ref_tokens
    assert len(got) == len(ref) > 0
    for a, b in zip(got, ref):
        err = float((a - b).abs().max() / b.abs().max())
        # the same kernels and roundings but for a few float32 ops the per-op path runs in torch (an
        # exp's last bit): measured up to 2.6e-5 (the sanitizer build, -O1), and 5.5e-5 on a Zen 3 EPYC
        # (avx2 variant, int8 weights: a last-bit difference upstream can move one of the int16
        # activation codes by one, 2^-15 of the row's largest value); bit-identical on AVX-512 CPUs
        assert err <= (2e-3 if "bfloat16" in overrides[0] else 1e-4), f"{name}: decode logits differ by {err:.2e}"


def _split_qkv(engine):
    """q / k / v as three projections (as a GGUF's, each in its own type), biases too."""
    for layer in engine.model.layers:
        w = layer.attn.w
        rows = w.pop("qkv_rows")
        for name, t in (("", w.pop("qkv")), ("_bias", w.pop("qkv_bias", None))):
            if t is not None:
                w.update({f"{n}{name}": part.contiguous() for n, part in zip("qkv", t.split(rows, dim=0))})
    return engine


def test_separate_q_k_v_projections(tiny_checkpoint, monkeypatch):
    path, overrides = tiny_checkpoint("qwen2_moe"), ["model.dtype=bfloat16"]
    monkeypatch.setenv("KT_FUSED_DECODE", "0")
    ref_tokens, ref = _decode(_split_qkv(kt_core.Engine.from_pretrained(path, overrides=overrides)), monkeypatch)
    monkeypatch.setenv("KT_FUSED_DECODE", "1")
    engine = _split_qkv(kt_core.Engine.from_pretrained(path, overrides=overrides))
    tokens, got = _decode(engine, monkeypatch)
    assert all(engine.model._kt_decode_plan.takes) and "q_bias" in engine.model.layers[0].attn.w
    assert tokens == ref_tokens
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref)) <= 2e-3


def test_a_layer_it_cannot_take_runs_per_op(tiny_checkpoint):
    engine = kt_core.Engine.from_pretrained(tiny_checkpoint("qwen3_moe"), overrides=["model.dtype=bfloat16"])
    engine.generate(PROMPTS[0], max_new_tokens=2, ignore_eos=True)
    plan = engine.model._kt_decode_plan
    n = len(engine.model.layers)
    assert plan.stop(0) == n
    engine.model.layers[1].ffn.recorder = lambda layer, ids: None  # routing statistics: the per-op path records them
    assert plan.stop(0) == 1 and plan.stop(1) == 1 and plan.stop(2) == n
    engine.model.layers[1].ffn.recorder = None
    # a replaced weight (an adapter, a reload) is not what the plan was built from
    w = engine.model.layers[0].attn.w
    w["o"] = w["o"].clone()
    assert plan.stop(0) == 0


def test_indices_out_of_range_are_refused_not_read(tiny_checkpoint):
    engine = kt_core.Engine.from_pretrained(tiny_checkpoint("qwen3_moe"), overrides=["model.dtype=bfloat16"])
    engine.generate(PROMPTS[0], max_new_tokens=2, ignore_eos=True)
    plan, model = engine.model._kt_decode_plan, engine.model
    h = torch.zeros(1, model.spec.hidden_size, dtype=torch.bfloat16)
    cache = plan.cache
    slots = cache.k[0].shape[0] * cache.k[0].shape[1]

    def batch(slot, seq_len, block, pos=3):
        return Batch(torch.tensor([1]), torch.tensor([pos]), torch.tensor([0, 1], dtype=torch.int32),
                     torch.tensor([seq_len], dtype=torch.int32), torch.tensor([[block]], dtype=torch.int32),
                     torch.tensor([slot]), True, torch.tensor([0]))

    assert plan.run(h, batch(0, 4, 0), 0, 1) is not None  # in range: runs
    for bad in (batch(slots, 4, 0), batch(0, 4, cache.k[0].shape[0]), batch(0, 10**6, 0),
                batch(0, 4, 0, pos=model.cos_sin.shape[0])):
        with pytest.raises(ValueError, match="out of range"):
            plan.run(h, bad, 0, 1)
    # int64 values past int32 clamp, not wrap into range (2**32 would read as block 0, 2**32 + 4 as length 4)
    for lens, tables in ((torch.tensor([4]), torch.tensor([[2**32]])), (torch.tensor([2**32 + 4]), torch.tensor([[0]]))):
        wide = Batch(torch.tensor([1]), torch.tensor([3]), torch.tensor([0, 1], dtype=torch.int32), lens, tables,
                     torch.tensor([0]), True, torch.tensor([0]))
        with pytest.raises(ValueError, match="out of range"):
            plan.run(h, wide, 0, 1)


def test_more_kv_heads_than_query_heads_is_refused_before_any_write():
    """kt_decode_layers with separate q / k / v projections wrote k's rows into a scratch sized for the
    query heads before checking Hkv against Hq (a heap overrun); the step's check refuses it first."""
    import ctypes

    from kt_backends.cpu import native, native_layer as nl
    from kt_backends.cpu.native_linear import _LinearArgs

    fn, keep = nl._lib(), []
    if fn is None:
        pytest.skip(f"native CPU kernels: {native.status()}")
    B, H, Hq, Hkv, D, I = 1, 16, 1, 64, 16, 8

    def bf16(M, K):
        w = torch.randn(M, K).bfloat16()
        keep.append(w)
        return nl._LayerLinear(1, 0, _LinearArgs(0, K, M, 0, 0, None, w.data_ptr(), None, None, None, w.numel() * 2,
                                                 None, 0, 0))

    L = nl._LayerArgs()
    L.H, L.Hq, L.Hkv, L.D, L.I_dense = H, Hq, Hkv, D, I
    L.q, L.k, L.v, L.o = bf16(Hq * D, H), bf16(Hkv * D, H), bf16(Hkv * D, H), bf16(H, Hq * D)
    L.gate_up, L.down, L.ffn = bf16(2 * I, H), bf16(H, I), 1
    norm, kc = torch.ones(H), torch.zeros(4, 4, Hkv, D)
    L.norm1 = L.norm2 = norm.data_ptr()
    L.k_cache = L.v_cache = kc.data_ptr()
    L.num_blocks, L.block_size, L.attn_scale, L.eps = 4, 4, 0.25, 1e-6
    h, pos, slots = torch.randn(B, H), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    tables, lens = torch.zeros(B, 1, dtype=torch.int32), torch.ones(B, dtype=torch.int32)
    layers, failed = (nl._LayerArgs * 1)(L), ctypes.c_int64(-1)
    step = nl._StepArgs(B, 1, 1, 0, 0, h.data_ptr(), pos.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                        lens.data_ptr(), ctypes.addressof(layers), ctypes.addressof(failed))
    assert fn(ctypes.byref(step)) == -5  # ERR_SIZE, from the step's check
