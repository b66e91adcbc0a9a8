"""Tokenizers shipped as a tiktoken rank file (``tiktoken.model``) instead of tokenizer.json.

Kimi-K2 / K2.5 release their tokenizer this way: the BPE ranks in ``tiktoken.model``, the split
pattern inside ``tokenization_kimi.py`` (remote code, which kt-core never runs) and 256 reserved
special ids after the last rank, named by ``tokenizer_config.json``'s ``added_tokens_decoder``
(unnamed slots are ``<|reserved_token_ID|>``). We rebuild the same tokenizer as a ``tokenizers``
object; the tests hold it to tiktoken's own encoder with the same ranks and pattern.
"""
from __future__ import annotations

import logging
from pathlib import Path

from kt_core.errors import KtError
from kt_core.jsonfile import read_json

log = logging.getLogger(__name__)

RANKS_FILE = "tiktoken.model"
RESERVED_SPECIALS = 256  # tokenization_kimi.py's num_reserved_special_tokens

# tokenization_kimi.py's pat_str: Han runs on their own, letters excluding Han (class intersection)
# with English contractions, digits in threes, punctuation runs, newlines, whitespace.
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


def present(path: Path) -> bool:
    return (Path(path) / RANKS_FILE).is_file()


def _pattern(config: dict, cfg_path: Path) -> str:
    """The split pattern of the tokenizer class the folder names (only Kimi's is known)."""
    auto = config.get("auto_map", {}).get("AutoTokenizer", "") if isinstance(config.get("auto_map"), dict) else ""
    names = " ".join(str(x) for x in (auto if isinstance(auto, list) else [auto]))
    if "tokenization_kimi" in names or config.get("tokenizer_class") == "TikTokenTokenizer":
        return KIMI_PATTERN
    raise KtError(f"{cfg_path.parent / RANKS_FILE} is a tiktoken rank file, but {cfg_path.name} does not name a "
                  "tokenizer kt-core knows the split pattern of (supported: Kimi's TikTokenTokenizer, "
                  "tokenization_kimi.py); add a tokenizer.json to the folder")


def build(path: Path):
    """The ``tokenizers.Tokenizer`` of a folder with ``tiktoken.model``, and its tokenizer_config.json."""
    from kt_core.models.tokenizer_sources import byte_level_bpe, read_ranks

    path = Path(path)
    cfg_path = path / "tokenizer_config.json"
    config = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
    pattern = _pattern(config, cfg_path)
    ranks = read_ranks(path / RANKS_FILE)
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise KtError(f"{path / RANKS_FILE}: the ranks are not 0..{n - 1} each once; the file is damaged: "
                      "re-download it")
    named = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit()):
            raise KtError(f"{cfg_path}: added_tokens_decoder entry {key!r} is not "
                          '{"content": string} under a token id; fix or re-download it')
        i = int(key)
        if not n <= i < n + RESERVED_SPECIALS:
            raise KtError(f"{cfg_path}: special token {entry['content']!r} has id {i}, outside the reserved "
                          f"ids {n}..{n + RESERVED_SPECIALS - 1} after {RANKS_FILE}'s {n} ranks; the two files "
                          "do not belong together")
        named[i] = entry["content"]
    specials = [named.get(i, f"<|reserved_token_{i}|>") for i in range(n, n + RESERVED_SPECIALS)]
    tk = byte_level_bpe(ranks, pattern, specials)
    log.info("tokenizer: built from %s (%d ranks, %d special ids; no tokenizer.json in the folder)",
             path / RANKS_FILE, n, RESERVED_SPECIALS)
    return tk, config
