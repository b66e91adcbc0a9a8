"""kt sft's data: JSON lines, JSON arrays (LLaMA-Factory's files), ShareGPT conversations, alpaca with
a system prompt, and parquet / csv / saved folders through Hugging Face datasets, all giving the same
examples; a bad record fails naming where it is."""
import json

import pytest

from kt_core.errors import KtError
from kt_core.models.tokenizer import Tokenizer
from kt_core.models.tokenizer_sources import write_tokenizer
from kt_core.train.sft import read_examples

QA = [("What is 2+2?", "4"), ("Name a colour.", "Blue."), ("Say hi", "hi there")]
OPENAI = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                        {"role": "assistant", "content": a}]} for q, a in QA]
SHAREGPT = [{"system": "Be brief.", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for q, a in QA]
ALPACA = [{"system": "Be brief.", "instruction": q, "input": "", "output": a} for q, a in QA]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer("qwen", d)
    return Tokenizer.from_dir(d)


def test_every_shape_and_file_kind_gives_the_same_examples(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    want = read_examples(_jsonl(tmp_path / "a.jsonl", OPENAI), tok, 256)
    assert len(want) == 3 and all(0 < ex.first_label < len(ex.tokens) for ex in want)
    arr = tmp_path / "sharegpt.json"
    arr.write_text(json.dumps(SHAREGPT, indent=2))
    got = {"sharegpt array": read_examples(arr, tok, 256),
           "alpaca lines": read_examples(_jsonl(tmp_path / "b.jsonl", ALPACA), tok, 256)}
    flat = [{"instruction": r["instruction"], "output": r["output"], "system": r["system"]} for r in ALPACA]
    ds = datasets.Dataset.from_list(flat)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("c.parquet", "c.csv", "saved"):
        got[name] = read_examples(tmp_path / name, tok, 256)
    for kind, examples in got.items():
        assert [(e.tokens, e.first_label) for e in examples] == [(e.tokens, e.first_label) for e in want], kind


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_records_are_named(tok, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ALPACA[0], {"conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(KtError, match=r"bad.json item 2: the last message must be the assistant's answer"):
        read_examples(bad, tok, 256)
    lines = _jsonl(tmp_path / "l.jsonl", [ALPACA[0]])
    lines.write_text(lines.read_text() + "{oops\n")
    with pytest.raises(KtError, match=r"l.jsonl line 2: not JSON"):
        read_examples(lines, tok, 256)
    with pytest.raises(KtError, match=r"b.jsonl line 1: \d+ tokens, over train.max_seq_len=5"):
        read_examples(_jsonl(tmp_path / "b.jsonl", ALPACA), tok, 5)
    with pytest.raises(KtError, match="does not exist"):
        read_examples(tmp_path / "none.jsonl", tok, 256)
    # each of these was a traceback, or an error naming no line
    deep = _jsonl(tmp_path / "deep.jsonl", [ALPACA[0]])
    deep.write_text(deep.read_text() + "[" * 100_000 + "\n")
    with pytest.raises(KtError, match=r"deep.jsonl line 2: not JSON \(RecursionError"):
        read_examples(deep, tok, 256)
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(KtError, match="deep.json starts like a JSON array but does not parse"):
        read_examples(tmp_path / "deep.json", tok, 256)
    with pytest.raises(KtError, match=r"n.jsonl line 1: 'input' must be text"):
        read_examples(_jsonl(tmp_path / "n.jsonl", [{**ALPACA[0], "input": 5}]), tok, 256)
    no_role = {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(KtError, match=r"r.jsonl line 1: 'messages'"):
        read_examples(_jsonl(tmp_path / "r.jsonl", [no_role]), tok, 256)


def test_a_chat_template_that_refuses_a_record_names_it(tok, tmp_path, monkeypatch):
    def strict(messages, add_generation_prompt=False):  # as templates that demand alternating roles do
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(tok, "apply_chat_template", strict)
    with pytest.raises(KtError, match=r"t.jsonl line 1: the model's chat template refused these messages"):
        read_examples(_jsonl(tmp_path / "t.jsonl", OPENAI), tok, 256)


def test_windows_encodings(tok, tmp_path):
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    assert len(read_examples(bom, tok, 256)) == 3  # a byte-order mark is skipped
    wide = tmp_path / "u16.jsonl"
    wide.write_bytes("\n".join(json.dumps(r) for r in ALPACA).encode("utf-16"))
    with pytest.raises(KtError, match="u16.jsonl is not UTF-8 text.*save it as UTF-8"):
        read_examples(wide, tok, 256)


def test_options_that_would_do_nothing_are_refused(tmp_path, capsys):
    from kt_core.cli import main

    assert main(["dpo", f"model.path={tmp_path}", "train.data=x.jsonl", f"train.output={tmp_path / 'o'}",
                 "train.packing=true"]) == 2
    assert "train.packing applies to kt sft" in capsys.readouterr().err
