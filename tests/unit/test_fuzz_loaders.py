"""Fuzzed model-folder loaders: mutated and truncated safetensors headers, config.json and tokenizer
files either still load or fail with a one-line KtError naming the broken file; never another
exception type, a crash or a hang.

``load_folder`` does what ``kt run`` / ``Engine.from_pretrained`` reads before any weight is used:
config.json, the ModelSpec (and its rope frequencies), the Checkpoint index and every safetensors
header (then each tensor, the model being tiny), the tokenizer and its chat template (compiled, and
rendered once). Each example links a tiny valid folder's files into a fresh folder, writes one broken
file there and loads it. The default run is 1,000 examples; ``pytest -m slow`` runs 4,000 more.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kt_core.errors import KtError

SECONDS_PER_EXAMPLE = 30.0  # a hang bound, not a timing: an example takes a few ms even on a loaded CI box


def fuzz(n: int):
    return settings(deadline=None, max_examples=n, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---- a tiny valid model folder ------------------------------------------------------------------

CONFIG = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=320, hidden_size=16,
              intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=True,
              decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=256, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2)
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
TOKENIZER_CONFIG = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"},
                    "unk_token": None, "model_max_length": 256, "tokenizer_class": "Qwen2Tokenizer",
                    "chat_template": CHATML}
TEXT = ("The quick brown fox jumps over the lazy dog. Photosynthesis converts light into chemical energy. "
        "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2). 東京は日本の首都です。 ") * 4
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(20, 16, generator=g).to(torch.bfloat16),
            "model.layers.0.input_layernorm.weight": torch.ones(16),
            "model.layers.0.mlp.gate.weight": torch.randn(4, 16, generator=g).half(),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
            "model.layers.1.mlp.experts.0.up_proj.weight": torch.randint(-8, 8, (3, 5), generator=g,
                                                                          dtype=torch.int8),
            "model.norm.weight": torch.ones(16)}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT], trainer=trainer)
    return tk


def _write_folder(out: Path, sharded: bool, template_file: bool) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2), encoding="utf-8")
    tensors = _tensors()
    if sharded:
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for fname, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    else:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer().save(str(out / "tokenizer.json"))
    tok_cfg = dict(TOKENIZER_CONFIG)
    if template_file:
        del tok_cfg["chat_template"]
        (out / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_loaders")
    return {"single": _write_folder(root / "single", sharded=False, template_file=False),
            "sharded": _write_folder(root / "sharded", sharded=True, template_file=True)}


def load_folder(path: Path):
    """What Engine.from_pretrained reads before any weight is used, in its order."""
    from kt_core.models.spec import parse_config
    from kt_core.models.tokenizer import Tokenizer
    from kt_core.weights.checkpoint import Checkpoint

    ck = Checkpoint(path)
    spec = parse_config(ck.config)
    spec.rope.inv_freq()
    for name in ck.keys():
        ck.get(name)
    tok = Tokenizer.from_dir(path) if Tokenizer.present(path) else None
    if tok is not None:
        tok.decode(tok.encode("hello world"))
        if tok.chat_template:
            tok.apply_chat_template(MESSAGES)
    return spec, ck, tok


def _names(message: str, fname: str) -> bool:
    """The message names ``fname`` as a file (tokenizer_config.json does not name config.json)."""
    return re.search(r"(^|[^\w.-])" + re.escape(fname) + r"($|[^\w.-])", message) is not None


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so no ``except Exception`` in a loader can swallow it."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Interrupt a load that runs past ``seconds`` (Python-level loops; where SIGALRM exists)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise Hang(f"loading ran past {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(base: Path, fname: str, content: bytes) -> str:
    """Load a copy of ``base`` whose ``fname`` holds ``content``: it loads, or a one-line KtError names
    the file. Any other exception fails the test. Returns "ok" or the error message."""
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # Windows: a file still mapped
        folder = Path(tmp) / "m"
        folder.mkdir()
        for f in base.iterdir():  # the untouched files hard-linked (nothing writes them), else copied
            if f.name != fname:
                try:
                    os.link(f, folder / f.name)
                except OSError:
                    shutil.copy2(f, folder / f.name)
        (folder / fname).write_bytes(content)
        start = time.perf_counter()
        try:
            with watchdog(SECONDS_PER_EXAMPLE):
                load_folder(folder)
            outcome = "ok"
        except KtError as exc:
            outcome = str(exc)
            assert outcome and "\n" not in outcome and "\r" not in outcome, f"not one line: {outcome!r}"
            assert _names(outcome, fname), f"does not name {fname}: {outcome!r}"
        elapsed = time.perf_counter() - start
        assert elapsed < SECONDS_PER_EXAMPLE, f"loading took {elapsed:.1f} s"
        return outcome


# ---- mutation strategies ------------------------------------------------------------------------

SPECIAL_INTS = [0, 1, -1, 7, 8, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30,
                -(2**63), -(2**64)]
numbers = st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(-10**6, 10**6), st.floats(allow_nan=True,
                                                                                         allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@st.composite
def byte_edits(draw, data: bytes, hot: tuple[int, int] = (0, 0)) -> bytes:
    """1-4 flips, overwrites, insertions, deletions or a truncation, positions often in ``hot``."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not b:
            break
        anywhere = st.integers(0, len(b) - 1)
        lo, hi = hot[0], min(hot[1], len(b))
        pos = draw(st.one_of(st.integers(lo, hi - 1), anywhere) if hi > lo else anywhere)
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
        else:
            del b[pos:]
    return bytes(b)


