"""A Tokenizer built from GGUF metadata encodes and decodes exactly like the HF tokenizer.json the
metadata was converted from. The metadata is written here the way llama.cpp's convert_hf_to_gguf.py
writes it (tokens in id order, token types, merges or scores, pre-tokenizer name, special ids,
add_bos/add_eos, chat template); when llama.cpp's converter is fetched into $KT_LLAMACPP_SRC
(tests/fetch_converter.py; .ci/run does it), its own vocab code writes it too."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kt_core.errors import KtError
from kt_core.models.gguf_tokenizer import PRE_TOKENIZERS, tokenizer_from_gguf
from kt_core.models.tokenizer import Tokenizer
from kt_core.models.tokenizer_sources import _byte_chars, write_tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
K = "tokenizer.ggml."
PRE = {"qwen": "qwen2", "deepseek": "deepseek-v3"}  # what the converter's chkhsh table names them
LLAMA_CPP = Path(os.environ.get("KT_LLAMACPP_SRC") or "no-converter")

TEXTS = ["", " ", "   ", "\n", "\n\n\n", "\r\n", "a\r\nb\r\n\r\n", "\t", "\t\tindented\tcode",
         " leading space", "   three leading", "trailing   ", "multiple     spaces   inside",
         "Hello, world! How's it going?", "I'm, you're, we'll, they'd, it's, I'VE, WE'LL, don't",
         "1234567 12 123 1234 3.14159 1,234,567.89 007", "数字 123456 中文文本，标点。", "日本語のテキスト、カタカナ",
         "한국어 텍스트", "émojis 🤖🚀 👨‍👩‍👧‍👦 ✅ 🦙🦙 😶‍🌫️", "ÀÉÎÕÜ naïve café façade Ωμέγα Привет",
         "e\u0301 decomposed accent", "def f(x):\n    return x**2  # comment\n\n\nclass A: pass",
         "if (a != b && c <= d) { x->y[0] += 1; }", "''''''```````\"\"\"\"......!!!!!!??????",
         "------======= ~~~ ///", "a" * 50, " \n \n\n \t \t\t \t\n  \n   \n    \n     \n"]
SPECIAL_TEXTS = {"qwen": ["<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y", " <|im_end|> "],
                 "deepseek": ["<｜begin▁of▁sentence｜>hi<｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>",
                              " <｜User｜> spaced "],
                 "mistral": ["<s>[INST] hi [/INST]answer</s>", "x<s>y", "a </s> <unk> b"]}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what's 2+2?"}]


def _looks_special(text):  # the converter's does_token_look_special
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _specials(meta, cfg, ids):
    """Special ids from tokenizer_config.json, add_bos/add_eos and the chat template, as SpecialVocab does."""
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        text = cfg.get(f"{typ}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text in ids:
            meta[K + key] = ids[text]
    for typ in ("bos", "eos"):
        if f"add_{typ}_token" in cfg:
            meta[K + f"add_{typ}_token"] = cfg[f"add_{typ}_token"]
    if cfg.get("chat_template"):
        meta["tokenizer.chat_template"] = cfg["chat_template"]
    return meta


def bpe_metadata(folder: Path, pre: str) -> dict:
    """GGUF metadata for a byte-level BPE tokenizer.json (the converter's _set_vocab_gpt2)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    model = json.loads((folder / "tokenizer.json").read_text("utf-8"))["model"]
    cfg = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    vocab = hf.get_vocab(with_added_tokens=True)
    by_id, added = {i: t for t, i in vocab.items()}, hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(max(vocab.values()) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text, kind = by_id[i], NORMAL
        if i in added:
            if not added[i].normalized:
                text = hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or _looks_special(text):
                kind = CONTROL
            else:
                text, kind = text.replace("\u2581", " "), USER_DEFINED
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = {K + "model": "gpt2", K + "pre": pre, K + "tokens": tokens, K + "token_type": types, K + "merges": merges}
    return _specials(meta, cfg, vocab)


def _sentencepiece_model() -> Path:
    package = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0])
    return package / "data" / "tokenizer.model.v1"


