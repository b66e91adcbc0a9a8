"""Helpers shared by the benchmark scripts: JSON lines, medians, peak memory."""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM on Linux, peak working set on Windows)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import psutil

    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def repo_on_path() -> None:
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def default_bench_model() -> Path:
    """The benchmarks' model: 2 layers of Qwen3-30B-A3B (128 experts top-8), vocab 32000 (Mixtral's
    tokenizer), bf16, written by kt synth into the kt cache folder once."""
    from kt_core.models.synthetic import cache_dir, synthesize

    path = cache_dir() / "models" / "bench-qwen3-30b-a3b-2l-v32000"
    if not (path / "model.safetensors.index.json").is_file():
        print(f"building the benchmark model into {path} (once)", file=sys.stderr)
        synthesize(path, arch="qwen3_moe", preset="qwen3-30b-a3b", layers=2, tokenizer="mistral",
                   shape={"vocab_size": 32000})
    return path


def alternate(script: str, impls: list[str], repeats: int, child_args: list[str],
              flip: bool = False) -> dict[str, list[dict]]:
    """Run ``script --child IMPL *child_args`` once per implementation per repeat, alternating, each in
    its own process (``flip``: every other repeat in reverse order, so neither side always runs first);
    print each run's JSON line and return the runs per implementation."""
    import subprocess

    runs: dict[str, list[dict]] = {}
    for i in range(repeats):
        for impl in (impls[::-1] if flip and i % 2 else impls):
            cmd = [sys.executable, script, "--child", impl, *child_args]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(out, flush=True)
            runs.setdefault(impl, []).append(json.loads(out))
    return runs


def summarize(runs: dict[str, list[dict]], keys: list[str], ratios: dict[str, str]) -> None:
    """One summary JSON line per implementation: the medians of ``keys``, and for each ``ratios`` entry
    (key -> name) that median over transformers' (when it ran)."""
    base = runs.get("transformers")
    for impl, rs in runs.items():
        rec = {"impl": impl, "summary": True, "runs": len(rs), **{k: median([r[k] for r in rs]) for k in keys}}
        if base:
            for k, name in ratios.items():
                rec[name] = rec[k] / median([r[k] for r in base])
        emit(rec)
