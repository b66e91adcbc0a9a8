"""GGUF files as model.path: kt-core's logits on a GGUF match kt-core's on the safetensors it came
from (F32: to float rounding; quantized: the checkpoint of what the blocks decode to, decoded by
the gguf package), for every architecture the GGUF reader maps; bad files fail with the file."""
from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("gguf")

from kt_core.errors import KtError  # noqa: E402
from kt_core.runtime.engine import Engine  # noqa: E402
from tests.gguf_writer import dequantized_folder, write_gguf  # noqa: E402
from tests.parity.tiny import build  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v2_greedy",
         "deepseek_v3", "deepseek_v3_yarn", "gpt_oss"]
IDS = [3, 17, 42, 5, 88, 61, 9, 30, 77, 12, 50, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name) / "hf")
        return cache[name]
    return get


def logits(path, dtype="float32", extra=()):
    return Engine.from_pretrained(str(path), overrides=[f"model.dtype={dtype}", *extra]).logits(IDS)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_matches_safetensors(tiny, tmp_path, arch):
    hf = tiny(arch)
    path = write_gguf(hf, tmp_path / f"{arch}.gguf")
    torch.testing.assert_close(logits(path), logits(hf), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,qtype", [("qwen3_moe", "Q4_0"), ("mixtral", "Q4_1"), ("qwen2_moe", "Q8_0"),
                                        ("llama", "Q4_0"), ("deepseek_v3", "Q8_0"), ("deepseek_v2", "Q4_0"),
                                        ("gpt_oss", "Q8_0"), ("gpt_oss", "MXFP4"), ("qwen3_moe", "Q5_1")])
def test_quantized_gguf_matches_its_decoded_weights(tiny, tmp_path, arch, qtype):
    """Q4_0 / Q4_1 are kept as int4 groups, Q8_0 / MXFP4 as int8 groups, Q5_1 as int8 groups with zero
    points (native kernels on the CPU); either way the model must compute what the gguf package decodes
    the blocks to."""
    hf = tiny(arch)
    path = write_gguf(hf, tmp_path / f"{arch}-{qtype}.gguf", qtype)
    ref = dequantized_folder(path, hf, tmp_path / "ref")
    got, want = logits(path), logits(ref)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert not torch.allclose(want, logits(hf), atol=1e-3), "the quantization should change the logits"


def test_deepseek_kv_b_of_older_converters(tiny, tmp_path):
    """Converters before MLA absorption wrote kv_b_proj whole (attn_kv_b), not as attn_k_b + attn_v_b."""
    import gguf

    hf = tiny("deepseek_v2_greedy")
    path = write_gguf(hf, tmp_path / "old.gguf", split_kv_b=False)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "blk.0.attn_kv_b.weight" in names and "blk.0.attn_k_b.weight" not in names
    torch.testing.assert_close(logits(path), logits(hf), rtol=1e-4, atol=1e-4)


SAME = ("family", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "moe", "moe_layers", "mla",
        "softmax_scale", "sinks", "qkv_bias", "o_bias", "sliding_window", "tie_embeddings")


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v2_greedy", "deepseek_v3", "deepseek_v3_yarn", "gpt_oss",
                                  "gpt_oss_full"])
def test_gguf_spec_is_the_folders(tiny, tmp_path, arch):
    """Routing (V2 softmax / V3 sigmoid + bias, groups, scaling, shared experts, dense layers), MLA
    sizes, yarn and gpt-oss's windows come back from the metadata as the config.json has them."""
    import json

    from kt_core.models.spec import parse_config
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

    hf = tiny(arch)
    got = parse_config(GGUFCheckpoint(write_gguf(hf, tmp_path / "m.gguf")).config)
    want = parse_config(json.loads((hf / "config.json").read_text()))
    assert {k: getattr(got, k) for k in SAME} == {k: getattr(want, k) for k in SAME}
    assert (got.rope.kind, got.rope.rot_dim, got.rope.interleaved) == (want.rope.kind, want.rope.rot_dim,
                                                                       want.rope.interleaved)
    torch.testing.assert_close(got.rope.inv_freq()[0], want.rope.inv_freq()[0])
    assert got.rope.inv_freq()[1] == pytest.approx(want.rope.inv_freq()[1])
    # GGUF has no per-layer types for gpt-oss: llama.cpp alternates, sliding first (gpt_oss_full is not)
    assert got.layer_types == (["sliding", "full", "sliding"] if arch.startswith("gpt_oss") else [])


