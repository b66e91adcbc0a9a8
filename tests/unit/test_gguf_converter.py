"""GGUF files written by llama.cpp's own converter (convert_hf_to_gguf.py, fetched by
tests/fetch_converter.py into $KT_LLAMACPP_SRC; .ci/run does it): kt-core on the GGUF computes what it
computes on the safetensors folder the file came from, and the tokenizer built from the GGUF's
metadata gives the folder tokenizer's ids and chat prompt."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

CONVERTER = Path(os.environ.get("KT_LLAMACPP_SRC", "")) / "convert_hf_to_gguf.py"
needs_converter = pytest.mark.skipif(not os.environ.get("KT_LLAMACPP_SRC") or not CONVERTER.is_file(),
                                     reason="llama.cpp's converter is not fetched: run python tests/fetch_converter.py "
                                            "DIR and set KT_LLAMACPP_SRC=DIR")
TEXTS = ["Hello world", "  leading spaces and trailing  ", "line\nbreaks\r\nand\ttabs", "1234567 + 89 = ?",
         "don't we'll I'm", "日本語のテキスト 中文", "emoji 🙂🚀 ok", "naïve café Ωmega", "def f(x):\n    return x**2",
         "<|im_start|>user inline special", "", " ", "a" * 40]
MODELS = {  # synthetic checkpoints with real tokenizers: (arch, preset, tokenizer, shape)
    "qwen3_moe": ("qwen3_moe", "tiny-qwen3-moe", "qwen", None),
    "mixtral": ("mixtral", "mixtral-8x7b", "mistral", dict(hidden_size=256, intermediate_size=256,
                                                          num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    # MLA (kv_b_proj written as attn_k_b + attn_v_b), sigmoid routing with exp_probs_b, groups, yarn, a dense layer;
    # every MLA size distinct so a mixed-up dimension cannot pass
    "deepseek_v3": ("deepseek_v3", "deepseek-v3", "deepseek",
                    dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                         n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=64,
                         kv_lora_rank=128, q_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=32)),
    # Llama-3.1's rope scaling, which the converter bakes into a rope_freqs tensor of per-frequency divisors
    "llama31": ("llama", "llama-3-8b", "qwen", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                                                   rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 32})),
    # sinks, biases, BF16 experts split by the converter into gate / up / down (+ biases), a window the ids pass
    "gpt_oss": ("gpt_oss", "gpt-oss-20b", "qwen", dict(hidden_size=128, intermediate_size=96, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=32, num_local_experts=4,
                                                      num_experts_per_tok=2, sliding_window=8)),
}


def convert(folder: Path, out: Path, outtype: str) -> Path:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, str(CONVERTER), str(folder), "--outtype", outtype, "--outfile", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from kt_core.models.synthetic import synthesize

    made = {}

    def get(name):
        if name not in made:
            arch, preset, tok, shape = MODELS[name]
            out = tmp_path_factory.mktemp(name) / "hf"
            synthesize(out, arch=arch, preset=preset, layers=2, tokenizer=tok, sample_tokens=16, shape=shape)
            made[name] = out
        return made[name]
    return get


def _logits(path, ids, dtype):
    from kt_core.runtime.engine import Engine

    eng = Engine.from_pretrained(str(path), overrides=[f"model.dtype={dtype}"])
    return eng, eng.logits(ids)


@needs_converter
@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_gguf_matches_its_folder(models, tmp_path, name):
    folder = models(name)
    path = convert(folder, tmp_path / "m-bf16.gguf", "bf16")
    ids = list(range(200, 232))
    eng_f, want = _logits(folder, ids, "float32")
    eng_g, got = _logits(path, ids, "float32")  # the folder is bf16: the BF16 GGUF holds the same numbers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    tok_f, tok_g = eng_f.tokenizer, eng_g.tokenizer
    assert tok_g is not None
    for text in TEXTS:
        assert tok_g.encode(text) == tok_f.encode(text), text
        assert tok_g.decode(tok_f.encode(text, add_special_tokens=False)) == \
            tok_f.decode(tok_f.encode(text, add_special_tokens=False))
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert tok_g.apply_chat_template(chat) == tok_f.apply_chat_template(chat)
    assert set(eng_g.spec.eos_token_ids) & set(eng_f.spec.eos_token_ids)


@needs_converter
@pytest.mark.parametrize("name,tol", [("qwen3_moe", 5e-4), ("deepseek_v3", 1e-3)])
def test_converted_q8_0_matches_its_decoded_weights(models, tmp_path, name, tol):
    """Every checkpoint tensor read from the GGUF (experts sliced, MLA's kv_b_proj joined from
    attn_k_b + attn_v_b) is exactly what the gguf package decodes; the logits match those of the
    decoded folder to the int8 kernels' rounding (Q8_0 weights the loader keeps as int8 groups go through
    the int8 kernels, whose activations are int16 codes; qwen3_moe measured 1.4e-4 of the logits' range
    at most, deepseek_v3 more)."""
    from safetensors.torch import load_file

    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint
    from tests.gguf_writer import dequantized_folder

    folder = models(name)
    path = convert(folder, tmp_path / "m-q8_0.gguf", "q8_0")
    ref = dequantized_folder(path, folder, tmp_path / "ref")
    ck = GGUFCheckpoint(path)
    for k, v in load_file(str(ref / "model.safetensors")).items():
        assert torch.equal(ck.get(k), v), k
    ids = list(range(300, 324))
    _, got = _logits(path, ids, "float32")
    _, want = _logits(ref, ids, "float32")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


LLAMA_TOKENIZE = os.environ.get("KT_LLAMA_TOKENIZE", "")
TRICKY = ["   three leading", "trailing   ", "a\r\nb\r\n\r\n", "\t\tindented\tcode", "I'm, you're, I'VE, WE'LL",
          "1234567 3.14159 1,234,567.89", "数字 123456 中文文本，标点。", "émojis 🤖🚀 👨‍👩‍👧‍👦 😶‍🌫️",
          "naïve café Ωμέγα Привет", "if (a != b && c <= d) { x->y[0] += 1; }", " \n \n\n \t \t\t \t\n  \n",
          "<|im_start|>user\nhi<|im_end|>\n", "a" * 50]
# where llama.cpp departs from the model's own tokenizer.json (kt-core follows tokenizer.json): Qwen's
# NFC normalizer, which llama.cpp does not apply
HF_ONLY = {"qwen3_moe": ["e\u0301 decomposed accent"]}


@needs_converter
@pytest.mark.skipif(not Path(LLAMA_TOKENIZE).is_file(), reason="no llama-tokenize: set KT_LLAMA_TOKENIZE to the "
                    "binary (cmake --build BUILD --target llama-tokenize in ../shared/tools/llamacpp's build)")
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_token_ids_equal_llama_cpp_tokenizer(models, tmp_path, name):
    """The tokenizer built from a GGUF's metadata gives llama.cpp's own ids for that file."""
    import ast

    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint

    path = convert(models(name), tmp_path / "m.gguf", "bf16")
    tok = GGUFCheckpoint(path).tokenizer()
    for i, text in enumerate(TRICKY + HF_ONLY.get(name, [])):
        f = tmp_path / f"t{i}.txt"
        f.write_bytes(text.encode("utf-8"))
        r = subprocess.run([LLAMA_TOKENIZE, "-m", str(path), "-f", str(f), "--ids", "--log-disable"],
                           capture_output=True, text=True, timeout=120)
        theirs = ast.literal_eval([line for line in r.stdout.splitlines() if line.startswith("[")][-1])
        if text in HF_ONLY.get(name, []):
            assert theirs != tok.encode(text), "llama.cpp now normalizes like tokenizer.json: drop it from HF_ONLY"
        else:
            assert tok.encode(text) == theirs, text


LLAMA_QUANTIZE = os.environ.get("KT_LLAMA_QUANTIZE", "")
# llama-quantize's recipes; the types each keeps the experts in (what kt-core must hold exactly)
RECIPES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q4_K_M": "Q4_K",
           "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL"}


@needs_converter
@pytest.mark.skipif(not Path(LLAMA_QUANTIZE).is_file(), reason="no llama-quantize: set KT_LLAMA_QUANTIZE to the "
                    "binary (../shared/tools/llamacpp's build)")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_llama_quantize_types_are_kept_and_match_their_decoded_weights(models, tmp_path, recipe):
    """llama.cpp's own quantizer on its converter's file (Mixtral-shaped, widths of whole 256-element
    super-blocks): the experts stay in the file's type (no decode to floats), run in the native kernels,
    and the logits are those of the folder the gguf package decodes the blocks to."""
    from kt_core.weights.gguf_checkpoint import GGUFCheckpoint
    from tests.gguf_writer import dequantized_folder

    folder = models("mixtral")
    src = convert(folder, tmp_path / "m-f32.gguf", "f32")
    path = tmp_path / f"m-{recipe}.gguf"
    r = subprocess.run([LLAMA_QUANTIZE, str(src), str(path), recipe], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = GGUFCheckpoint(path)
    gate = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    assert ck.gguf_type(gate) == RECIPES[recipe] and ck.quantized(gate) is not None, ck.gguf_type(gate)
    ids = list(range(300, 324))
    eng, got = _logits(path, ids, "float32")
    moe = next(layer.ffn for layer in eng.model.layers if hasattr(layer.ffn, "shards"))
    from kt_backends.cpu import native
    if native.available():
        assert moe.shards[0][2] is not None, "the kept experts run in the native kernels"
    _, want = _logits(dequantized_folder(path, folder, tmp_path / "ref"), ids, "float32")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
