"""Training data files, one record (a dict) at a time, each with where it came from for messages.

- JSON lines (``.jsonl``; any file whose first character is not ``[``): one record a line.
- A JSON array (LLaMA-Factory's and alpaca's ``.json`` files): one record an item.
- Parquet, CSV, Arrow files and ``Dataset.save_to_disk`` folders: read with Hugging Face ``datasets``
  (``pip install datasets``), one record a row.

And the conversation shapes people bring: OpenAI-style ``messages`` ({role, content}), ShareGPT's
``conversations`` ({from: human / gpt / system, value}), alpaca's ``instruction`` / ``input`` /
``output`` (with an optional ``system``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from kt_core.errors import KtError

DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool"}


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, decoded record) for each record of the file or folder."""
    if path.is_dir() or path.suffix.lower() in DATASETS_SUFFIXES:
        yield from _dataset_rows(path)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is skipped
            yield from _text_rows(path, f)
    except UnicodeDecodeError as exc:
        raise KtError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _text_rows(path: Path, f) -> Iterator[tuple[str, object]]:
    head = f.read(4096).lstrip()
    f.seek(0)
    if head.startswith("["):  # a JSON array
        try:
            items = json.load(f)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
            raise KtError(f"{path.name} starts like a JSON array but does not parse ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); fix the file") from None
        for n, item in enumerate(items, 1):
            yield f"{path.name} item {n}", item
        return
    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
                row = KtError(f"not JSON ({type(exc).__name__}: {str(exc)[:200]})")
            yield f"{path.name} line {n}", row


def _dataset_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        raise KtError(f"train.data={path} is read with Hugging Face datasets: pip install datasets (or give a "
                      "JSON-lines / JSON file)") from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
        else:
            ds = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as exc:  # datasets' own reasons (a damaged file, a folder that is no dataset)
        raise KtError(f"train.data={path} could not be read by datasets ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]})") from None
    for n, row in enumerate(ds, 1):
        yield f"{path.name} row {n}", row


def records(path, what: str, shape: str, parse: Callable) -> Iterator[tuple[str, object]]:
    """(where, ``parse(record)``) for each record; a record that does not decode or that ``parse``
    rejects (KtError / ValueError) fails naming the file, the line / item / row and ``shape``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise KtError(f"train.data={path} does not exist; point it at a file of {what} (JSON lines, a JSON "
                      "array, parquet / csv / arrow) or a saved datasets folder")
    for where, row in _rows(path):
        try:
            if isinstance(row, KtError):
                raise row
            value = parse(row)
        except (ValueError, KtError) as exc:
            raise KtError(f"{where}: {exc}; each record must be {shape}") from None
        yield where, value


def messages_of(row) -> list[dict]:
    """The conversation of one record, ending with the assistant's answer."""
    if not isinstance(row, dict):
        raise KtError("not a JSON object")
    if "messages" in row or "conversations" in row:
        sharegpt = "messages" not in row
        msgs = row["conversations" if sharegpt else "messages"]
        if sharegpt and isinstance(msgs, list):
            msgs = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                    if isinstance(m, dict) else m for m in msgs]
            if isinstance(row.get("system"), str) and row["system"]:
                msgs = [{"role": "system", "content": row["system"]}, *msgs]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                             and isinstance(m.get("role"), str) for m in msgs):
            raise KtError("'messages' / 'conversations' must be a non-empty list of {role, content} / {from, value}, "
                          "each with a role and text")
        if msgs[-1].get("role") != "assistant":
            raise KtError("the last message must be the assistant's answer")
        return msgs
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise KtError(f"'input' must be text, got {type(row['input']).__name__}")
        text = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and \
            row["system"] else []
        return [*system, {"role": "user", "content": text}, {"role": "assistant", "content": row["output"]}]
    raise KtError("no 'messages', 'conversations' or 'instruction' / 'output'")


def chat_prompt(tokenizer, messages: list, where: str) -> list[int]:
    """The token ids of ``messages`` through the model's chat template, ending where the assistant's
    answer starts; a template that refuses them (roles out of order, a field it needs) fails naming
    the record."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, or whatever the template raises
        raise KtError(f"{where}: the model's chat template refused these messages ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]}); fix the record") from None
    return tokenizer.encode(text, add_special_tokens=False)