def spm_metadata(folder: Path) -> dict:
    """GGUF metadata for a SentencePiece model (the converter's _set_vocab_sentencepiece)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(_sentencepiece_model()))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                     else BYTE if sp.is_byte(i) else NORMAL)
    cfg = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    meta = {K + "model": "llama", K + "pre": "default", K + "tokens": tokens, K + "scores": scores,
            K + "token_type": types}
    return _specials(meta, cfg, {t: i for i, t in enumerate(tokens)})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> (name, folder, GGUF metadata, HF tokenizer), made once per module."""
    from tokenizers import Tokenizer as HFTokenizer

    made = {}

    def build(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            write_tokenizer(name, folder)
            meta = spm_metadata(folder) if name == "mistral" else bpe_metadata(folder, PRE[name])
            made[name] = name, folder, meta, HFTokenizer.from_file(str(folder / "tokenizer.json"))
        return made[name]
    return build


@pytest.fixture(params=["qwen", "deepseek", "mistral"])
def case(request, built):
    return built(request.param)


def assert_same(tok, hf, texts, label=""):
    for text in texts:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special).ids, (label, text, special)
            assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), (label, text)


def test_encodes_and_decodes_like_the_hf_tokenizer(case):
    name, _, meta, hf = case
    tok = tokenizer_from_gguf(meta)
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True) == len(meta[K + "tokens"])
    assert_same(tok, hf, TEXTS + SPECIAL_TEXTS[name], name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), (name, text)
        if name != "qwen" or text.isascii() or "\u0301" not in text:  # qwen NFC-normalizes, as its tokenizer.json
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, (name, text)


def test_every_token_encodes_like_the_hf_tokenizer(case):
    """Each token's own text (and with a space before it) encodes to the same ids: merges, byte
    fallback and ignore_merges all agree, not only on the corpus."""
    name, _, meta, hf = case
    tok = tokenizer_from_gguf(meta)
    texts = [hf.decode([i], skip_special_tokens=False) for i in range(hf.get_vocab_size(with_added_tokens=True))]
    texts = [t for t in texts if "\ufffd" not in t]
    texts += [" " + t for t in texts[::7]]
    ours = [e.ids for e in tok._tk.encode_batch(texts)]
    theirs = [e.ids for e in hf.encode_batch(texts)]
    bad = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not bad, (name, len(bad), bad[:5])


def test_special_tokens_flags_and_chat_template(case):
    name, folder, meta, _ = case
    tok, ref = tokenizer_from_gguf(meta), Tokenizer.from_dir(folder)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == \
        (ref.bos_token, ref.eos_token, ref.bos_token_id, ref.eos_token_id)
    assert tok.config["add_bos_token"] is (name == "mistral") and tok.config["add_eos_token"] is False
    if name == "mistral":
        assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
        assert tok.config["unk_token"] == "<unk>"
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == \
            ref.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    prompt = tok.apply_chat_template(MESSAGES)
    assert tok.encode(prompt, add_special_tokens=False) == ref.encode(prompt, add_special_tokens=False)


def test_llama_without_space_prefix(built):
    """tokenizer.ggml.add_space_prefix=false: no dummy "▁" in front (llama.cpp's add_space_prefix)."""
    from tokenizers import decoders, normalizers

    name, _, meta, hf = built("mistral")
    tok = tokenizer_from_gguf({**meta, K + "add_space_prefix": False})
    hf = type(hf).from_str(hf.to_str())
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert_same(tok, hf, TEXTS + SPECIAL_TEXTS[name], "no prefix")
    assert tok.encode("hi", add_special_tokens=False) != \
        tokenizer_from_gguf(meta).encode("hi", add_special_tokens=False)


