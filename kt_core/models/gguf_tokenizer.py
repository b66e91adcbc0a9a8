"""Tokenizers from GGUF metadata (llama.cpp's ``tokenizer.ggml.*`` keys), built as ``tokenizers``
pipelines so they encode like the HF ``tokenizer.json`` the GGUF file was converted from.

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from ``tokens`` + ``merges``; the pre-tokenizer
  regexes come from ``tokenizer.ggml.pre`` (the names llama.cpp's converter writes, mapped the way
  llama.cpp's ``llama-vocab.cpp`` maps them; where llama.cpp rewrote a regex for its own engine we use
  the original ``tokenizer.json`` form). Control / unknown tokens (type 3 / 2) become special added
  tokens and user-defined ones (type 4) plain added tokens, so text containing them matches them whole.
- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with byte fallback; merges are derived from
  ``scores`` (a piece is made from two pieces, higher score first), ``<0xNN>`` byte tokens (type 6)
  take bytes that no piece covers, and a space is prepended to each run of text unless
  ``tokenizer.ggml.add_space_prefix`` is false (llama.cpp prefixes every run after a special token too).

Not carried over: llama.cpp's ``clean_spaces`` decode clean-up (HF ``tokenizers`` does not do it either)
and its legacy default bos/eos id 11 for gpt2 vocabularies that name none.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

from kt_core.errors import KtError
from kt_core.models.tokenizer import Tokenizer, _compile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType (0: undefined)

K = "tokenizer.ggml."
SPIECE = "\u2581"  # SentencePiece's visible space
SPECIAL_IDS = {"bos_token": K + "bos_token_id", "eos_token": K + "eos_token_id",
               "unk_token": K + "unknown_token_id", "pad_token": K + "padding_token_id"}

# --- pre-tokenizer regexes (Oniguruma syntax, as in the models' tokenizer.json) --------------------
_CONTRACT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = _CONTRACT + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35 = (_CONTRACT + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
O200K = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACT}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
         rf"{_CONTRACT}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
          rf"| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3 = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
             r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
             r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]
_DS_LETTERS = ("A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
               "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
               "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
               "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
               "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-"
               "\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113"
               "\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
               "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
               "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
               "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
               "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
DEEPSEEK_LLM = [r"[\r\n]", r"\s?[" + _DS_LETTERS + "]+",
                "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                _CJK_HANGUL, r"\p{N}+"]
DEEPSEEK_CODER = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"]
DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]


class PreTokenizer(NamedTuple):
    regexes: list          # applied in turn, each splitting every piece ("isolated"), as llama.cpp does
    ignore_merges: bool    # a piece that is a whole token is taken as is (llama.cpp's ignore_merges)
    add_bos: bool          # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token
    nfc: bool = False      # the model's tokenizer.json NFC-normalizes (llama.cpp skips this)


_FAMILIES = [  # (names llama.cpp accepts in tokenizer.ggml.pre, pre-tokenizer)
    ("default", PreTokenizer(DEFAULT, False, False)),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
     PreTokenizer([LLAMA3], True, True)),
    ("dbrx smaug-bpe", PreTokenizer([LLAMA3], False, False)),
    ("glm4 glm5", PreTokenizer([LLAMA3], True, False)),
    ("qwen2 deepseek-r1-qwen", PreTokenizer([QWEN2], False, False, nfc=True)),
    ("stablelm2 hunyuan megrez kormo f2llmv2 solar-open", PreTokenizer([QWEN2], False, False)),
    ("qwen35", PreTokenizer([QWEN35], False, False, nfc=True)),
    ("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer(DEEPSEEK3, False, False)),
    ("deepseek-llm", PreTokenizer(DEEPSEEK_LLM, False, False)),
    ("deepseek-coder", PreTokenizer(DEEPSEEK_CODER, False, False)),
    ("gpt-4o llama4 minimax-m2 kanana2 talkie", PreTokenizer([O200K], False, False)),
    ("tekken", PreTokenizer([TEKKEN], True, True)),
    ("gpt-2 phi-2 gigachat jina-es jina-de jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo jais "
     "trillion granite-docling exaone4", PreTokenizer([GPT2], False, False)),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
     PreTokenizer([r"\p{N}", GPT2], False, False)),
]
PRE_TOKENIZERS = {name: pre for names, pre in _FAMILIES for name in names.split()}
MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE with byte fallback"}


def tokenizer_from_gguf(meta: Mapping[str, Any], source: str = "") -> Tokenizer:
    """A Tokenizer from GGUF metadata (keys -> plain Python values); ``source`` (the file) names it
    in errors. Raises KtError naming the key for anything missing, malformed or unsupported."""
    from tokenizers import AddedToken, processors

    where = f"the GGUF metadata{f' of {source}' if source else ''}"
    model = meta.get(K + "model")
    if model not in MODELS:
        raise KtError(f"{where} has {K}model={model!r}; supported tokenizer models: "
                      f"{', '.join(f'{k} ({v})' for k, v in MODELS.items())}")
    tokens = _tokens(meta, where)
    n = len(tokens)
    types = _int_list(meta, K + "token_type", n, where) if K + "token_type" in meta else [NORMAL] * n
    bad = next((i for i, t in enumerate(types) if not 0 <= t <= BYTE), None)
    if bad is not None:
        raise KtError(f"{where} has {K}token_type[{bad}]={types[bad]}; token types are 0..6 "
                      "(1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)")
    ids = {key: _token_id(meta, k, n, where) for key, k in SPECIAL_IDS.items()}
    if model == "gpt2":
        pre = meta.get(K + "pre") or "default"  # llama.cpp, too, falls back to its default regexes
        if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
            raise KtError(f"{where} has {K}pre={pre!r}, a pre-tokenizer kt-core does not know; supported: "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}. The file's name was {pre!r}: if llama.cpp "
                          "knows it, add its regexes to kt_core/models/gguf_tokenizer.py")
        tk, add_bos_default = _byte_level_bpe(meta, tokens, PRE_TOKENIZERS[pre], where), PRE_TOKENIZERS[pre].add_bos
    else:
        for key, default in (("bos_token", 1), ("eos_token", 2), ("unk_token", 0)):  # llama.cpp's defaults
            if ids[key] is None and default < n:
                ids[key] = default
        tk, pre, add_bos_default = _sentencepiece_bpe(meta, tokens, types, ids["unk_token"], where), None, True

    # matched whole in text before anything else; CONTROL/UNKNOWN ones are skipped by skip_special_tokens
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    text = {key: (tokens[i] if i is not None else None) for key, i in ids.items()}

    # a default-on BOS with no BOS id is dropped (llama.cpp would add its legacy id 11); an explicit one is an error
    add = {"bos": _flag(meta, K + "add_bos_token", add_bos_default and ids["bos_token"] is not None, where),
           "eos": _flag(meta, K + "add_eos_token", False, where)}
    for what, on in add.items():
        if on and ids[f"{what}_token"] is None:
            raise KtError(f"{where} has {K}add_{what}_token=true but no {SPECIAL_IDS[what + '_token']}; "
                          "the file is incomplete: re-convert it or fix the metadata")
    if add["bos"] or add["eos"]:
        ends = [(text[f"{w}_token"], ids[f"{w}_token"]) for w in ("bos", "eos") if add[w]]
        first = [text["bos_token"]] if add["bos"] else []
        last = [text["eos_token"]] if add["eos"] else []
        tk.post_processor = processors.TemplateProcessing(
            single=first + ["$A"] + last, pair=first + ["$A"] + last + first + ["$B:1"] + last, special_tokens=ends)

    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise KtError(f"{where} has tokenizer.chat_template of type {type(template).__name__}; it must be a "
                      "string: re-convert the file or fix the metadata")
    config = {**text, "add_bos_token": add["bos"], "add_eos_token": add["eos"], "chat_template": template,
              "gguf_tokenizer_model": model, "gguf_tokenizer_pre": pre}
    label = f"{source or 'GGUF metadata'} (tokenizer.chat_template)" if template is not None else ""
    tok = Tokenizer(tk, config, template, label)
    if template is not None:
        tok._template = _compile(template, label)
    return tok


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list, pre: PreTokenizer, where: str):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    if K + "merges" not in meta:
        raise KtError(f"{where} has no {K}merges; a gpt2 (byte-level BPE) vocabulary needs them: "
                      "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    raw = meta[K + "merges"]
    if not isinstance(raw, (list, tuple)):
        raise KtError(f"{where} has {K}merges of type {type(raw).__name__}; it must be a list of strings")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, m in enumerate(raw):
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        a, b = (m[:cut], m[cut + 1:]) if cut > 0 else ("", "")
        if not a or not b:
            raise KtError(f"{where} has {K}merges[{i}]={m!r}; each merge must be two tokens separated by "
                          "one space: the file is damaged, re-convert it")
        if a not in vocab or b not in vocab or a + b not in vocab:
            missing = next(x for x in (a, b, a + b) if x not in vocab)
            raise KtError(f"{where} has {K}merges[{i}]={m!r} but {missing!r} is not in {K}tokens; the "
                          "merges do not belong to this vocabulary: re-convert the file")
        merges.append((a, b))
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    if pre.nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list, types: list, unk: Optional[int], where: str):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    if K + "scores" not in meta:
        raise KtError(f"{where} has no {K}scores; a llama (SentencePiece) vocabulary needs them: "
                      "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    scores = _num_list(meta, K + "scores", len(tokens), where)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []  # every split of a normal piece into two pieces; higher score first, then by the parts' ids
    for piece, pid in vocab.items():
        if types[pid] not in (0, NORMAL) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[pid], vocab[a], vocab[b], a, b))
    merges.sort()
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], byte_fallback=True,
                                unk_token=tokens[unk] if unk is not None else None, fuse_unk=True))
    prefix = _flag(meta, K + "add_space_prefix", True, where)
    escape = normalizers.Replace(" ", SPIECE)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE), escape]) if prefix else escape
    steps = [decoders.Replace(SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tk


def _tokens(meta: Mapping[str, Any], where: str) -> list:
    tokens = meta.get(K + "tokens")
    if tokens is None:
        raise KtError(f"{where} has no {K}tokens; the file carries no vocabulary: use one converted with "
                      "its tokenizer, or load the tokenizer from the original model folder")
    if not isinstance(tokens, (list, tuple)) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise KtError(f"{where} has a malformed {K}tokens (it must be a non-empty list of strings); "
                      "the file is damaged: re-convert it")
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names empty tokens
    if len(set(tokens)) != len(tokens):
        seen: dict = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise KtError(f"{where} has {t!r} twice in {K}tokens (ids {seen[t]} and {i}); "
                              "the file is damaged: re-convert it")
            seen[t] = i
    return tokens


def _int_list(meta: Mapping[str, Any], key: str, n: int, where: str) -> list:
    values = meta[key]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in values):
        raise KtError(f"{where} has a malformed {key} (it must be a list of integers); re-convert the file")
    _same_length(key, len(values), n, where)
    return list(values)


def _num_list(meta: Mapping[str, Any], key: str, n: int, where: str) -> list:
    values = meta[key]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in values):
        raise KtError(f"{where} has a malformed {key} (it must be a list of numbers); re-convert the file")
    _same_length(key, len(values), n, where)
    return [float(v) for v in values]


def _same_length(key: str, got: int, n: int, where: str) -> None:
    if got != n:
        raise KtError(f"{where} has {got} entries in {key} but {n} in {K}tokens; they must agree (one "
                      "per token): the file is damaged, re-convert it")


def _token_id(meta: Mapping[str, Any], key: str, n: int, where: str) -> Optional[int]:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise KtError(f"{where} has {key}={value!r}; it must be a token id (an integer)")
    if not 0 <= value < n:
        raise KtError(f"{where} has {key}={value}, out of range: the vocabulary has {n} tokens "
                      f"(ids 0..{n - 1}); fix the metadata or re-convert the file")
    return value


def _flag(meta: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool) and value not in (0, 1):
        raise KtError(f"{where} has {key}={value!r}; it must be true or false")
    return bool(value)
