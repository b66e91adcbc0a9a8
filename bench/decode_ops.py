"""Micro-benchmark: the decode step's per-layer ops on the native CPU kernels (native_ops) against
the torch reference (kt_core.backend.torch_ops), microseconds per call (median of many calls).

    python bench/decode_ops.py [--calls N] [--torch-threads 1] [--native-threads 2]

Shapes: a tiny model (B=1, Hq=4, Hkv=2, D=64, L=100, bf16; hidden 256) and a long context
(B=1, Hq=32, Hkv=4, D=128, L=4096, bf16; hidden 4096)."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kt_backends.cpu import native, native_ops
from kt_core.backend.torch_ops import attention, norm_rope


def median_us(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def case(name, B, Hq, Hkv, D, L, hidden, calls, dtype=torch.bfloat16, bs=16):
    g = torch.Generator().manual_seed(0)
    nb = B * ((L + bs - 1) // bs) + 4
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    per = (L + bs - 1) // bs
    bt = torch.randperm(nb, generator=g)[: B * per].view(B, per).to(torch.int32)
    sl = torch.full((B,), L, dtype=torch.int32)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, D, generator=g).to(dtype)
    x = torch.randn(B, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    cs = norm_rope.rope_cos_sin(D, max(L, 8192))
    pos = torch.full((B,), L - 1, dtype=torch.long)
    scale = D ** -0.5
    sinks = torch.zeros(Hq)
    rows = [
        ("attention_decode",
         lambda: attention.attention_decode(q, kc, vc, bt, sl, scale),
         lambda: native_ops.attention_decode(q, kc, vc, bt, sl, scale)),
        ("attention_decode window=128 + sinks",
         lambda: attention.attention_decode(q, kc, vc, bt, sl, scale, 128, sinks),
         lambda: native_ops.attention_decode(q, kc, vc, bt, sl, scale, 128, sinks)),
        ("rmsnorm [B, hidden]", lambda: norm_rope.rmsnorm(x, w, 1e-6), lambda: native_ops.rmsnorm(x, w, 1e-6)),
        ("rope q, k", lambda: norm_rope.rope(q, k, pos, cs), lambda: native_ops.rope(q, k, pos, cs)),
    ]
    print(f"\n{name}: B={B} Hq={Hq} Hkv={Hkv} D={D} L={L} hidden={hidden} {str(dtype).replace('torch.', '')}")
    print(f"  {'op':38s} {'torch us':>10s} {'native us':>10s} {'speedup':>8s}")
    for op, ref, nat in rows:
        t_ref, t_nat = median_us(ref, calls), median_us(nat, calls)
        print(f"  {op:38s} {t_ref:10.1f} {t_nat:10.1f} {t_ref / t_nat:7.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--native-threads", type=int, default=2)
    args = ap.parse_args()
    if not native_ops.available():
        raise SystemExit(f"native ops unavailable: {native_ops.why_unavailable()}")
    torch.set_num_threads(args.torch_threads)
    native.set_threads(args.native_threads)
    print(f"torch threads {torch.get_num_threads()}, {native.status()}")
    case("tiny model (48 layers, hidden 256)", 1, 4, 2, 64, 100, 256, args.calls)
    case("long context", 1, 32, 4, 128, 4096, 4096, max(50, args.calls // 20))


if __name__ == "__main__":
    main()