# llama.cpp's own forms of the regexes (src/llama-vocab.cpp), run with Python's `regex`, split text into
# the same pieces as our pre-tokenizers (which use the tokenizer.json forms, run by HF tokenizers)
_C = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_L3 = _C + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_UP, _LO = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
LLAMA_CPP_FORMS = {
    "llama-bpe": [_L3], "qwen2": [_L3.replace(r"\p{N}{1,3}", r"\p{N}")],
    "qwen35": [_C + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-4o": [rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+{_C}?|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*{_C}?|\p{{N}}{{1,3}}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "tekken": [rf"[^\r\n\p{{L}}\p{{N}}]?{_UP}*{_LO}+|[^\r\n\p{{L}}\p{{N}}]?{_UP}+{_LO}*|\p{{N}}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-2": [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
}
for _name in ("deepseek-v3", "deepseek-coder", "default", "starcoder"):
    LLAMA_CPP_FORMS[_name] = PRE_TOKENIZERS[_name].regexes


def _llama_cpp_split(text, patterns):
    import regex

    pieces = [text]
    for pattern in patterns:  # each regex splits every piece; the text between matches is kept too
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos:m.start()]] if m.start() > pos else []
                out += [m.group()] if m.end() > m.start() else []
                pos = m.end()
            out += [piece[pos:]] if pos < len(piece) else []
        pieces = out
    return pieces


def _byte_vocab_meta(pre):
    chars = _byte_chars()
    return {K + "model": "gpt2", K + "pre": pre, K + "tokens": [chars[b] for b in range(256)], K + "merges": []}


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_FORMS))
def test_pre_tokenizers_split_like_llama_cpp(pre):
    pytest.importorskip("regex")
    chars = _byte_chars()
    tok = tokenizer_from_gguf(_byte_vocab_meta(pre))
    for text in TEXTS + ["Straße's HELLO'S camelCase XMLHttpRequest 1/2/3 path/to/file.py\r\n"]:
        if pre in ("gpt-4o", "tekken") and "\u0301" in text:
            continue  # llama.cpp's lookahead rewrite of these drops \p{M}: it splits a combining mark off
        ours = [p for p, _ in tok._tk.pre_tokenizer.pre_tokenize_str(text)]
        ref = ["".join(chars[b] for b in p.encode("utf-8")) for p in _llama_cpp_split(text, LLAMA_CPP_FORMS[pre])]
        assert ours == ref, (pre, text)


def test_every_known_pre_tokenizer_builds():
    for pre in PRE_TOKENIZERS:
        tok = tokenizer_from_gguf(_byte_vocab_meta(pre))
        for text in TEXTS:
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text or PRE_TOKENIZERS[pre].nfc, pre


def _small_bpe():
    return {K + "model": "gpt2", K + "pre": "qwen2", K + "tokens": ["a", "b", "ab", "<|end|>"],
            K + "token_type": [1, 1, 1, 3], K + "merges": ["a b"], K + "eos_token_id": 3}


def _small_spm():
    return {K + "model": "llama", K + "tokens": ["<unk>", "<s>", "</s>", "\u2581", "a", "\u2581a"],
            K + "scores": [0.0, 0.0, 0.0, -1.0, -2.0, -0.5], K + "token_type": [2, 3, 3, 1, 1, 1]}


def test_small_vocabularies():
    tok = tokenizer_from_gguf(_small_bpe())
    assert tok.encode("abab<|end|>a") == [2, 2, 3, 0] and tok.eos_token == "<|end|>" and tok.bos_token is None
    assert tok.decode([2, 3], skip_special_tokens=True) == "ab" and tok.chat_template is None
    spm = tokenizer_from_gguf(_small_spm())  # llama.cpp's defaults: bos 1, eos 2, unk 0, add_bos
    assert spm.encode("a a") == [1, 5, 5] and spm.decode([1, 5, 5], skip_special_tokens=True) == "a a"
    assert spm.encode("b", add_special_tokens=False) == [3, 0]  # no piece, no byte token: unk
    both = tokenizer_from_gguf({**_small_bpe(), K + "bos_token_id": 3, K + "add_bos_token": True,
                                K + "add_eos_token": True})
    assert both.encode("ab") == [3, 2, 3] and both.encode("ab", add_special_tokens=False) == [2]


