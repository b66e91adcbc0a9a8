"""One Qwen3-30B-A3B-shaped MoE layer (hidden 2048, intermediate 768, 128 experts, top-8) on
the CPU: kt-core's native kernels vs the torch path, per weight format and token count.

    python bench/moe_layer.py                                  # T = 1,16,128,512; bf16,int8,int4
    python bench/moe_layer.py --tokens 1,128 --formats bf16,int4 --repeats 7 --threads 2

One JSON line per (impl, format, tokens): ms (median), tokens_per_s, weight_gbps (bytes of
the experts the tokens touched / time), bw_fraction (of the memory bandwidth measured in this
run by the extension's native multi-threaded streaming loop), rel_err (max error against an
fp32 reference on the dequantized weights, relative to the reference's max), quant_err (the
format's own error: dequantized vs original weights, relative).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median, repo_on_path, set_threads  # noqa: E402

repo_on_path()
from kt_backends.cpu import native  # noqa: E402
from kt_core.backend.torch_ops.moe import moe_experts as torch_moe  # noqa: E402
from kt_core.weights.quant import ExpertWeights, dequantize, quantize  # noqa: E402

E, K, H, I = 128, 8, 2048, 768


def make_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, *shape, generator=g) * shape[1] ** -0.5).to(torch.bfloat16)
            for shape in ((I, H), (I, H), (H, I))]


def build(fmt: str, base, group: int):
    if fmt == "bf16":
        ws = base
    else:
        ws = [quantize(w.float(), fmt, group_size=group) for w in base]
    return ExpertWeights(torch.arange(E), *ws)


def routes(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def timed(fn, repeats: int, n_sets: int) -> float:
    """Median time of fn(i) over repeats, cycling routing sets i so a decode step cannot reuse
    the previous step's experts from cache."""
    fn(0)  # warm-up
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r % n_sets)
        times.append(time.perf_counter() - t)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,128,512")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--group", type=int, default=32, help="int4 group size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch-path rows (slow at large T)")
    ap.add_argument("--sets", type=int, default=16, help="distinct routings cycled while timing")
    a = ap.parse_args()
    set_threads(a.threads)
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.status()}")
    native.set_threads(a.threads)
    bw = native.memory_bandwidth_gbps(megabytes=1024, iters=5)
    emit({"impl": "membw", "gbps": bw, "threads": a.threads, "variant": native.variant()})
    base = make_weights()
    for fmt in a.formats.split(","):
        ex = build(fmt, base, a.group)
        packed = native.pack(ex)
        deq = [dequantize(w) for w in (ex.gate, ex.up, ex.down)]
        ref_ex = ExpertWeights(torch.arange(E), *deq)
        quant_err = max(float((d - b.float()).abs().max() / b.float().abs().max()) for d, b in zip(deq, base))
        per_expert = packed.nbytes() / E
        for T in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
            sets = [routes(T, T * 1000 + i) for i in range(a.sets)]
            ids, w = sets[0]
            touched = median([int(i.unique().numel()) for i, _ in sets]) * per_expert
            ref = torch_moe(x.float(), ids, w, ref_ex)
            impls = [("kt-core", lambda i: native.moe_forward(packed, x, *sets[i]))]
            if not a.no_torch:
                impls.append(("torch", lambda i: torch_moe(x, *sets[i], ex)))
            for impl, fn in impls:
                out = fn(0)
                s = timed(fn, a.repeats, a.sets)
                emit({"impl": impl, "format": fmt if fmt != "int4" else f"int4_g{a.group}", "tokens": T,
                      "threads": a.threads, "ms": s * 1e3, "tokens_per_s": T / s, "weight_gbps": touched / s / 1e9,
                      "bw_fraction": touched / s / 1e9 / bw,
                      "rel_err": float((out.float() - ref).abs().max() / ref.abs().max()), "quant_err": quant_err})


if __name__ == "__main__":
    main()