def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN / Infinity literals, as Python writes them


DEEP = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
LONG_INT = b"9" * 5_000  # Python refuses int strings over 4,300 digits


@st.composite
def encoded(draw, value, data_edits: bool = True) -> bytes:
    """``value`` as JSON bytes, sometimes truncated, byte-edited, not UTF-8, or pathological."""
    raw = _dumps(value)
    how = draw(st.sampled_from(["plain"] * 6 + ["truncate", "edit", "latin1", "deep", "long_int", "empty"]))
    if how == "truncate" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "edit" and data_edits:
        return draw(byte_edits(raw))
    if how == "latin1":
        pos = draw(st.integers(0, len(raw)))
        return raw[:pos] + draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + raw[pos:]
    if how == "deep":
        return DEEP
    if how == "long_int":
        return raw.replace(b":", b":" + LONG_INT + b"0", 1) if b":" in raw else LONG_INT
    if how == "empty":
        return b""
    return raw


def _set_path(draw, value, depth: int = 0):
    """``value`` with one randomly chosen node replaced by a random JSON value or removed."""
    if depth > 0 and (not isinstance(value, (dict, list)) or not value or draw(st.integers(0, 3)) == 0):
        return draw(json_values)
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        if draw(st.integers(0, 5)) == 0:
            del out[key]
        else:
            out[key] = _set_path(draw, value[key], depth + 1)
        return out
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + [_set_path(draw, value[i], depth + 1)] + value[i + 1:]
    return draw(json_values)


# ---- safetensors ----------------------------------------------------------------------------------

DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "F8_E4M3",
          "F8_E5M2", "F8_E8M0", "F4", "C64"]
