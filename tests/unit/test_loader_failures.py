"""Hand-written loader failures: each failure class the fuzzer (test_fuzz_loaders.py) found, named
by the message it now gets, and the valid folders loading."""
from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch

from kt_core.errors import KtError

from tests.unit.loader_folder import (  # noqa: F401 (folders: the fixture)
    CHATML, CONFIG, DEEP, LONG_INT, MESSAGES, _dumps, _split, _tensors, check, folders, load_folder)


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
    (_config(tie_word_embeddings="false"), "tie_word_embeddings='false' is invalid"),  # read as true
    (_config(norm_topk_prob=1), "norm_topk_prob=1 is invalid"),
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
