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
def test_converted_q8_0_matches_its_decoded_weights(models, tmp_path):
    from tests.gguf_writer import dequantized_folder

    folder = models("qwen3_moe")
    path = convert(folder, tmp_path / "m-q8_0.gguf", "q8_0")
    ref = dequantized_folder(path, folder, tmp_path / "ref")
    ids = list(range(300, 324))
    _, got = _logits(path, ids, "float32")
    _, want = _logits(ref, ids, "float32")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
