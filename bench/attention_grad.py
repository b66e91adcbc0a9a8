"""Causal attention forward + backward while fine-tuning: kt-core's (kt_core/train/native_attention.py on
backends/cpu/chunked_attention.py: its backward, and its forward without AMX; torch's forward with AMX;
on CPUs whose torch multiplies bf16 on its scalar loop, the float32 chunks of chunked_attention_f32.py)
vs torch's SDPA forward + backward in bf16 and on float32 copies (what the trainer ran there before),
same inputs, same process, alternating; one JSON line per round and a summary (medians, the ratio to
torch's faster one).

    python bench/attention_grad.py                       # Qwen3-30B-A3B's attention: 32 / 4 heads of 128
    python bench/attention_grad.py --tokens 512,2048 --rounds 5 --threads 2

rel_err: each implementation's gradients (q, k, v together) against float64 autograd through SDPA.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median, repo_on_path, set_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls a round (median)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    repo_on_path()
    import torch
    import torch.nn.functional as F

    from kt_core.train import native_attention as na

    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    scale = 1 / math.sqrt(D)
    for n in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator().manual_seed(n)
        q = (torch.randn(n, H, D, generator=g) * 2).bfloat16().transpose(0, 1)  # as the model lays it out
        k = (torch.randn(n, Hkv, D, generator=g) * 2).bfloat16().transpose(0, 1)
        v = torch.randn(n, Hkv, D, generator=g).bfloat16().transpose(0, 1)
        do = torch.randn(H, n, D, generator=g).bfloat16()

        def sdpa(a, b, c):
            return F.scaled_dot_product_attention(a[None], b[None], c[None], is_causal=True, scale=scale,
                                                  enable_gqa=H != Hkv)[0]

        impls = {"kt-core": lambda a, b, c: na.attend(a, b, c, None, scale), "torch-sdpa": sdpa,
                 "torch-sdpa-float32": lambda a, b, c: sdpa(a.float(), b.float(), c.float()).to(a.dtype)}
        if not na.takes(q.requires_grad_(), k, v, None, None):
            emit({"impl": "kt-core", "tokens": n, "skipped": "native_attention.takes() is False here (needs the "
                  "native ops, and bf16 pair products with torch's mkldnn fp32_precision switch, or torch's bf16 "
                  "products on its scalar loop)"})
            continue

        def grads(fn, dtype=torch.bfloat16):
            a, b, c = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
            fn(a, b, c).backward(do.to(dtype))
            return torch.cat([t.grad.flatten().double() for t in (a, b, c)])

        ref = grads(sdpa, torch.float64)
        errs = {name: float((grads(fn) - ref).norm() / ref.norm()) for name, fn in impls.items()}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(args.rounds):
            for name, fn in impls.items():
                grads(fn)  # warm
                ts = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    grads(fn)
                    ts.append(time.perf_counter() - t0)
                times[name].append(median(ts) * 1e3)
                emit({"impl": name, "tokens": n, "round": r, "ms": times[name][-1], "threads": args.threads})
        ref_ms = min(median(times[name]) for name in impls if name.startswith("torch"))
        for name in impls:
            emit({"impl": name, "summary": True, "tokens": n, "heads": H, "kv_heads": Hkv, "head_dim": D,
                  "ms": median(times[name]), "rel_err": errs[name],
                  "speedup_vs_torch_best": ref_ms / median(times[name]), "threads": args.threads})


if __name__ == "__main__":
    main()
