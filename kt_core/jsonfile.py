"""Reading the JSON files of a model folder (config, index, tokenizer config) and wording what a
bad file does wrong, in one line. Torch-free, so `kt plan` and `kt config` start fast."""
from __future__ import annotations

import json
import reprlib
from pathlib import Path

from kt_core.errors import KtError

MAX_JSON_BYTES = 256 << 20  # config, index and tokenizer files are KBs to a few MBs
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 4, 4, 3


def show(value) -> str:
    """A value read from a file, for a message: repr'd (one line), bounded in length and depth."""
    return _short.repr(value)


def brief(exc: object) -> str:
    """An exception's text for a one-line message: whitespace runs (newlines) collapsed, at most 300 chars."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def json_error(exc: ValueError) -> str:
    """What json.loads found wrong, for a message."""
    if "integer string conversion" in str(exc):
        return "a number has over 4,300 digits"
    return brief(exc)


def is_rust_panic(exc: BaseException) -> bool:
    """pyo3's PanicException (a panic inside safetensors or tokenizers) derives from BaseException."""
    return type(exc).__name__ == "PanicException"


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``. A missing, unreadable, oversized, non-UTF-8, malformed or
    non-object file is a one-line KtError naming it."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise KtError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise KtError(f"{what} {path} could not be read ({brief(exc.strerror or exc)}); check the file") from None
    if len(raw) > MAX_JSON_BYTES:
        raise KtError(f"{what} {path} is over {MAX_JSON_BYTES >> 20} MiB, too large for a model folder's "
                      "JSON file; re-download it")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise KtError(f"{what} {path} is not UTF-8 text ({brief(exc)}); re-download or fix it") from None
    except RecursionError:
        raise KtError(f"{what} {path} is not valid JSON (nested too deeply); re-download or fix it") from None
    except ValueError as exc:  # JSONDecodeError, and integers over Python's 4,300-digit limit
        raise KtError(f"{what} {path} is not valid JSON ({json_error(exc)}); re-download or fix it") from None
    if not isinstance(value, dict):
        raise KtError(f"{what} {path} must hold a JSON object, not the {type(value).__name__} {show(value)}; "
                      "re-download or fix it")
    return value