dtype_values = st.one_of(st.sampled_from(DTYPES + ["f32", "F128", "", "FLOAT"]), json_values)
int_lists = st.lists(numbers, max_size=5)


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def header_edits(draw, data: bytes) -> bytes:
    """A structurally broken header: wrong dtypes, shapes, offsets, entries, metadata, length field."""
    n, header, body = _split(data)
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "overlap", "shift", "past_end", "drop_field",
                                   "entry", "metadata", "top", "add", "random_path"]))
        if op in ("dtype", "shape", "offsets", "overlap", "shift", "past_end", "drop_field") and \
                not isinstance(entry, dict):
            op = "entry"
        if op == "dtype":
            entry["dtype"] = draw(dtype_values)
        elif op == "shape":
            entry["shape"] = draw(st.one_of(int_lists, json_values))
        elif op == "offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(numbers, min_size=2, max_size=2), int_lists, json_values))
        elif op == "overlap":
            other = header.get(draw(st.sampled_from(names)))
            if isinstance(other, dict):
                entry["data_offsets"] = other.get("data_offsets")
        elif op == "shift":
            delta = draw(st.integers(-64, 64))
            offs = entry.get("data_offsets")
            if isinstance(offs, list):
                entry["data_offsets"] = [o + delta if isinstance(o, int) else o for o in offs]
        elif op == "past_end":
            begin = len(body) + draw(st.integers(-8, 2**40))
            entry["data_offsets"] = [begin, begin + draw(st.integers(0, 64))]
        elif op == "drop_field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "entry":
            header[name] = draw(json_values)
        elif op == "metadata":
            header["__metadata__"] = draw(st.one_of(json_values, st.dictionaries(st.text(max_size=6), json_values,
                                                                                 max_size=3)))
        elif op == "top":
            header = draw(st.one_of(scalars, st.lists(json_values, max_size=3)))
            break
        elif op == "add":
            header[draw(st.text(max_size=10))] = {"dtype": draw(dtype_values), "shape": draw(int_lists),
                                                  "data_offsets": draw(st.lists(numbers, min_size=2, max_size=2))}
        else:
            header = _set_path(draw, header)
            if not isinstance(header, dict):
                break
    text = _dumps(header)
    if draw(st.booleans()):
        text += b" " * draw(st.integers(0, 7))  # safetensors pads headers with spaces
    length = len(text) + draw(st.sampled_from([0] * 6 + [-1, 1, 8, -8]))
    tail = draw(st.sampled_from(["keep"] * 4 + ["truncate", "extend"]))
    if tail == "truncate" and body:
        body = body[:draw(st.integers(0, len(body) - 1))]
    elif tail == "extend":
        body = body + draw(st.binary(min_size=1, max_size=16))
    return struct.pack("<Q", max(length, 0)) + text + body


