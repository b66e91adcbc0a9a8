"""All-CPU vs hybrid vs all-GPU decode and prefill tokens/s on one accelerator, same synthetic
Qwen3-30B-A3B-shaped checkpoint. The hybrid run keeps about half of each layer's experts in
host RAM on the native CPU kernels (expert_policy.fraction=0.5, i.e. a GPU budget that holds
attention, dense weights and half the experts). JSON lines, one per configuration.

    python bench/gpu_hybrid.py --model DIR [--device cuda] [--new-tokens 64] [--prompt-tokens 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, peak_rss_mb  # noqa: E402

CONFIGS = {
    "all-cpu": ["topology=cpu_only"],
    "hybrid": ["topology=hybrid_1gpu", "topology.expert_policy.strategy=uniform", "topology.expert_policy.fraction=0.5"],
    "all-gpu": ["topology=single_gpu"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    a = ap.parse_args()
    import torch

    import kt_core

    ids = [(i * 7919) % 30000 + 100 for i in range(a.prompt_tokens)]
    for name in a.configs.split(","):
        overrides = ["model.dtype=bfloat16", *CONFIGS[name]] + ([f"device={a.device}"] if name != "all-cpu" else [])
        t0 = time.perf_counter()
        try:
            engine = kt_core.Engine.from_pretrained(a.model, overrides=overrides)
        except Exception as exc:  # report and go on with the next configuration
            emit({"config": name, "error": str(exc)})
            continue
        load_s = time.perf_counter() - t0
        engine.generate(ids[:32], max_new_tokens=4, ignore_eos=True)
        r = engine.generate(ids, max_new_tokens=a.new_tokens, ignore_eos=True)
        plan = engine.model.plan
        experts = {label: round(d.experts_per_layer(), 1) for label, d in plan.devices.items()}
        mem = {}
        if torch.cuda.is_available():
            mem["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        emit({"config": name, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "load_s": round(load_s, 1),
              "prefill_tokens_per_s": r.timing["prefill_tokens_per_s"],
              "decode_tokens_per_s": r.timing["decode_tokens_per_s"], "experts_per_layer": experts,
              "plan_est_decode_tokens_per_s": plan.est_decode_tokens_per_s, "peak_rss_mb": round(peak_rss_mb()), **mem})
        del engine


if __name__ == "__main__":
    main()
