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

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.fuzz_strategies import (_generic_op, _set_path, byte_edits, encoded, fuzz, json_values, numbers,
                                        scalars)
from tests.unit.loader_folder import (  # noqa: F401 (folders: the fixture)
    CHATML, CONFIG, _dumps, _split, check, folders)


# ---- safetensors ----------------------------------------------------------------------------------

DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "F8_E4M3",
          "F8_E5M2", "F8_E8M0", "F4", "C64"]
dtype_values = st.one_of(st.sampled_from(DTYPES + ["f32", "F128", "", "FLOAT"]), json_values)
int_lists = st.lists(numbers, max_size=5)


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


@pytest.mark.slow  # 300 examples: ~9 s on 2 cores
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
