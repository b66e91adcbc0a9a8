"""A/B of native kernel builds on the one-token dense GEMV (a bf16 lm_head or projection streamed
row-major from DRAM), alternating builds in one process, as bench/ab_native.py does for the MoE.

    python bench/ab_dense.py --rev HEAD~1 --rev worktree [--rows 151936] [--cols 2048] [--blocks 8]

One JSON line per revision: median ms, GB/s of weights, the ratio to the first revision, and the
largest output difference from it. Pick rows x cols well above the L3 cache, or the rows stream
from cache. Needs a POSIX C++ compiler (as ab_native.py).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from ab_native import alternate_blocks, compile_lib, sources  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", required=True, help="git revision, 'worktree', or dir:PATH (2 or more)")
    ap.add_argument("--rows", type=int, default=151936, help="output features (default: Qwen3's vocabulary)")
    ap.add_argument("--cols", type=int, default=2048, help="input features")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=8, help="alternating blocks of 5 calls per revision")
    ap.add_argument("--float-inputs", action="store_true", help="inputs that are not bf16 values")
    a = ap.parse_args()
    if len(a.rev) < 2:
        sys.exit("give at least two --rev (e.g. --rev HEAD --rev worktree)")
    M, K = a.rows, a.cols
    w = (torch.randn(M, K, generator=torch.Generator().manual_seed(0)) * K ** -0.5).bfloat16()
    # bf16 values, as a bf16 model's activations are (AVX512-BF16 CPUs take another kernel for them);
    # --float-inputs: values bf16 cannot hold (an fp32 caller's)
    xs = [torch.randn(1, K) if a.float_inputs else torch.randn(1, K).bfloat16().float() for _ in range(4)]
    outs = [torch.empty(1, M) for _ in a.rev]
    with tempfile.TemporaryDirectory() as tmp:
        libs = []
        for rev in a.rev:
            lib = ctypes.CDLL(str(compile_lib(sources(rev, Path(tmp)))))
            lib.kt_set_threads(a.threads)
            libs.append(lib)

        def call(j: int, i: int) -> None:
            rc = libs[j].kt_linear_bf16(ctypes.c_void_p(xs[i % 4].data_ptr()), ctypes.c_int64(1), ctypes.c_int64(K),
                                        ctypes.c_void_p(w.data_ptr()), ctypes.c_int64(M), None,
                                        ctypes.c_void_p(outs[j].data_ptr()))
            if rc != 0:
                sys.exit(f"{a.rev[j]}: kt_linear_bf16 returned {rc}")
        times = alternate_blocks(len(libs), a.blocks, 5, call)
    base = statistics.median(times[0])
    for rev, t, out in zip(a.rev, times, outs):
        s = statistics.median(t)
        emit({"impl": "ab_dense", "rev": rev, "rows": M, "cols": K, "threads": a.threads, "ms": s * 1e3,
              "inputs": "float" if a.float_inputs else "bf16", "weight_gbps": M * K * 2 / s / 1e9, "ratio_vs_first": s / base,
              "max_abs_diff_vs_first": float((out - outs[0]).abs().max())})


if __name__ == "__main__":
    main()