@pytest.mark.parametrize("base, change, message", [
    (_small_bpe, {K + "model": "bert"}, r"tokenizer\.ggml\.model='bert'; supported tokenizer models: gpt2 .*llama"),
    (_small_bpe, {K + "model": None}, r"tokenizer\.ggml\.model=None"),
    (_small_bpe, {K + "pre": "mystery-9"}, r"pre='mystery-9', a pre-tokenizer kt-core does not know; supported: "
                                           r".*qwen2.*The file's name was 'mystery-9'"),
    (_small_bpe, {K + "tokens": None}, r"has no tokenizer\.ggml\.tokens"),
    (_small_bpe, {K + "tokens": ["a", 1]}, r"malformed tokenizer\.ggml\.tokens"),
    (_small_bpe, {K + "tokens": ["a", "b", "a", "x"]}, r"'a' twice in tokenizer\.ggml\.tokens \(ids 0 and 2\)"),
    (_small_bpe, {K + "merges": None}, r"has no tokenizer\.ggml\.merges; a gpt2"),
    (_small_bpe, {K + "merges": ["ab"]}, r"merges\[0\]='ab'; each merge must be two tokens"),
    (_small_bpe, {K + "merges": ["a c"]}, r"merges\[0\]='a c' but 'c' is not in tokenizer\.ggml\.tokens"),
    (_small_bpe, {K + "token_type": [1, 1, 1]}, r"3 entries in tokenizer\.ggml\.token_type but 4 in tokenizer"),
    (_small_bpe, {K + "token_type": [1, 1, 1, 9]}, r"token_type\[3\]=9; token types are 0\.\.6"),
    (_small_bpe, {K + "eos_token_id": 4}, r"eos_token_id=4, out of range: the vocabulary has 4 tokens \(ids 0\.\.3\)"),
    (_small_bpe, {K + "bos_token_id": -1}, r"bos_token_id=-1, out of range"),
    (_small_bpe, {K + "padding_token_id": "3"}, r"padding_token_id='3'; it must be a token id"),
    (_small_bpe, {K + "add_bos_token": True}, r"add_bos_token=true but no tokenizer\.ggml\.bos_token_id"),
    (_small_bpe, {K + "add_eos_token": "yes"}, r"add_eos_token='yes'; it must be true or false"),
    (_small_bpe, {"tokenizer.chat_template": ["x"]}, r"chat_template of type list; it must be a string"),
    (_small_bpe, {"tokenizer.chat_template": "{% if %}"}, r"chat template in GGUF metadata \(tokenizer\.chat_templa"
                                                        r"te\) does not compile"),
    (_small_spm, {K + "scores": None}, r"has no tokenizer\.ggml\.scores; a llama"),
    (_small_spm, {K + "scores": [0.0] * 5}, r"5 entries in tokenizer\.ggml\.scores but 6 in tokenizer\.ggml\.tokens"),
    (_small_spm, {K + "scores": [0.0] * 5 + ["x"]}, r"malformed tokenizer\.ggml\.scores"),
    (_small_spm, {K + "unknown_token_id": 6}, r"unknown_token_id=6, out of range"),
])
def test_errors_are_clear(base, change, message):
    meta = {k: v for k, v in {**base(), **change}.items() if v is not None}
    with pytest.raises(KtError, match=message):
        tokenizer_from_gguf(meta)


def test_errors_name_the_file():
    with pytest.raises(KtError, match=r"the GGUF metadata of /m/model\.gguf has tokenizer\.ggml\.model='t5'"):
        tokenizer_from_gguf({**_small_bpe(), K + "model": "t5"}, source="/m/model.gguf")


