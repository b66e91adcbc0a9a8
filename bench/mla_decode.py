"""DeepSeek MLA decode attention on the CPU: the native call (kt_backends.cpu.native_mla, the
absorbed form in one call) against the torch reference the CPU backend ran before
(kt_core.backend.torch_ops.attention.attention_mla, one intra-op thread as in a decode step).

    python bench/mla_decode.py [--heads 16,128] [--lens 64,1024,4096] [--threads 2] [--repeats 5]

Shapes: DeepSeek-V2/V3's head dims (no-rope 128, rope 64, kv_lora_rank 512, v 128), bf16 weights
and latent cache, one sequence (B=1); 16 heads is DeepSeek-V2-Lite's, 128 V3's / Kimi-K2's.
One JSON line per (heads, context): ms of each (median of --repeats alternating rounds), the
speedup, the bytes the call must read (both absorbed halves and the context's latent rows), the
native call's GB/s and its fraction of the bandwidth measured in this run (native streaming loop).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kt_backends.cpu import native, native_mla
from kt_core.backend.torch_ops import attention


def ms(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default="16,128")
    ap.add_argument("--lens", default="64,1024,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vs-variant", default=None,
                    help="also time the native call on this kernel variant (e.g. avx512 against amx's tiles)")
    args = ap.parse_args()
    if not native_mla.native_ops.available():
        raise SystemExit(f"native ops unavailable: {native_mla.native_ops.why_unavailable()}")
    native.set_threads(args.threads)
    torch.set_num_threads(1)  # a decode step's torch ops run on one intra-op thread (CpuBackend.begin_step)
    bw = native.memory_bandwidth_gbps(megabytes=1024, iters=5)
    print(json.dumps({"impl": "membw", "gbps": bw, "threads": args.threads, "variant": native.variant()}), flush=True)
    dn, dr, lora, dv, bs = 128, 64, 512, 128, 64
    g = torch.Generator().manual_seed(0)
    for H in (int(h) for h in args.heads.split(",")):
        w_uk = torch.randn(H, dn, lora, generator=g).bfloat16()
        w_uv = torch.randn(H, dv, lora, generator=g).bfloat16()
        for L in (int(x) for x in args.lens.split(",")):
            nb = (L + bs - 1) // bs
            latent = torch.randn(nb + 2, bs, 1, lora + dr, generator=g).bfloat16()
            table = torch.randperm(nb + 2, generator=g)[:nb].view(1, nb).to(torch.int32)
            lens = torch.tensor([L], dtype=torch.int32)
            q = torch.randn(1, H, dn + dr, generator=g).bfloat16()
            qn, qp, qsl, scale = q[..., :dn], q[..., dn:], torch.tensor([0, 1], dtype=torch.int32), (dn + dr) ** -0.5
            ref = attention.attention_mla(qn, qp, latent, w_uk, w_uv, table, lens, qsl, scale)
            out = native_mla.mla_decode(qn, qp, latent, w_uk, w_uv, table, lens, scale)
            err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
            calls = max(3, int(200 / H))
            t_ref, t_nat, t_vs = [], [], []
            best = native.variant()
            for _ in range(args.repeats):  # alternating
                t_ref.append(ms(lambda: attention.attention_mla(qn, qp, latent, w_uk, w_uv, table, lens, qsl, scale),
                                calls))
                t_nat.append(ms(lambda: native_mla.mla_decode(qn, qp, latent, w_uk, w_uv, table, lens, scale),
                                calls * 4))
                if args.vs_variant:
                    native.set_variant(args.vs_variant)
                    t_vs.append(ms(lambda: native_mla.mla_decode(qn, qp, latent, w_uk, w_uv, table, lens, scale),
                                   calls * 4))
                    native.set_variant(best)
            r, n = statistics.median(t_ref), statistics.median(t_nat)
            vs = {f"{args.vs_variant}_ms": round(statistics.median(t_vs), 3),
                  f"speedup_vs_{args.vs_variant}": round(statistics.median(t_vs) / n, 2)} if t_vs else {}
            nbytes = (w_uk.numel() + w_uv.numel() + L * (lora + dr)) * 2
            print(json.dumps({"heads": H, "context": L, "torch_ms": round(r, 3), "native_ms": round(n, 3),
                              "speedup": round(r / n, 2), "mbytes": round(nbytes / 1e6, 1),
                              "native_gbps": round(nbytes / n / 1e6, 1), "bw_fraction": round(nbytes / n / 1e6 / bw, 2),
                              "rel_err_vs_torch": err, "threads": args.threads, "variant": native.variant(), **vs}),
                  flush=True)


if __name__ == "__main__":
    main()
