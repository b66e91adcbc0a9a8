"""End-to-end prefill and decode tokens/s of kt-core vs Hugging Face transformers, same
synthetic checkpoint, same thread count, each implementation in its own process (so peak
RSS is its own), repeated alternately; prints one JSON line per run and a summary line per
implementation with medians and the ratio to transformers.

    python bench/e2e.py                                   # builds the default benchmark model once
    python bench/e2e.py --model DIR --prompt-tokens 256 --new-tokens 32 --repeats 3 --threads 2

Default model: 2-layer Qwen3-30B-A3B shapes (hidden 2048, 128 experts, top-8), vocab 32000
(Mixtral's tokenizer), bf16, written by `kt synth` into the kt cache folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, default_bench_model, emit, peak_rss_mb, set_threads, summarize  # noqa: E402


def default_model() -> Path:
    return default_bench_model()


def run_one(impl: str, model: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    import torch

    set_threads(threads)
    ids = [(i * 7919) % 30000 + 100 for i in range(prompt_tokens)]
    t0 = time.perf_counter()
    if impl == "kt-core":
        import kt_core

        engine = kt_core.Engine.from_pretrained(model, overrides=["model.dtype=bfloat16"])
        load_s = time.perf_counter() - t0
        engine.generate(ids[:16], max_new_tokens=4, ignore_eos=True)  # warm-up
        t = time.perf_counter()
        engine.generate(ids, max_new_tokens=1, ignore_eos=True)
        prefill_s = time.perf_counter() - t
        r = engine.generate(ids, max_new_tokens=new_tokens + 1, ignore_eos=True)
        decode_s = r.timing["decode_s"]
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
        load_s = time.perf_counter() - t0
        x = torch.tensor([ids])
        with torch.inference_mode():
            m.generate(x[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
            t = time.perf_counter()
            out = m(x, use_cache=True)
            prefill_s = time.perf_counter() - t
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()  # decode only: one token at a time over the cache, greedy
            for _ in range(new_tokens):
                out = m(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode_s = time.perf_counter() - t
    return {"impl": impl, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads,
            "load_s": round(load_s, 2), "prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens_per_s": new_tokens / decode_s, "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="kt-core,transformers")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        emit(run_one(a.child, a.model, a.prompt_tokens, a.new_tokens, a.threads))
        return
    model = a.model or default_model()
    runs = alternate(__file__, a.impls.split(","), a.repeats,
                     ["--model", str(model), "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                      "--threads", str(a.threads)])
    summarize(runs, ['prefill_tokens_per_s', 'decode_tokens_per_s', 'peak_rss_mb'],
              {'prefill_tokens_per_s': 'prefill_vs_transformers', 'decode_tokens_per_s': 'decode_vs_transformers'})


if __name__ == "__main__":
    main()
