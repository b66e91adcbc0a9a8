"""The hybrid executor's overlap, measured on two logical CPU devices (no GPU needed):
one MoE layer whose experts are split between cpu:0 and cpu:1 (separate worker pools, half
the threads each). Prints, per token count, each share run alone, their sum, and the mixed
step; overlap shows as mixed_ms < sum_ms.

    python bench/hybrid.py --tokens 1,16,128 --repeats 7
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median  # noqa: E402
from e2e import default_model  # noqa: E402


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import kt_core

    engine = kt_core.Engine.from_pretrained(a.model or default_model(), overrides=[
        "topology=hybrid_cpu", f"device.cpu.threads={a.threads}", "topology.expert_policy.fraction=0.5"])
    layer = next(layer.ffn for layer in engine.model.layers if hasattr(layer.ffn, "shards"))
    (be0, _, ex0), (be1, _, ex1) = layer.shards
    H = engine.spec.hidden_size
    for T in [int(t) for t in a.tokens.split(",")]:
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(engine.model.dtype)
        with torch.inference_mode():
            w, ids = layer.route(be0, x)
            share0 = timed(lambda: be0.moe_experts(x, ids, w, ex0), a.repeats)
            share1 = timed(lambda: be1.moe_experts(x, ids, w, ex1), a.repeats)
            mixed = timed(lambda: layer(be0, x), a.repeats)
        emit({"bench": "hybrid_overlap", "tokens": T, "share_cpu0_ms": share0, "share_cpu1_ms": share1,
              "sum_ms": share0 + share1, "mixed_ms": mixed, "mixed_over_sum": mixed / (share0 + share1),
              "threads_per_device": max(1, a.threads // 2)})


if __name__ == "__main__":
    main()
