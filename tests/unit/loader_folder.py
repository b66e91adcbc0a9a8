"""The tiny valid model folder the loader tests break copies of, the loader they call, and the
check every broken copy must pass: it loads, or it fails with a one-line KtError naming the broken
file (never another exception type, a crash or a hang)."""
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

from kt_core.errors import KtError


SECONDS_PER_EXAMPLE = 30.0  # a hang bound, not a timing: an example takes a few ms even on a loaded CI box

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


# ---- byte-level helpers the fuzzer and the hand-written cases share ----------------------------------

def _dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN / Infinity literals, as Python writes them


DEEP = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
LONG_INT = b"9" * 5_000  # Python refuses int strings over 4,300 digits


def _split(data: bytes):
    """A safetensors file's (header length, header, rest)."""
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]