@st.composite
def length_edits(draw, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    size = len(data)
    value = draw(st.one_of(st.sampled_from([0, 1, 2, n - 1, n + 1, size - 8, size - 7, size, 2**31, 2**32,
                                            100_000_000, 100_000_001, 2**63, 2**64 - 1]),
                           st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", value) + data[8:]


@st.composite
def safetensors_cases(draw, folders):
    base = folders[draw(st.sampled_from(["single", "sharded"]))]
    files = sorted(p.name for p in base.glob("*.safetensors"))
    fname = draw(st.sampled_from(files))
    data = (base / fname).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    kind = draw(st.sampled_from(["bytes_header", "bytes_any", "length", "header", "header", "truncate"]))
    if kind == "bytes_header":
        content = draw(byte_edits(data, hot=(0, 8 + n)))
    elif kind == "bytes_any":
        content = draw(byte_edits(data))
    elif kind == "length":
        content = draw(length_edits(data))
    elif kind == "header":
        content = draw(header_edits(data))
    else:
        content = data[:draw(st.integers(0, len(data) - 1))]
    return base, fname, content


@st.composite
def index_cases(draw, folders):
    base = folders["sharded"]
    fname = "model.safetensors.index.json"
    index = json.loads((base / fname).read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    op = draw(st.sampled_from(["missing", "other_shard", "escape", "not_safetensors", "random_path", "weight_map"]))
    wm = dict(index["weight_map"])
    name = draw(st.sampled_from(sorted(wm)))
    if op == "missing":
        wm[name] = draw(st.sampled_from(["model-00003-of-00002.safetensors", "nothing.safetensors", "", ".",
                                         "model-00001-of-00002.safetensors/"]))
    elif op == "other_shard":
        wm[name] = next(s for s in shard_names if s != wm[name])
    elif op == "escape":
        wm[name] = draw(st.sampled_from(["../single/model.safetensors", "/etc/passwd", "/dev/zero", "/dev/urandom",
                                         "//", "../../../../../../../../dev/zero"]))
    elif op == "not_safetensors":
        wm[name] = draw(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors.index.json"]))
    elif op == "weight_map":
        wm = draw(json_values)
    index["weight_map"] = wm
    if op == "random_path":
        index = _set_path(draw, index)
    return base, fname, draw(encoded(index))


@given(data=st.data())
@fuzz(250)
def test_fuzz_safetensors_headers(folders, data):
    base, fname, content = data.draw(safetensors_cases(folders))
    check(base, fname, content)


@given(data=st.data())
@fuzz(100)
def test_fuzz_safetensors_index(folders, data):
    base, fname, content = data.draw(index_cases(folders))
    check(base, fname, content)


# ---- config.json ------------------------------------------------------------------------------------


def _base_configs() -> list[dict]:
    from kt_core.models.synthetic import build_config, preset_names

    return [CONFIG] + [build_config(None, p, None) for p in sorted(preset_names())]


CONFIG_FIELDS = sorted({k for c in _base_configs() for k in c} | {
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "sliding_window", "use_sliding_window",
    "layer_types", "max_window_layers", "attention_bias", "quantization_config", "rope_interleave",
    "topk_method", "original_max_position_embeddings"})
ROPE_KINDS = ["yarn", "linear", "llama3", "dynamic", "default", "mrope", "longrope", "", None, 3]
ROPE_FIELDS = ["factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
               "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta",
               "partial_rotary_factor"]


def _generic_op(draw, cfg: dict, op: str) -> object:
    """The mutations both JSON config fuzzers share: drop a key ("delete"), set a random nested
    path ("random_path"), or replace the whole document with a scalar or a list ("top")."""
    if op == "delete":
        cfg.pop(draw(st.sampled_from(sorted(cfg) or ["x"])), None)
        return cfg
    if op == "random_path":
        return _set_path(draw, cfg)
    return draw(st.one_of(scalars, st.lists(json_values, max_size=3)))


@st.composite
def config_values(draw, base: dict) -> object:
    cfg = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "set", "number", "delete", "rope", "random_path", "top"]))
        key = draw(st.sampled_from(CONFIG_FIELDS))
        if op == "set":
            cfg[key] = draw(json_values)
        elif op == "number":
            cfg[key] = draw(numbers)
        elif op == "rope":
            rope = {draw(st.sampled_from(["type", "rope_type"])): draw(st.sampled_from(ROPE_KINDS))}
            for field in draw(st.lists(st.sampled_from(ROPE_FIELDS), max_size=6)):
                rope[field] = draw(st.one_of(numbers, json_values))
            cfg[draw(st.sampled_from(["rope_scaling", "rope_parameters"]))] = rope
        else:  # delete, random_path, top
            cfg = _generic_op(draw, cfg, op)
        if not isinstance(cfg, dict):
            break
    return cfg


@given(data=st.data())
@fuzz(300)
def test_fuzz_config_json(folders, data):
    base = data.draw(st.sampled_from(_base_configs()))
    content = data.draw(encoded(data.draw(config_values(base))))
    check(folders[data.draw(st.sampled_from(["single", "sharded"]))], "config.json", content)


# ---- tokenizer files -----------------------------------------------------------------------------

BROKEN_JINJA = ["{% if %}", "{{", "}}", "{% for m in %}{% endfor %}", "{% endfor %}", "{{ x | nofilter }}",
                "{% set %}", "{% macro %}", "{{ messages[ }}", "{% raw %}", "{#", "{{ 1 + }}", "{% if x %}",
                "{{ raise_exception('no') }}", "{{ messages[99]['content'] }}", "{{ messages.__class__ }}",
                "{{ " + "(" * 500 + "1" + ")" * 500 + " }}", "{% if x %}" * 300, "{{ 'a' ~ }}",
                "{{ messages | map(attribute=3) | list }}", "{{ x.y.z() }}", "{% include 'other.jinja' %}",
                "{% extends 'base' %}", "{{ strftime_now(3) }}", "{{ range(10) | tojson(indent='x') }}", "\x00"]
jinja_text = st.one_of(st.sampled_from(BROKEN_JINJA),
                       st.text(alphabet="{}%#()[]|.,'\" \nabcmrx_01=+-~!<>", max_size=40),
                       st.builds(lambda a, b: CHATML[:a] + b + CHATML[a:], st.integers(0, len(CHATML)),
                                 st.sampled_from(BROKEN_JINJA)),
                       st.builds(lambda a: CHATML[:a], st.integers(0, len(CHATML))))
template_values = st.one_of(jinja_text, json_values,
                            st.lists(st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["default", "tool_use"]),
                                                                              json_values),
                                                            "template": st.one_of(jinja_text, json_values)}),
                                     max_size=3),
                            st.lists(json_values, max_size=3))