CONVERTER = r'''
import json, sys, types
from pathlib import Path
sys.path.insert(0, sys.argv[1])
try:
    import conversion.base as base
except ImportError as exc:
    print(f"cannot import llama.cpp's converter: {exc}")
    sys.exit(3)
KEYS = {"add_tokenizer_model": "model", "add_tokenizer_pre": "pre", "add_token_list": "tokens",
        "add_token_types": "token_type", "add_token_scores": "scores", "add_token_merges": "merges",
        "add_bos_token_id": "bos_token_id", "add_eos_token_id": "eos_token_id", "add_unk_token_id": "unknown_token_id",
        "add_pad_token_id": "padding_token_id", "add_add_bos_token": "add_bos_token",
        "add_add_eos_token": "add_eos_token"}
class Writer:  # records what the converter's vocab code writes, under the GGUF keys
    def __init__(self):
        self.meta = {}
    def __getattr__(self, name):
        if name not in KEYS and name != "add_chat_template":
            raise AttributeError(name)  # SpecialVocab skips what the writer has no handler for
        key = "tokenizer.chat_template" if name == "add_chat_template" else "tokenizer.ggml." + KEYS[name]
        def put(value):
            if isinstance(value, (list, tuple)):
                value = [v.decode("utf-8") if isinstance(v, bytes) else int(v) if isinstance(v, int) else v
                         for v in value]
            self.meta[key] = value
        return put
out = {}
for folder, kind in zip(sys.argv[2::2], sys.argv[3::2]):
    model = types.SimpleNamespace(dir_model=Path(folder), hparams={}, gguf_writer=Writer(),
                                  find_hparam=lambda keys, optional=False: None)
    for fn in ("does_token_look_special", "get_vocab_base_pre", "get_vocab_base", "_set_vocab_gpt2",
               "_set_vocab_sentencepiece", "_create_vocab_sentencepiece"):
        setattr(model, fn, getattr(base.TextModel, fn).__get__(model))
    (model._set_vocab_gpt2 if kind == "gpt2" else model._set_vocab_sentencepiece)()
    out[folder] = model.gguf_writer.meta
print(json.dumps(out))
'''


@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file() or
                    not (LLAMA_CPP / "conversion" / "base.py").is_file(),
                    reason="llama.cpp's converter is not fetched: python tests/fetch_converter.py DIR, then "
                           "KT_LLAMACPP_SRC=DIR")
@pytest.mark.slow  # runs llama.cpp's converter on several tokenizers: ~10 s on 2 cores
def test_real_converter_metadata(tmp_path):
    """llama.cpp's own vocab code (run in a subprocess: it puts its gguf-py first on sys.path) writes
    the metadata; our writer above agrees with it, and the tokenizer built from it matches HF."""
    from tokenizers import Tokenizer as HFTokenizer

    folders, args = {}, []
    for name in ("qwen", "deepseek", "mistral"):
        folders[name] = tmp_path / name
        write_tokenizer(name, folders[name])
        if name == "mistral":
            shutil.copyfile(_sentencepiece_model(), folders[name] / "tokenizer.model")
        args += [str(folders[name]), "spm" if name == "mistral" else "gpt2"]
    run = subprocess.run([sys.executable, "-c", CONVERTER, str(LLAMA_CPP), *args], capture_output=True,
                         text=True, timeout=300)
    if run.returncode == 3:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, folder in folders.items():
        meta = out[str(folder)]
        ours = spm_metadata(folder) if name == "mistral" else bpe_metadata(folder, PRE[name])
        for key in (K + "tokens", K + "token_type", K + "merges", K + "scores", K + "bos_token_id",
                    K + "eos_token_id", K + "unknown_token_id", K + "padding_token_id", "tokenizer.chat_template"):
            assert meta.get(key) == ours.get(key), (name, key)
        assert PRE_TOKENIZERS[meta[K + "pre"]] == PRE_TOKENIZERS[ours[K + "pre"]], (name, meta[K + "pre"])
        hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        assert_same(tokenizer_from_gguf(meta, source=f"{name}.gguf"), hf, TEXTS + SPECIAL_TEXTS[name], name)
