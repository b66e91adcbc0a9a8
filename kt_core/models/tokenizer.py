"""Tokenizers from HF-format folders: ``tokenizer.json`` through the ``tokenizers`` library,
special tokens from ``tokenizer_config.json``, chat templates rendered with jinja2 in a
sandbox the way transformers renders them (trim/lstrip blocks, loop controls,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII)."""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from kt_core.errors import KtError
from kt_core.jsonfile import brief, is_rust_panic, read_json, show

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tk, config: dict, chat_template: Optional[str], template_source: str = "") -> None:
        self._tk, self.config, self.chat_template = tk, config, chat_template
        self.template_source = template_source  # the file the chat template came from, for messages
        self.special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        self.bos_token, self.eos_token = self.special["bos_token"], self.special["eos_token"]
        self.bos_token_id = tk.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = tk.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    @staticmethod
    def present(path: Path) -> bool:
        from kt_core.models import tiktoken_tokenizer

        return (Path(path) / "tokenizer.json").is_file() or tiktoken_tokenizer.present(path)

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and the chat template (compiled here, so a broken
        template fails at load naming its file). Each broken file is a one-line KtError naming it."""
        from tokenizers import Tokenizer as HFTokenizer

        from kt_core.models import tiktoken_tokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        cfg_path = path / "tokenizer_config.json"
        if not tj.is_file() and tiktoken_tokenizer.present(path):  # Kimi: tiktoken.model
            tk, config = tiktoken_tokenizer.build(path)
        else:
            try:
                tk = HFTokenizer.from_file(str(tj))
            except BaseException as exc:  # a panic inside tokenizers is a BaseException
                if not isinstance(exc, Exception) and not is_rust_panic(exc):
                    raise
                raise KtError(f"{tj} could not be loaded ({brief(exc)}); re-download it") from None
            config = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
        for key in SPECIAL_TOKENS:
            text = _token_text(config.get(key))
            if text is not None and not isinstance(text, str):
                raise KtError(f"{cfg_path} has {key}={show(config.get(key))}; it must be a string or "
                              '{"content": string}: fix or re-download tokenizer_config.json')
        template, source = _pick_template(config.get("chat_template"), cfg_path), cfg_path
        jinja = path / "chat_template.jinja"
        if template is None and jinja.is_file():
            source = jinja
            try:
                template = jinja.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise KtError(f"{jinja} is not UTF-8 text ({brief(exc)}); re-download or fix it") from None
            except OSError as exc:
                raise KtError(f"{jinja} could not be read ({brief(exc.strerror or exc)}); check the file") from None
        tok = cls(tk, config, template, str(source) if template is not None else "")
        if template is not None:
            tok._template = _compile(template, tok.template_source)
        return tok

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
            self._template = _compile(self.chat_template, self.template_source)
        values = {**{k: v for k, v in self.special.items() if v is not None}, **kwargs}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **values)
        except Exception as exc:  # raise_exception() in the template, or a template / message mismatch
            from jinja2.exceptions import TemplateError

            where = f" in {self.template_source}" if self.template_source else ""
            what = brief(exc.message or exc) if isinstance(exc, TemplateError) else \
                f"{type(exc).__name__}: {brief(exc)}"
            raise KtError(f"the chat template{where} failed on these messages ({what}); check the messages' "
                          "roles and contents, or fix the template") from None


def _pick_template(value: Any, cfg_path: Path) -> Optional[str]:
    """tokenizer_config.json's chat_template: a string, or named templates (take "default", else the first)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                                 for t in value):
        return next((t["template"] for t in value if t.get("name") == "default"), value[0]["template"])
    raise KtError(f"{cfg_path} has chat_template={show(value)}; it must be a string or a list of "
                  '{"name": ..., "template": string}: fix or re-download tokenizer_config.json')


def _compile(source: str, where: str = ""):
    """The template compiled, or a one-line KtError naming ``where`` (the file it came from)."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        return _compiled(source)
    except Exception as exc:  # TemplateError; RecursionError, MemoryError or SyntaxError on pathological text
        if isinstance(exc, TemplateSyntaxError):
            detail = f"line {exc.lineno}: {brief(exc.message or exc)}"
        elif isinstance(exc, TemplateError):
            detail = brief(exc.message or exc)
        else:
            detail = f"{type(exc).__name__}: {brief(exc)}"
        fix = f"fix it or re-download {Path(where).name}" if where else "fix it"
        raise KtError(f"the chat template{f' in {where}' if where else ''} does not compile ({detail}); "
                      f"{fix}") from None


@functools.lru_cache(maxsize=16)  # a server reloading a model, or tests loading many copies, compile once
def _compiled(source: str):
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
    return env.from_string(source)