TOKEN_FIELDS = ["bos_token", "eos_token", "pad_token", "unk_token"]
token_values = st.one_of(st.sampled_from(["<|im_end|>", "<|endoftext|>", "not-a-token", ""]), json_values,
                         st.fixed_dictionaries({"content": json_values}))


@st.composite
def tokenizer_config_values(draw, base: dict):
    cfg = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["template", "template", "token", "other", "delete", "random_path", "top"]))
        if op == "template":
            cfg["chat_template"] = draw(template_values)
        elif op == "token":
            cfg[draw(st.sampled_from(TOKEN_FIELDS))] = draw(token_values)
        elif op == "other":
            key = draw(st.sampled_from(["model_max_length", "added_tokens_decoder", "tokenizer_class",
                                        "clean_up_tokenization_spaces", "additional_special_tokens"]))
            cfg[key] = draw(json_values)
        else:  # delete, random_path, top
            cfg = _generic_op(draw, cfg, op)
        if not isinstance(cfg, dict):
            break
    return cfg


@st.composite
def tokenizer_cases(draw, folders):
    which = draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "tokenizer_config.json",
                                  "chat_template.jinja"]))
    base = folders["sharded" if which == "chat_template.jinja" else draw(st.sampled_from(["single", "sharded"]))]
    raw = (base / which).read_bytes()
    if which == "tokenizer.json":
        how = draw(st.sampled_from(["structure", "structure", "bytes", "truncate"]))
        if how == "structure":
            content = draw(encoded(_set_path(draw, json.loads(raw)), data_edits=False))
        elif how == "bytes":
            content = draw(byte_edits(raw))
        else:
            content = raw[:draw(st.integers(0, len(raw) - 1))]
    elif which == "tokenizer_config.json":
        content = draw(encoded(draw(tokenizer_config_values(json.loads(raw)))))
    else:
        how = draw(st.sampled_from(["jinja", "jinja", "bytes", "not_utf8"]))
        if how == "jinja":
            content = draw(jinja_text).encode("utf-8", "surrogatepass")
        elif how == "bytes":
            content = draw(byte_edits(raw))
        else:
            content = raw[:10] + b"\xff\xfe" + raw[10:]
    return base, which, content


@given(data=st.data())
@fuzz(350)
def test_fuzz_tokenizer_files(folders, data):
    base, fname, content = data.draw(tokenizer_cases(folders))
    check(base, fname, content)


# ---- the slow, larger run ------------------------------------------------------------------------


@pytest.mark.slow
@given(data=st.data())
@fuzz(4_000)
def test_fuzz_all_loaders_long(folders, data):
    which = data.draw(st.sampled_from(["safetensors", "index", "config", "tokenizer"]))
    if which == "safetensors":
        check(*data.draw(safetensors_cases(folders)))
    elif which == "index":
        check(*data.draw(index_cases(folders)))
    elif which == "config":
        content = data.draw(encoded(data.draw(config_values(data.draw(st.sampled_from(_base_configs()))))))
        check(folders["single"], "config.json", content)
    else:
        check(*data.draw(tokenizer_cases(folders)))


