"""A/B of native kernel builds in one process: the way to judge a kernel change on a noisy machine.

Each --rev (a git revision, "worktree" for the files as they are now, or dir:PATH for a folder of
native sources, e.g. an old revision with its ABI number raised) has its
backends/cpu/native/ sources compiled into its own shared library with setup.py's flags; all
are loaded side by side (ctypes, separate paths, so separate kernel state and thread pools) and
called in alternating blocks on the same packed weights, inputs and routings of one
Qwen3-30B-A3B-shaped MoE layer. The first call's outputs are compared bit for bit.

    python bench/ab_native.py --rev HEAD~1 --rev worktree --format int4 --tokens 1
    python bench/ab_native.py --rev main --rev worktree --format int8 --tokens 512 --blocks 5
    python bench/ab_native.py --rev HEAD~1 --rev worktree --format bf16 --tokens 512 --op gate_t --skew

--op: the MoE forward (``moe``), or one of training's transposed products through the frozen experts
(``gate_t`` / ``up_t`` / ``down_t``: kt_expert_rows_t, a bf16 model's backward). --skew routes tokens
by a fixed, uneven expert popularity (1 to ~120 rows an expert at 512 tokens, as the untrained router
of the synthetic checkpoints gives) instead of uniformly.

One JSON line per revision: median and 25th-percentile ms, the ratio to the first revision,
and the largest output difference from it. Revisions must share the worktree's native ABI
(weights are packed by the worktree's Python code). Needs a POSIX C++ compiler (c++); on
Windows, compare revisions by reinstalling each and running bench/moe_layer.py.
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, set_threads  # noqa: E402
from moe_layer import FORMATS, E, H, I, K, build, make_weights, routes  # noqa: E402

from kt_backends.cpu import native, native_grad  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NATIVE = Path("backends") / "cpu" / "native"


def sources(rev: str, into: Path) -> Path:
    """backends/cpu/native/ as of rev, copied into a fresh folder."""
    dst = into / rev.replace("/", "_").replace("~", "-").replace("^", "-").replace(":", "_")
    if rev == "worktree" or rev.startswith("dir:"):
        shutil.copytree(ROOT / NATIVE if rev == "worktree" else Path(rev[4:]), dst)
        return dst
    dst.mkdir(parents=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{NATIVE.as_posix()}"], cwd=ROOT,
                           capture_output=True, text=True)
    if names.returncode:
        sys.exit(f"--rev {rev}: {names.stderr.strip() or 'no native sources at that revision'}")
    for name in names.stdout.split():
        blob = subprocess.run(["git", "show", f"{rev}:{(NATIVE / name).as_posix()}"], cwd=ROOT, capture_output=True)
        (dst / name).write_bytes(blob.stdout)
    return dst


def compile_lib(src: Path) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None or sys.platform == "win32":
        sys.exit("ab_native.py needs a POSIX C++ compiler (c++, g++ or clang++) on PATH")
    out = src / "kt_cpu_ab.so"
    cmd = [cxx, "-O3", "-std=c++17", "-fvisibility=hidden", "-shared", "-fPIC",
           f"-I{sysconfig.get_paths()['include']}", str(src / "kt_cpu.cpp"), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"compiling {src} failed:\n{done.stderr[-3000:]}")
    return out


def alternate_blocks(n_builds: int, blocks: int, block: int, call) -> list[list[float]]:
    """Seconds of call(build, i) for each build, in alternating blocks of block + 1 calls (the first
    of a block wakes that build's workers and is not counted). Each round starts one build later than
    the round before: with a fixed order the build that always ran first read up to 2.5% slower than
    an identical build (AMX Xeon, 2026-12-03)."""
    times: list[list[float]] = [[] for _ in range(n_builds)]
    for b in range(blocks):
        for j in [(b + r) % n_builds for r in range(n_builds)]:
            time.sleep(0.002)  # let the previous build's workers go to sleep
            for c in range(block + 1):
                t0 = time.perf_counter()
                call(j, b * block + c)
                if c:
                    times[j].append(time.perf_counter() - t0)
    return times


def load(path: Path, threads: int, rev: str, variant: str | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.kt_abi_version() != native.ABI_VERSION or lib.kt_moe_args_size() != ctypes.sizeof(native._MoeArgs):
        sys.exit(f"--rev {rev}: native ABI {lib.kt_abi_version()}, the worktree packs weights for "
                 f"ABI {native.ABI_VERSION}: compare revisions that share it")
    lib.kt_moe_forward.argtypes = [ctypes.POINTER(native._MoeArgs)]
    lib.kt_set_threads(threads)
    if variant is not None:
        lib.kt_set_variant.argtypes = [ctypes.c_char_p]
        if lib.kt_set_variant(variant.encode()):
            sys.exit(f"--variant {variant}: unknown, or not supported by this CPU")
    return lib


def skewed_routes(T: int, seed: int):
    """K experts a token drawn by one fixed uneven popularity (the same for every set)"""
    pop = torch.rand(E, generator=torch.Generator().manual_seed(7)) ** 3 + 0.05
    g = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(pop.expand(T, E), K, generator=g)
    return ids, torch.softmax(torch.randn(T, K, generator=g), -1)


def rows_t_calls(packed, proj: str, sets):
    """kt_expert_rows_t arguments for each routing set: every route's row of a bf16-exact A [rows, M]"""
    from kt_backends.cpu.native_abi import _RowsTArgs

    M, Kw, fmt, group, f16, p = native_grad._sizes(packed, proj)
    keep, args = [], []
    for i, (ids, _) in enumerate(sets):
        counts = ids.flatten().bincount(minlength=E)
        offsets = torch.zeros(E + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        rows = int(counts.sum())
        A = torch.randn(rows, M, generator=torch.Generator().manual_seed(i)).bfloat16().float()
        C = torch.empty(rows, Kw)
        keep.append((offsets, A, C))
        args.append(_RowsTArgs(M, Kw, E, rows, M, Kw, fmt, group, f16, 0, 1, 0, offsets.data_ptr(), p,
                               A.data_ptr(), C.data_ptr(), None, 0))
    return args, [c for _, _, c in keep], keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", required=True,
                    help="git revision, 'worktree', or dir:PATH (a folder of native sources) (2 or more)")
    ap.add_argument("--format", default="int4", choices=sorted(FORMATS))
    ap.add_argument("--group", type=int, default=32, help="int4 group size")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=15, help="alternating blocks per revision")
    ap.add_argument("--block-size", type=int, default=0, help="calls per block (default: 20 at T=1, else 2)")
    ap.add_argument("--op", default="moe", choices=["moe", "gate_t", "up_t", "down_t"])
    ap.add_argument("--skew", action="store_true", help="uneven expert popularity (see above)")
    ap.add_argument("--variant", default=None,
                    help="force a kernel variant in every build (avx2, avx512, ...: what a CPU without AMX runs)")
    a = ap.parse_args()
    if len(a.rev) < 2:
        sys.exit("give at least two --rev (e.g. --rev HEAD --rev worktree)")
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.status()}")
    set_threads(a.threads)
    packed = native.pack(build(a.format, make_weights(), a.group))
    T = a.tokens
    # bf16 values, as a bf16 model's hidden states (round_bf16=1 below lets the kernels rely on it)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).bfloat16().float()
    # routings cycled so a call cannot reuse the previous call's experts from cache; the tensors
    # behind the raw pointers stay referenced by `sets` and `outs`
    route = skewed_routes if a.skew else routes
    n_sets = 16 if a.op == "moe" else 2  # the products' A and C are ~30 MB a set at 512 tokens
    sets = [(ids.long().contiguous(), w.float().contiguous()) for ids, w in (route(T, 1000 + i) for i in range(n_sets))]
    local_of, gate, up, down, _, _, fmt, group, _, _, dfmt, dgroup, f16 = packed._prepared()
    outs = [torch.empty(T, H) for _ in sets]
    args = [native._MoeArgs(T, H, I, K, E, local_of.numel(), fmt, group, 0,
                            x.data_ptr(), ids.data_ptr(), w.data_ptr(), local_of.data_ptr(), gate, up, down,
                            out.data_ptr(), 0, 1, dfmt, dgroup, *f16)  # revisions before ABI 13 ignore f16
            for (ids, w), out in zip(sets, outs)]
    name = "kt_moe_forward"
    if a.op != "moe":
        args, outs, keep = rows_t_calls(packed, a.op[:-2], sets)  # noqa: F841 (keep: the buffers args point to)
        name = "kt_expert_rows_t"
    with tempfile.TemporaryDirectory() as tmp:
        libs = [load(compile_lib(sources(rev, Path(tmp))), a.threads, rev, a.variant) for rev in a.rev]
        fns = [getattr(lib, name) for lib in libs]
        for fn in fns:
            fn.argtypes = [ctypes.POINTER(type(args[0]))]
        first = []
        for rev, fn in zip(a.rev, fns):
            if fn(ctypes.byref(args[0])) != 0:
                sys.exit(f"{rev}: {name} refused the call (an ABI older than the worktree's?)")
            first.append(outs[0].clone())
        block = a.block_size or (20 if T == 1 else 2)

        def call(j: int, i: int) -> None:
            rc = fns[j](ctypes.byref(args[i % len(args)]))
            if rc != 0:
                sys.exit(f"{a.rev[j]}: {name} returned {rc}")
        times = alternate_blocks(len(libs), a.blocks, block, call)
    base = statistics.median(times[0])
    for rev, t, out in zip(a.rev, times, first):
        ms = statistics.median(t)
        emit({"impl": "ab", "rev": rev, "op": a.op, "skew": a.skew, "variant": a.variant or "default",
              "format": a.format, "tokens": T,
              "threads": a.threads, "ms": ms * 1e3,
              "p25_ms": statistics.quantiles(t, n=4)[0] * 1e3, "ratio_vs_first": ms / base,
              "max_abs_diff_vs_first": float((out - first[0]).abs().max())})


if __name__ == "__main__":
    main()