DS2 = {"block_count": 2, "embedding_length": 64, "attention.head_count": 4, "expert_count": 8, "expert_used_count": 2,
       "attention.kv_lora_rank": 32, "rope.dimension_count": 8, "attention.key_length": 24,
       "attention.value_length": 16, "expert_feed_forward_length": 32}


def _config(arch, meta, extra=()):
    from kt_core.weights.gguf_arch import hf_config

    shapes = {n: (96, 64) for n in ("token_embd.weight", *extra)}
    return hf_config(arch, lambda k, d=None: meta.get(k[len(arch) + 1:], d) if k.startswith(arch + ".") else d, shapes)


def test_deepseek2_metadata_variants():
    bias = ["blk.1.exp_probs_b.bias"]
    c = _config("deepseek2", DS2)  # no gating func, no bias: V2; old key/value_length (no _mla) are the heads
    assert c["architectures"] == ["DeepseekV2ForCausalLM"] and c["topk_method"] == "greedy"
    assert (c["qk_nope_head_dim"], c["v_head_dim"], c["q_lora_rank"]) == (16, 16, None)
    c = _config("deepseek2", {**DS2, "expert_group_count": 4, "expert_group_used_count": 2})
    assert c["topk_method"] == "group_limited_greedy" and (c["n_group"], c["topk_group"]) == (4, 2)
    c = _config("deepseek2", {**DS2, "expert_gating_func": 2, "attention.key_length": 40,
                              "attention.key_length_mla": 24, "attention.q_lora_rank": 48}, bias)
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and (c["qk_nope_head_dim"], c["q_lora_rank"]) == (16, 48)
    with pytest.raises(KtError, match="sigmoid .* no exp_probs_b"):
        _config("deepseek2", {**DS2, "expert_gating_func": 2})
    with pytest.raises(KtError, match="softmax .*exp_probs_b"):
        _config("deepseek2", {**DS2, "expert_gating_func": 1}, bias)
    with pytest.raises(KtError, match="expert_gating_func=4 is not supported"):
        _config("deepseek2", {**DS2, "expert_gating_func": 4})
    with pytest.raises(KtError, match="deepseek2 GGUF without experts"):
        _config("deepseek2", {**DS2, "expert_count": 0})


def test_sizes_read_from_the_header_are_bounded_before_any_loop():
    """A layer or expert count the loader would loop over is checked first (10^12 layers ran for minutes
    and GBs), and a tensor it indexes must have the dims it indexes."""
    import time

    from kt_core.weights.gguf_arch import hf_config, tensor_names

    t = time.perf_counter()
    for bad in ({"block_count": 10**12}, {"block_count": "2"}, {"expert_count": 2**31 - 1}):
        with pytest.raises(KtError, match="the file is damaged"):
            _config("deepseek2", {**DS2, **bad})
    assert time.perf_counter() - t < 5
    meta = lambda k, d=None: DS2.get(k[len("deepseek2") + 1:], d) if k.startswith("deepseek2.") else d  # noqa: E731
    with pytest.raises(KtError, match="token_embd.weight has shape"):
        hf_config("deepseek2", meta, {"token_embd.weight": ()})
    config = _config("deepseek2", DS2)
    for shape in ((0, 4, 10**12), (8,)):
        with pytest.raises(KtError, match="ffn_gate_exps.weight has shape"):
            tensor_names(config, "deepseek2", ["blk.0.ffn_gate_exps.weight"], {"blk.0.ffn_gate_exps.weight": shape})