# ---- hand-written cases: each failure class the fuzzer found, and the valid folders ------------------


def test_valid_folders_load(folders):
    for base in folders.values():
        assert check(base, "config.json", (base / "config.json").read_bytes()) == "ok"
        spec, ck, tok = load_folder(base)
        assert spec.num_layers == 2 and len(ck.keys()) == len(_tensors()) and tok.chat_template == CHATML
        assert tok.apply_chat_template(MESSAGES).startswith("<|im_start|>system\nBe terse.<|im_end|>")


def _config(**changes) -> bytes:
    cfg = {**CONFIG, **changes}
    return _dumps({k: v for k, v in cfg.items() if v is not DROP})


def _header(data: bytes, edit) -> bytes:
    n, header, body = _split(data)
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


DROP = object()
CONFIG_CASES = [  # what escaped before (the exception class), and what the message now says
    (b"null", "must hold a JSON object"),  # AttributeError
    (b"[1, 2]", "must hold a JSON object"),  # AttributeError
    (DEEP, "nested too deeply"),  # RecursionError
    (b'{"hidden_size": ' + LONG_INT + b"}", "over 4,300 digits"),  # ValueError
    (b'{"hidden_size": 16\xff}', "not UTF-8"),  # UnicodeDecodeError (already a KtError)
    (_config(hidden_size=DROP), "lacks 'hidden_size'"),  # KeyError
    (_config(hidden_size={}), r"hidden_size=\{\} is invalid"),  # TypeError
    (_config(hidden_size="16"), "hidden_size='16' is invalid"),  # int("16") was accepted
    (_config(num_attention_heads=0), "num_attention_heads=0 is invalid"),  # ZeroDivisionError
    (_config(head_dim=None, hidden_size=1, num_attention_heads=2), "hidden_size=1 is invalid"),  # ZeroDivisionError
    (_config(num_hidden_layers=10**12), "num_hidden_layers=1000000000000 is invalid"),  # a hang: range(10**12)
    (_config(num_hidden_layers=float("inf")), "num_hidden_layers=inf is invalid"),  # OverflowError
    (_config(rms_norm_eps=float("nan")), "rms_norm_eps=nan is invalid"),  # NaN was accepted
    (_config(head_dim=-8), "head_dim=-8 is invalid"),  # a complex softmax scale
    (_config(head_dim=2**20), "head_dim=1048576 is invalid"),  # rope tables of 2**19 rows, per example
    (_config(head_dim=None, hidden_size=2**31 - 1, num_attention_heads=1), "the head dimension 2147483647"),
    (_config(head_dim=None, hidden_size=90, num_attention_heads=2), "rotary dimension 45"),  # RuntimeError
    (_config(rope_parameters={"partial_rotary_factor": 0.1}), "rotary dimension 0"),
    (_config(decoder_sparse_step=0), "decoder_sparse_step=0 is invalid"),  # ZeroDivisionError
    (_config(mlp_only_layers=5), "mlp_only_layers=5 is invalid"),  # TypeError
    (_config(eos_token_id=[[2]]), r"eos_token_id=\[\[2\]\] is invalid"),  # unhashable in Engine
    (_config(num_experts_per_tok=9), "num_experts_per_tok=9 must be from 1"),  # top-k over the experts
    (_config(num_key_value_heads=3), "num_key_value_heads=3 must divide"),
    (_config(moe_intermediate_size=DROP), "lacks 'moe_intermediate_size'"),  # KeyError
    (_config(rope_scaling={"rope_type": "longrope"}), "config.json: rope scaling 'longrope' is not supported"),
    (_config(rope_scaling={"rope_type": "linear"}), "rope scaling 'linear' needs factor"),  # KeyError in inv_freq
    (_config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}),
     "rope_scaling.beta_fast=-1 is invalid"),  # math domain error in inv_freq
    (_config(rope_scaling=[8]), r"rope_scaling=\[8\] is invalid"),
    (_config(rope_parameters={"partial_rotary_factor": float("nan")}), "partial_rotary_factor=nan is invalid"),
    (_config(sliding_window=4, use_sliding_window=True, layer_types=["full_attention"]),
     "layer_types has 1 entries for 2 layers"),  # IndexError in window()
    (_config(architectures="Qwen3MoeForCausalLM"), "architectures='Qwen3MoeForCausalLM' is invalid"),
    (_config(architectures=["FalconForCausalLM"]), "config.json: unsupported architecture"),
]


