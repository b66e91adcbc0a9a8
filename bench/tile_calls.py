"""One AMX tile-kernel call timed alone: what a panel pair costs with its panels in cache and streamed
from memory, per format, input width and row count (bench/tile_calls.cpp, built here from the native
headers, so it times the kernels as they are in the worktree).

    python bench/tile_calls.py                      # the Qwen3-30B-A3B shapes: K 2048 (gate/up), 768 (down)
    python bench/tile_calls.py --formats int4_pr --k 2048 --rows 16,32,48

One JSON line per case: microseconds a call, nanoseconds per 32 inputs of K (a bf16 B tile's step),
the weights' GB/s. The in-cache line is the products' cost, the streamed line adds the panels'
stream; their gap against --membw (the native read loop, one thread: what one core can stream) says
whether a call is bound by its products or by memory. One thread, so run nothing else beside it.
Needs Linux on an AMX CPU and a C++ compiler (c++, g++ or clang++).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "backends" / "cpu" / "native"


def build(into: Path) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None or not sys.platform.startswith("linux"):
        sys.exit("tile_calls.py needs Linux and a C++ compiler (c++, g++ or clang++) on PATH")
    exe = into / "tile_calls"
    done = subprocess.run([cxx, "-O3", "-std=c++17", "-Wno-psabi", f"-I{NATIVE}", str(Path(__file__).with_suffix(".cpp")),
                           "-o", str(exe)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"building tile_calls.cpp failed:\n{done.stderr[-3000:]}")
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,int8,int4_pr,int4_g32")
    ap.add_argument("--k", default="2048,768", help="input widths (multiples of 64)")
    ap.add_argument("--rows", default="16,32", help="rows a call (one expert's tokens), 1..64")
    ap.add_argument("--no-membw", action="store_true", help="skip the one-thread bandwidth line")
    a = ap.parse_args()
    try:
        from kt_backends.cpu import native
    except ImportError:
        native = None
    if native is not None and native.available():
        if native.variant() != "amx":
            sys.exit(f"tile_calls.py times the AMX tile kernels; this CPU runs the {native.variant()!r} variant")
        if not a.no_membw:
            native.set_threads(1)
            emit({"impl": "membw", "threads": 1, "gbps": native.memory_bandwidth_gbps(megabytes=1024, iters=5)})
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for fmt in a.formats.split(","):
            for k in a.k.split(","):
                for rows in a.rows.split(","):
                    for mb in (1, 256):  # in cache, then streamed
                        done = subprocess.run([str(exe), fmt, k, rows, str(mb)], capture_output=True, text=True)
                        if done.returncode:
                            sys.exit(f"tile_calls {fmt} {k} {rows} {mb}: {(done.stdout + done.stderr).strip()}")
                        sys.stdout.write(done.stdout)
                        sys.stdout.flush()


if __name__ == "__main__":
    main()