def test_gpt_oss_unsupported_metadata_and_mxfp4_experts(tmp_path):
    import gguf
    import numpy as np

    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

    oss = {"block_count": 1, "embedding_length": 64, "attention.head_count": 4, "expert_count": 2,
           "expert_used_count": 1, "attention.sliding_window": 8, "expert_feed_forward_length": 32}
    with pytest.raises(KtError, match="swiglu_clamp_exp=.* not supported"):
        _config("gpt-oss", {**oss, "swiglu_clamp_exp": [10.0]})
    path = tmp_path / "mx.gguf"  # llama.cpp's gpt-oss experts are MXFP4 (block 32: a scale byte, 16 code bytes)
    w = gguf.GGUFWriter(path, "gpt-oss")
    for key, v in oss.items():
        w.add_uint32(f"gpt-oss.{key}", v)
    w.add_tensor("token_embd.weight", np.zeros((96, 64), np.float32))
    for part in ("gate", "up"):
        w.add_tensor(f"blk.0.ffn_{part}_exps.weight", np.zeros((2, 32, 2 * 17), np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = GGUFCheckpoint(path)
    assert tuple(ck.get("model.layers.0.mlp.experts.gate_up_proj").shape) == (2, 64, 64)
    w = ck.quantized("model.layers.0.mlp.experts.1.gate_proj.weight")  # kept: int8 codes, a scale per 32
    assert w.format.value == "int8" and w.group_size == 32 and tuple(w.shape) == (32, 64)


def test_a_layer_with_down_in_another_type_is_kept(tiny, tmp_path):
    """Q4_K_M's recipe: int4 gate / up with an 8-bit down (here Q4_1 and Q8_0): one native call
    holds both, and the model computes what the blocks decode to."""
    path = write_gguf(tiny("qwen3_moe"), tmp_path / "m.gguf", "Q4_1", types={"ffn_down_exps": "Q8_0"})
    eng = Engine.from_pretrained(str(path), overrides=["model.dtype=float32"])
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    packed = moe.shards[0][2]
    assert (packed.fmt, packed.down_fmt) == ("int4", "int8")  # down: 32 inputs, so one group a row
    ref = dequantized_folder(path, tiny("qwen3_moe"), tmp_path / "ref")
    want = logits(ref)
    torch.testing.assert_close(eng.logits(IDS), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))


def test_int4_blocks_are_kept_not_decoded(tiny, tmp_path):
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint
    from kt_core.weights.quant import Quant

    path = write_gguf(tiny("qwen3_moe"), tmp_path / "m.gguf", "Q4_0")
    eng = Engine.from_pretrained(str(path), overrides=["model.dtype=float32"])
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    ck = GGUFCheckpoint(path)
    assert ck.gguf_type("model.layers.1.mlp.experts.0.gate_proj.weight") == "Q4_0"
    w = ck.quantized("model.layers.1.mlp.experts.0.gate_proj.weight")
    assert w.format is Quant.INT4 and w.group_size == 32 and w.zeros is None
    assert moe.shards, "the MoE layer holds its experts"
    assert eng.model.weight_bytes() < 0.6 * Engine.from_pretrained(
        str(tiny("qwen3_moe")), overrides=["model.dtype=float32"]).model.weight_bytes()


def test_q5_k_blocks_are_kept_as_int8_with_zero_points(tmp_path):
    """Q5_K (Q5_K_M's main type; widths of whole 256-element super-blocks here) is kept as grouped int8
    with a zero point per 32 (x = d*sc*q - dmin*m exactly), runs in the native kernels with the zero
    points, and the model computes what the gguf package decodes the blocks to."""
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint
    from kt_core.weights.quant import Quant

    hf = build("qwen3_moe", tmp_path / "hf", shape=dict(hidden_size=256, moe_intermediate_size=256,
                                                        intermediate_size=256))
    path = write_gguf(hf, tmp_path / "m.gguf", "Q5_K")
    w = GGUFCheckpoint(path).quantized("model.layers.1.mlp.experts.1.gate_proj.weight")
    assert w.format is Quant.INT8 and w.group_size == 32 and w.zeros is not None
    eng = Engine.from_pretrained(str(path), overrides=["model.dtype=float32"])
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    packed = moe.shards[0][2]
    if packed is not None:  # native kernels built: they take the zero points
        assert packed.fmt == packed.down_fmt == "int8" and packed.gate.zero is not None
    want = logits(dequantized_folder(path, hf, tmp_path / "ref"))
    torch.testing.assert_close(eng.logits(IDS), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert not torch.allclose(want, logits(hf), atol=1e-3), "the quantization should change the logits"


def test_split_files_load_as_one(tiny, tmp_path):
    hf = tiny("qwen3")
    write_gguf(hf, tmp_path / "m.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) > 2
    torch.testing.assert_close(logits(parts[1]), logits(hf), rtol=1e-4, atol=1e-4)
    parts[-1].unlink()
    with pytest.raises(KtError, match=r"split GGUF.*missing"):
        logits(parts[0])


def test_kt_plan_reads_the_header_only(tiny, tmp_path):
    from kt_core.commands.plan import model_spec
    from kt_core.config import compose

    path = write_gguf(tiny("qwen2_moe"), tmp_path / "m.gguf", "Q4_0")
    spec = model_spec(compose([f"model.path={path}"]))
    assert spec.family == "qwen2_moe" and spec.moe.num_experts == 8 and spec.moe.shared_intermediate == 48
    assert spec.moe_layers == frozenset({0, 2})  # layer 1 is dense (mlp_only_layers), as in the file


def test_plan_counts_what_the_file_keeps(tiny, tmp_path):
    """The planner sizes kept weights as kept (int4 / int8 groups), not in model.dtype."""
    from kt_core.commands.plan import stored_tensors, model_spec
    from kt_core.config import compose
    from kt_core.config.validate import resolve_topology
    from kt_core.placement.plan import make_plan

    def weights(path):
        cfg = compose([f"model.path={path}", "model.dtype=float32"])
        spec = model_spec(cfg)
        plan = make_plan(spec, cfg, resolve_topology(cfg, check_devices=False), enforce_fit=False,
                         tensors=stored_tensors(cfg, spec))
        return sum(d.weights_bytes for d in plan.devices.values())

    hf = tiny("qwen3_moe")
    f32, q4 = weights(write_gguf(hf, tmp_path / "a.gguf")), weights(write_gguf(hf, tmp_path / "b.gguf", "Q4_0"))
    eng = Engine.from_pretrained(str(tmp_path / "b.gguf"), overrides=["model.dtype=float32"])
    assert q4 < 0.6 * f32
    assert abs(q4 - eng.model.weight_bytes()) < 0.1 * q4  # the plan says what the load holds


def test_quant_settings_requantize_what_they_name(tiny, tmp_path):
    """A GGUF's quantization is kept unless quant.* names a format for that group: quant=int4 on a
    Q8_0 file requantizes the experts (attention and lm_head stay the file's int8)."""
    from kt_core.weights.quant import Quant

    path = write_gguf(tiny("qwen3_moe"), tmp_path / "m.gguf", "Q8_0")
    eng = Engine.from_pretrained(str(path), overrides=["model.dtype=float32", "quant=int4", "quant.group_size=32"])
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    _, _, packed = moe.shards[0]
    assert getattr(packed, "fmt", None) == "int4"
    q = eng.model.layers[0].attn.w["q"]
    assert getattr(q, "fmt", getattr(q, "format", None)) in ("int8", Quant.INT8)


def test_kt_quantize_requantizes_a_gguf(tiny, tmp_path):
    """kt quantize writes quant.experts' format (not the file's own), and a load maps it back."""
    from kt_core.commands import quantize

    path = write_gguf(tiny("qwen3_moe"), tmp_path / "m-00001-of-00001.gguf", "Q4_0")
    assert quantize.run([f"model.path={path}", "quant=int4", "quant.symmetric=false", "quant.group_size=32"], {}) == 0
    ktq = tmp_path / "m.kt-experts-int4-g32-asym.ktq"  # named without the split suffix
    assert ktq.is_file()
    eng = Engine.from_pretrained(str(path), overrides=["model.dtype=float32", "quant=int4", "quant.symmetric=false",
                                                       "quant.group_size=32"])
    assert eng.model.prequant is not None and eng.logits(IDS).isfinite().all()


def test_eos_ids_include_end_of_turn_controls(tiny, tmp_path):
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

    tokens = [f"t{i}" for i in range(96)]
    tokens[5], tokens[6], tokens[7] = "<|im_end|>", "<|endoftext|>", "<|im_end|>x"
    types = [1] * 96
    types[5] = types[6] = 3
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": 6, "tokenizer.ggml.eot_token_id": 9}
    path = write_gguf(tiny("qwen3"), tmp_path / "m.gguf", tokenizer=meta)
    assert GGUFCheckpoint(path).eos_ids() == (6, 9, 5)


def test_truncated_file_names_file_and_offset(tiny, tmp_path):
    path = write_gguf(tiny("qwen3"), tmp_path / "m.gguf")
    data = path.read_bytes()
    for cut in (30, 200, len(data) // 2, len(data) - 5):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(KtError, match=rf"cut{cut}\.gguf is truncated or corrupt: .* at offset \d+"):
            logits(bad)


def test_corrupt_files_fail_cleanly(tiny, tmp_path):
    path = write_gguf(tiny("qwen3"), tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(KtError, match="not a GGUF file"):
        logits(not_gguf)
    bad_version = tmp_path / "v.gguf"
    bad_version.write_bytes(bytes(data[:4]) + (99).to_bytes(4, "little") + bytes(data[8:]))
    with pytest.raises(KtError, match="v.gguf is not a GGUF file kt-core can read"):
        logits(bad_version)


def test_unknown_architecture_names_the_supported_ones(tiny, tmp_path):
    import gguf

    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(path, "rwkv7")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KtError, match=r"GGUF architecture 'rwkv7' is not supported; .*qwen3moe"):
        logits(path)


def test_missing_file_and_bad_suffix_folder(tmp_path):
    with pytest.raises(Exception, match="does not exist|not found"):
        logits(tmp_path / "nope.gguf")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_experts_down_in_its_own_format(tiny, tmp_path):
    """quant.experts_down: the experts' down projections in another format than gate / up (Q4_K_M's
    recipe), one native call; kt quantize refuses it rather than write a file it cannot name."""
    from kt_core.commands import quantize

    hf = tiny("qwen3_moe")
    ov = ["model.dtype=float32", "quant=int4", "quant.group_size=32"]
    eng = Engine.from_pretrained(str(hf), overrides=[*ov, "quant.experts_down=int8"])
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    assert (moe.shards[0][2].fmt, moe.shards[0][2].down_fmt) == ("int4", "int8")
    mixed, int4, ref = eng.logits(IDS), logits(hf, extra=ov), logits(hf)
    assert (mixed - ref).abs().max() < (int4 - ref).abs().max()  # 8-bit downs lose less than 4-bit ones
    with pytest.raises(KtError, match="experts_down"):
        quantize.run([f"model.path={hf}", *ov, "quant.experts_down=int8"], {})


@pytest.mark.parametrize("qtype", ["BF16", "F16"])
def test_float_files_read_straight_into_the_dtype_asked(tiny, tmp_path, qtype, monkeypatch):
    """A float GGUF's tensors asked for in a dtype skip the float32 copy (a bf16 model from a BF16
    file: never 2x its largest tensor), and hold the same values as through float32 (kv_b joined)."""
    from kt_core.weights import gguf_blocks
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

    path = write_gguf(tiny("deepseek_v3"), tmp_path / f"m-{qtype}.gguf", qtype)
    ck = GGUFCheckpoint(path)
    names = [n for n in ck.keys() if ck.gguf_type(n) == qtype]
    assert any("kv_b_proj" in n for n in names) and any("embed_tokens" in n for n in names)
    via32 = {n: ck.get(n).to(torch.bfloat16) for n in names}
    decode = gguf_blocks.dequantize

    def no_float32(raw, qt, shape, dtype=None):
        raise AssertionError(f"{qtype} decoded through float32")
    monkeypatch.setattr(gguf_blocks, "dequantize", no_float32)
    for name in names:
        direct = ck.get(name, None, torch.bfloat16)
        assert direct.dtype == torch.bfloat16 and torch.equal(direct, via32[name]), name
    monkeypatch.setattr(gguf_blocks, "dequantize", decode)
    assert ck.get("model.layers.0.self_attn.kv_b_proj.weight", None, torch.float32).dtype == torch.float32
    if qtype == "BF16":  # the same bf16 values as the safetensors folder rounded to bf16
        torch.testing.assert_close(logits(path, "bfloat16"), logits(tiny("deepseek_v3"), "bfloat16"), rtol=0, atol=0)


def test_block_types_decode_chunkwise_into_the_dtype_asked(tiny, tmp_path):
    """A Q8_0 embedding read for a bf16 model is rounded chunk by chunk (no float32 copy of it):
    the same values as decoding to float32 and rounding after."""
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

    ck = GGUFCheckpoint(write_gguf(tiny("qwen3_moe"), tmp_path / "m.gguf", "Q8_0"))
    name = "model.embed_tokens.weight"
    assert ck.gguf_type(name) == "Q8_0"
    got = ck.get(name, None, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ck.get(name).to(torch.bfloat16))
