"""How much each weight format changes the model's next-token distribution, against bf16.

    python bench/quant_quality.py --model DIR [--tokens 512] [--threads 2]
        [--config NAME=OVERRIDE,OVERRIDE ...]   # default: experts-only and whole-model int8 / int4

The mean KL divergence KL(bf16 || format) over positions tokens/2 .. tokens-2 of one token
sequence (llama-perplexity's convention: the second half of a 512-token chunk, the last position
left out), and how often the top-1 token agrees. One JSON line per format. llama.cpp's own figures
for its Q8_0 / Q4_0 come from bench/vs_llamacpp.py --llama-perplexity.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, repo_on_path, set_threads  # noqa: E402
from vs_llamacpp import prompt_ids  # noqa: E402

CONFIGS = {
    "experts int8": ["quant=int8"],
    "experts int4 g32": ["quant=int4", "quant.group_size=32"],
    "experts int4 g128": ["quant=int4", "quant.group_size=128"],
    "all int8": ["quant=int8", "quant.dense=int8"],
    "all int8 head w8a8": ["quant=int8", "quant.dense=int8", "quant.head=w8a8"],
    "all int4 g32": ["quant=int4", "quant.dense=int4", "quant.group_size=32"],
    "all int4 g32 head int8": ["quant=int4", "quant.dense=int4", "quant.head=int8", "quant.group_size=32"],
}


def log_probs(model: Path, overrides: list[str], ids: list[int], threads: int):
    import torch

    import kt_core

    engine = kt_core.Engine.from_pretrained(model, overrides=["model.dtype=bfloat16", *overrides,
                                                                f"device.cpu.threads={threads}"])
    lp = torch.log_softmax(engine.logits(ids)[len(ids) // 2:-1].float(), dim=-1)
    del engine
    gc.collect()
    return lp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=OVERRIDE[,OVERRIDE...] (repeatable; replaces the defaults)")
    a = ap.parse_args()
    set_threads(a.threads)
    repo_on_path()
    import json

    configs = {c.split("=", 1)[0]: c.split("=", 1)[1].split(",") for c in a.config} if a.config else CONFIGS
    vocab = json.loads((a.model / "config.json").read_text())["vocab_size"]
    ids = prompt_ids(vocab, a.tokens)
    ref = log_probs(a.model, [], ids, a.threads)
    for name, overrides in configs.items():
        t = time.perf_counter()
        lp = log_probs(a.model, overrides, ids, a.threads)
        kl = (ref.exp() * (ref - lp)).sum(-1)
        emit({"format": name, "overrides": overrides, "kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
              "top1_agree": float((ref.argmax(-1) == lp.argmax(-1)).float().mean()), "positions": int(kl.numel()),
              "seconds": round(time.perf_counter() - t, 1)})


if __name__ == "__main__":
    main()
