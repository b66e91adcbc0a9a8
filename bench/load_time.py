"""How long kt-core takes to load a checkpoint, quantizing it as it loads, and its peak memory.

    python bench/load_time.py [--model DIR] [--precisions bf16,int4,int4-asym,int8] [--repeats 3]
        [--threads 2] [--cold]

Each load runs in its own process (its peak RSS is its own); precisions alternate within a repeat.
The checkpoint's files are read once beforehand so the page cache holds them (what is measured is
kt-core's work, not the disk; ``--cold`` skips that, and says how much of the files the cache held
is then up to the OS). Prints a JSON line per load and one summary per precision (median seconds,
median peak RSS, and bytes of safetensors read per second of load)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_bench_model, emit, median, peak_rss_mb, repo_on_path, set_threads  # noqa: E402

PRECISIONS = {"bf16": ["model.dtype=bfloat16"],
              "int4": ["model.dtype=bfloat16", "quant=int4", "quant.dense=int4", "quant.group_size=32"],
              "int4-asym": ["model.dtype=bfloat16", "quant=int4", "quant.dense=int4", "quant.group_size=32",
                            "quant.symmetric=false"],
              "int8": ["model.dtype=bfloat16", "quant=int8", "quant.dense=int8"]}


def child(model: str, precision: str, threads: int) -> None:
    repo_on_path()
    set_threads(threads)
    import kt_core

    t = time.perf_counter()
    kt_core.Engine.from_pretrained(model, overrides=PRECISIONS[precision] + [f"device.cpu.threads={threads}"])
    print(json.dumps({"load_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--precisions", default="bf16,int4,int4-asym,int8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.threads)
    model = Path(a.model) if a.model else default_bench_model()
    precisions = a.precisions.split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        sys.exit(f"unknown precision {unknown[0]!r}; one of {', '.join(PRECISIONS)}")
    files = sorted(model.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    runs: dict[str, list[dict]] = {p: [] for p in precisions}
    for repeat in range(a.repeats):
        for prec in precisions:
            if not a.cold:
                for f in files:  # into the page cache
                    with open(f, "rb") as fh:
                        while fh.read(64 << 20):
                            pass
            out = subprocess.run([sys.executable, __file__, "--child", str(model), prec, "--threads", str(a.threads)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{prec}: the load failed:\n{out.stderr[-2000:]}")
            record = json.loads(out.stdout.strip().splitlines()[-1])
            record.update(precision=prec, repeat=repeat, threads=a.threads, cold=a.cold)
            runs[prec].append(record)
            emit(record)
    for prec, rs in runs.items():
        secs = median([r["load_s"] for r in rs])
        emit({"summary": prec, "model": str(model), "load_s": round(secs, 2),
              "peak_rss_mb": round(median([r["peak_rss_mb"] for r in rs])), "checkpoint_gb": round(size / 1e9, 2),
              "read_gb_per_s": round(size / 1e9 / secs, 3), "threads": a.threads, "cold": a.cold, "runs": len(rs)})


if __name__ == "__main__":
    main()