@pytest.mark.parametrize("content,match", CONFIG_CASES, ids=[m for _, m in CONFIG_CASES])
def test_config_failures_name_the_field(folders, content, match):
    msg = check(folders["single"], "config.json", content)
    assert re.search(match, msg), msg


def test_safetensors_failures_are_caught_before_allocating(folders):
    base = folders["single"]
    data = (base / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    emb = "model.embed_tokens.weight"

    def entry(**fields):
        return lambda h: h[emb].update(fields)

    cases = [
        (b"", "0 bytes, too short"),
        (struct.pack("<Q", 2**63) + data[8:], "header length field says 9223372036854775808 bytes"),
        (struct.pack("<Q", n + 1) + data[8:], "header is not valid JSON"),
        (data[:8 + n // 2], "header length field says"),
        (data[:len(data) - 1], "ends at byte .* of a .*-byte data section"),
        (data + b"\0", "1 bytes after the last tensor"),
        (_header(data, entry(shape=[2**62, 2**62])), "BF16 .* but its data_offsets span 640 bytes"),
        (_header(data, entry(shape=[10**4000] * 1000)), "BF16 .* but its data_offsets span 640 bytes"),
        (_header(data, entry(shape=[20, -16])), "not a list of non-negative integers"),
        (_header(data, entry(shape=[20.0, 16])), "not a list of non-negative integers"),
        (_header(data, entry(dtype="F128")), "unknown dtype 'F128'"),
        (_header(data, entry(dtype="F32")), "F32 .* but its data_offsets span 640 bytes"),
        (_header(data, entry(data_offsets=[0, 2**64])), r"data_offsets \[0, 18446744073709551616\]|ends at byte"),
        (_header(data, entry(data_offsets=[-640, 0])), r"data_offsets \[-640, 0\]"),
        (_header(data, entry(data_offsets="0-640")), "data_offsets '0-640'"),
        (_header(data, lambda h: h.update({emb: [1, 2]})), "described by"),
        (_header(data, lambda h: h.update({"__metadata__": {"format": 1}})), "__metadata__ must map"),
        (_header(data, lambda h: h[emb].update(data_offsets=h["model.norm.weight"]["data_offsets"])),
         "overlap|but its data_offsets span|unclaimed"),
    ]
    for content, match in cases:
        msg = check(base, "model.safetensors", content)
        assert re.search(match, msg), (match, msg)


def test_index_failures_name_the_index(folders, tmp_path):
    base = folders["sharded"]
    index = json.loads((base / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    first = sorted(wm)[0]
    cases = [
        ({**index, "weight_map": [1]}, "has no weight_map"),  # AttributeError
        ({**index, "weight_map": {first: 3}}, "maps tensor .* to 3, which is not a .safetensors file"),  # TypeError
        ({**index, "weight_map": {**wm, first: "/etc/passwd"}}, "not a .safetensors file in the model folder"),
        ({**index, "weight_map": {**wm, first: "../single/model.safetensors"}}, "not a .safetensors file"),
        ({**index, "weight_map": {**wm, first: "gone.safetensors"}}, "names shards that are missing: gone"),
        ({**index, "weight_map": {**wm, first: next(f for f in set(wm.values()) if f != wm[first])}},
         "which does not hold it"),  # was "the file is probably truncated"
    ]
    for value, match in cases:
        msg = check(base, "model.safetensors.index.json", _dumps(value))
        assert re.search(match, msg), (match, msg)


def test_tokenizer_failures_name_the_file(folders):
    single, sharded = folders["single"], folders["sharded"]
    cfg = json.loads((single / "tokenizer_config.json").read_text())
    cases = [
        (single, "tokenizer_config.json", b'"text"', "must hold a JSON object"),  # AttributeError
        (single, "tokenizer_config.json", _dumps({**cfg, "chat_template": []}), "chat_template=\\[\\]"),  # IndexError
        (single, "tokenizer_config.json", _dumps({**cfg, "chat_template": [{"name": "x"}]}),
         "it must be a string or a list"),  # KeyError
        (single, "tokenizer_config.json", _dumps({**cfg, "chat_template": 7}), "chat_template=7"),
        (single, "tokenizer_config.json", _dumps({**cfg, "bos_token": ["<s>"]}), "bos_token=\\['<s>'\\]"),  # TypeError
        (single, "tokenizer_config.json", _dumps({**cfg, "chat_template": "{% if %}"}),
         "chat template in .*tokenizer_config.json does not compile \\(line 1: "),  # was lazy, multi-line
        (single, "tokenizer_config.json", _dumps({**cfg, "chat_template": "{{ messages[9]['content'] }}"}),
         "chat template in .*tokenizer_config.json failed on these messages"),  # UndefinedError
        (single, "tokenizer_config.json", _dumps({**cfg, "chat_template": "{{ raise_exception('no system') }}"}),
         "failed on these messages \\(no system\\)"),  # TemplateError
        (sharded, "chat_template.jinja", b"{{ range(3) | tojson }}", "failed on these messages \\(TypeError"),
        (sharded, "chat_template.jinja", b"hi \xff there", "chat_template.jinja is not UTF-8"),  # UnicodeDecodeError
        (sharded, "chat_template.jinja", ("{% if x %}" * 300).encode(), "chat_template.jinja does not compile"),
        (single, "tokenizer.json", (single / "tokenizer.json").read_bytes()[:100], "tokenizer.json could not be"),
    ]
    for base, fname, content, match in cases:
        msg = check(base, fname, content)
        assert re.search(match, msg), (match, msg)


def test_nothing_is_unpickled(folders, tmp_path, monkeypatch):
    """Safetensors are never read through pickle, a pickle named .safetensors is refused as corrupt
    without running it, and .bin pickles stay refused unless allowed."""
    import pickle

    from kt_core.weights.checkpoint import Checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a loader unpickled something")

    for base in folders.values():
        with monkeypatch.context() as m:
            m.setattr(torch, "load", refuse)
            m.setattr(pickle, "load", refuse)
            m.setattr(pickle, "loads", refuse)
            m.setattr(pickle, "Unpickler", refuse)
            load_folder(base)

    class Evil:
        def __reduce__(self):
            return (exec, (f"open(r'{tmp_path / 'pwned'}', 'w').write('pwned')",))

    disguised = tmp_path / "disguised"
    shutil.copytree(folders["single"], disguised)
    torch.save({"x": Evil()}, disguised / "model.safetensors")
    with pytest.raises(KtError, match="model.safetensors is corrupt or truncated"):
        load_folder(disguised)
    bins = tmp_path / "bins"
    shutil.copytree(folders["single"], bins)
    (bins / "model.safetensors").unlink()
    torch.save({"x": Evil()}, bins / "pytorch_model.bin")
    with pytest.raises(KtError, match="only .bin \\(pickle\\) weights, which are not loaded by default"):
        Checkpoint(bins)
    with pytest.raises(KtError, match="pytorch_model.bin could not be loaded safely"):
        Checkpoint(bins, allow_bin=True)  # weights_only=True refuses the payload
    assert not (tmp_path / "pwned").exists()
