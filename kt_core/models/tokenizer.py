"""Tokenizers from HF-format folders: ``tokenizer.json`` through the ``tokenizers`` library,
special tokens from ``tokenizer_config.json``, chat templates rendered with jinja2 in a
sandbox the way transformers renders them (trim/lstrip blocks, loop controls,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from kt_core.errors import KtError
from kt_core.weights.checkpoint import read_json


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tk, config: dict, chat_template: Optional[str]) -> None:
        self._tk, self.config, self.chat_template = tk, config, chat_template
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_token, self.eos_token = self.special["bos_token"], self.special["eos_token"]
        self.bos_token_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    @staticmethod
    def present(path: Path) -> bool:
        return (Path(path) / "tokenizer.json").is_file()

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise KtError(f"{path / 'tokenizer.json'} could not be loaded ({exc}); re-download it") from None
        cfg_path = path / "tokenizer_config.json"
        config = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja = path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        return cls(tk, config, template)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise KtError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                          "chat_template.jinja); pass plain text instead of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise KtError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            self._template = _compile(self.chat_template)
        values = {**{k: v for k, v in self.special.items() if v is not None}, **kwargs}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **values)


def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise KtError(f"the chat template does not compile: {exc}") from None
