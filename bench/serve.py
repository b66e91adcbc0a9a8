"""Serving benchmark: a real `kt serve` process on loopback, driven by streaming HTTP clients.

Prints JSON lines:
- ``{"bench": "decode", "concurrency": C, "aggregate_tokens_per_s": ..., "ratio_vs_c1": ...}`` for
  C in --concurrency: C clients each stream one request of --new-tokens tokens at once
  (greedy, ignore_eos), aggregate = generated tokens / wall time; median of --repeats.
- ``{"bench": "prefix_ttft", "cold_ms": ..., "warm_ms": ..., "warm_over_cold": ...}``: time to
  first token of a prompt with a fresh --prefix-tokens shared prefix (cold) and of another
  prompt with the same prefix (warm, served from the prefix cache); medians of --repeats.

    python bench/serve.py                                # the embedded default model
    python bench/serve.py --concurrency 1,4,8,16 --new-tokens 64 --prefix-tokens 2048 -- model.path=DIR

Arguments after ``--`` are passed to `kt serve` as overrides. The server runs in its own
process so the clients' work is not charged to its interpreter (it still shares the CPU).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, overrides: list[str], cache: Path) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "kt_core.cli", "serve", f"server.port={port}", f"server.prefix_disk_dir={cache}",
           *overrides]
    kw = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32" else {}
    proc = subprocess.Popen(cmd, **kw)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kt serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("kt serve did not come up within 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def stream_one(client, url: str, model: str, prompt, max_tokens: int) -> dict:
    """One streaming completion: time to first token, end time, tokens generated."""
    t0 = time.perf_counter()
    first = None
    usage = None
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter()
            if '"usage"' in line and '"choices": []' in line:
                import json

                usage = json.loads(line[5:])["usage"]
    return {"start": t0, "ttft": (first or time.perf_counter()) - t0, "end": time.perf_counter(),
            "tokens": usage["completion_tokens"] if usage else 0, "cached": (usage or {}).get(
                "prompt_tokens_details", {}).get("cached_tokens", 0)}


async def decode_round(url: str, model: str, concurrency: int, new_tokens: int, seed: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        prompts = [[100 + (seed * 7919 + i * 104729 + j * 31) % 20000 for j in range(32)] for i in range(concurrency)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, url, model, p, new_tokens) for p in prompts))
        wall = max(r["end"] for r in results) - t0
        return sum(r["tokens"] for r in results) / wall


async def ttft_pair(url: str, model: str, prefix_tokens: int, seed: int) -> tuple[float, float, int]:
    import httpx

    prefix = [100 + (seed * 1000003 + j * 7919) % 20000 for j in range(prefix_tokens)]
    async with httpx.AsyncClient(timeout=600) as client:
        cold = await stream_one(client, url, model, prefix + [5, 6, 7, 8] * 4, 2)
        warm = await stream_one(client, url, model, prefix + [9, 10, 11, 12] * 4, 2)
    return cold["ttft"], warm["ttft"], warm["cached"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-id", default="default", help="the served model name (server.model_id)")
    ap.add_argument("overrides", nargs="*", help="kt serve overrides (after --)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"server.max_batch={max(levels)}", *args.overrides]
        proc = start_server(port, overrides, Path(tmp))
        try:
            asyncio.run(decode_round(url, args.model_id, 1, 4, 0))  # warm-up
            base = None
            for c in levels:
                runs = [asyncio.run(decode_round(url, args.model_id, c, args.new_tokens, r + 1))
                        for r in range(args.repeats)]
                agg = median(runs)
                base = base or agg
                emit({"bench": "decode", "concurrency": c, "new_tokens": args.new_tokens,
                      "aggregate_tokens_per_s": round(agg, 2), "runs": [round(x, 2) for x in runs],
                      "ratio_vs_c1": round(agg / base, 2) if levels[0] == 1 else None})
            pairs = [asyncio.run(ttft_pair(url, args.model_id, args.prefix_tokens, 1000 + r))
                     for r in range(args.repeats)]
            cold, warm = median([p[0] for p in pairs]), median([p[1] for p in pairs])
            emit({"bench": "prefix_ttft", "prefix_tokens": args.prefix_tokens, "cold_ms": round(cold * 1e3, 1),
                  "warm_ms": round(warm * 1e3, 1), "warm_over_cold": round(warm / cold, 3),
                  "cached_tokens": pairs[-1][2]})
        finally:
            stop_server(proc)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    main()
