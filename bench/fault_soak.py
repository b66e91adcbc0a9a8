"""Fault campaign: a bounded soak of a live `kt serve` with many streaming clients.

Starts `kt serve` (a subprocess on 127.0.0.1, a free port, a tiny synthetic model made in a
temp dir unless ``--model DIR``, the disk tier in the temp dir) and runs ``--clients``
concurrent clients for ``--minutes``. Every client loops: a streaming request to
/v1/completions or /v1/chat/completions (prompts with shared prefixes, greedy or seeded
sampling, ignore_eos, 4-48 new tokens), then the next. By role:

- ``--disconnect`` of the clients (default 20%) close the stream after 1-5 chunks;
- ``--tiny-timeout`` of them (default 10%) use a client timeout of 10-200 ms (most give up);
- the rest read every stream to the end and check it: HTTP 200, every event valid JSON,
  no error event, a final ``finish_reason`` of "length", usage.completion_tokens equal to
  max_tokens, then ``[DONE]``.

Anything else is an *unexpected error* (target 0). A 429 (queue full) is counted apart, by
the role of the client that got it (``rejected_429_<role>``): with ``server.max_queue`` at least
``--clients`` (the default here) a client that has one request at a time should never see one.
A request that takes longer than ``--stuck-s`` is *stuck* (target 0). At the end, with the
clients gone, /metrics must come back to idle (kt_kv_blocks_used, kt_running_requests and
kt_queue_depth all 0) and /health must answer 200. The server's RSS (psutil) is sampled every
``--sample-s``; growth is the mean of the last three samples over the mean of the first three
after the warm-up (the first ``--warmup`` of the run, at least ``--warmup-s``), target < 5%.
The prefix cache's host-RAM tier is capped at 10 MB here (``server.prefix_host_gb=0.01``; an
override after ``--`` changes it): at the default 2 GB the tier would keep filling, by design,
for the whole soak and its growth would hide a leak or pass for one. Settle-in seen on this
machine: the tiny model's server grows ~60 MB in its first minute, then stays flat.

Prints JSON lines: one per sample, then a summary; exits 1 if a target was missed.

    python bench/fault_soak.py                          # 64 clients, 6 minutes
    python bench/fault_soak.py --clients 16 --minutes 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_kill9 import MODEL_ID, Server, emit, make_model, temp_files  # noqa: E402

WORDS = ("alpha beta gamma delta kernel expert router token cache block layer tensor decode prefill "
         "stream batch queue server client shard tile panel vector matrix").split()


class Tally:
    def __init__(self) -> None:
        self.counts: dict = {}
        self.examples: list = []
        self.ttft: list = []
        self.tokens = 0

    def add(self, key: str, example: str = "") -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if example and key.startswith(("unexpected", "stuck", "rejected")) and len(self.examples) < 12:
            self.examples.append(f"{key}: {example}"[:300])


def make_body(rng: random.Random, prefixes: list) -> tuple[str, dict]:
    max_tokens = rng.randint(4, 48)
    sampling = ({"temperature": 0} if rng.random() < 0.7
                else {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1000)})
    common = {"model": MODEL_ID, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
              "stream_options": {"include_usage": True}, **sampling}
    if rng.random() < 0.5:
        prompt = rng.choice(prefixes) + [rng.randrange(100, 20000) for _ in range(rng.randint(1, 40))]
        return "/v1/completions", {"prompt": prompt, **common}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
    return "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": text}], **common}


async def one_request(client, url: str, path: str, body: dict, role: str, rng: random.Random, t: Tally) -> None:
    import httpx

    stop_after = rng.randint(1, 5) if role == "disconnect" else None
    timeout = httpx.Timeout(rng.uniform(0.01, 0.2)) if role == "tiny_timeout" else httpx.Timeout(120.0)
    t0 = time.perf_counter()
    chunks, finish, usage, done = 0, None, None, False
    try:
        async with client.stream("POST", url + path, json=body, timeout=timeout) as r:
            if r.status_code == 429:
                t.add(f"rejected_429_{role}", (await r.aread())[:200].decode(errors="replace"))
                await r.aread()
                return
            if r.status_code != 200:
                t.add("unexpected_status", f"HTTP {r.status_code} {path}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    ev = json.loads(data)
                except ValueError:
                    t.add("unexpected_bad_json", data[:200])
                    return
                if "error" in ev:
                    t.add("unexpected_error_event", data[:200])
                    return
                if ev.get("usage"):
                    usage = ev["usage"]
                for c in ev.get("choices") or []:
                    if chunks == 0:
                        t.ttft.append(time.perf_counter() - t0)
                    chunks += 1
                    finish = c.get("finish_reason") or finish
                if stop_after is not None and chunks >= stop_after:
                    t.add("disconnected_early")
                    return  # leaving the block closes the connection mid-stream
    except httpx.TimeoutException:
        t.add("client_timeout" if role == "tiny_timeout" else "unexpected_timeout", path)
        return
    except httpx.HTTPError as exc:
        t.add("unexpected_transport", f"{type(exc).__name__}: {exc}")
        return
    want = body["max_tokens"]
    if not done:
        t.add("unexpected_no_done", path)
    elif finish != "length":
        t.add("unexpected_finish", f"{finish!r} for {path}")
    elif not usage or usage.get("completion_tokens") != want:
        t.add("unexpected_usage", f"{usage} (max_tokens {want})")
    else:
        t.add("completed")
        t.tokens += want


async def client_loop(i: int, role: str, url: str, deadline: float, seed: int, prefixes: list, t: Tally,
                      stuck_s: float, limits) -> None:
    import httpx

    rng = random.Random(seed * 1000 + i)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.sleep(rng.uniform(0, 2))  # stagger the start
        while time.monotonic() < deadline:
            path, body = make_body(rng, prefixes)
            try:
                await asyncio.wait_for(one_request(client, url, path, body, role, rng, t), stuck_s)
            except asyncio.TimeoutError:
                t.add("stuck", f"{path} max_tokens={body['max_tokens']} ran past {stuck_s:.0f} s")


class Sampler(threading.Thread):
    """RSS of the server process and a few /metrics gauges, every ``every`` seconds."""

    def __init__(self, srv: Server, every: float, t0: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc, self.srv, self.every, self.t0 = psutil.Process(srv.pid), srv, every, t0
        self.samples: list = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.take()
            self.halt.wait(self.every)

    def take(self) -> dict:
        s = {"t_s": round(time.monotonic() - self.t0, 1), "rss_mb": round(self.proc.memory_info().rss / 2**20, 1)}
        try:
            m = self.srv.metrics(timeout=10)
            s.update(running=m.get("kt_running_requests"), queue=m.get("kt_queue_depth"),
                     kv_used=m.get("kt_kv_blocks_used"), cached=m.get("kt_kv_blocks_cached"),
                     tok_s=m.get("kt_generation_tokens_per_second"))
        except Exception as exc:  # noqa: BLE001 -- reported, the soak goes on
            s["metrics_error"] = f"{type(exc).__name__}: {exc}"[:120]
        self.samples.append(s)
        emit({"bench": "fault_soak", "sample": True, **s})
        return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--disconnect", type=float, default=0.2, help="share of clients that close streams early")
    ap.add_argument("--tiny-timeout", type=float, default=0.1, help="share of clients with 10-200 ms timeouts")
    ap.add_argument("--stuck-s", type=float, default=180.0, help="a request running longer than this is stuck")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=0.25, help="share of the run before RSS growth is measured")
    ap.add_argument("--warmup-s", type=float, default=60.0, help="... and at least this many seconds")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="a model folder to serve (default: a tiny synthetic one)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (server log, cache)")
    ap.add_argument("overrides", nargs="*", help="extra kt serve overrides (default server.max_batch=16 "
                                                 "server.max_queue=CLIENTS server.prefix_host_gb=0.01)")
    args = ap.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return soak(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="kt-soak-") as tmp:
        return soak(args, Path(tmp))


def soak(args, work: Path) -> int:
    import httpx

    t_start = time.monotonic()
    model = args.model or make_model(work / "model")
    cache = work / "cache"
    overrides = ["server.max_batch=16", f"server.max_queue={max(args.clients, 1)}", "server.prefix_host_gb=0.01",
                 *args.overrides]
    srv = Server(model, cache, work / "server.log", *overrides)
    try:
        up_s = srv.wait_ready()
        rng = random.Random(args.seed)
        prefixes = [[rng.randrange(100, 20000) for _ in range(rng.choice((16, 32, 48)))] for _ in range(6)]
        n_disc = round(args.clients * args.disconnect)
        n_tiny = round(args.clients * args.tiny_timeout)
        roles = ["disconnect"] * n_disc + ["tiny_timeout"] * n_tiny + ["normal"] * (args.clients - n_disc - n_tiny)
        t0 = time.monotonic()
        sampler = Sampler(srv, args.sample_s, t0)
        sampler.start()
        deadline = t0 + args.minutes * 60
        tally = Tally()
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)

        async def run_all():
            await asyncio.gather(*(client_loop(i, role, srv.url, deadline, args.seed, prefixes, tally, args.stuck_s,
                                               limits) for i, role in enumerate(roles)))

        asyncio.run(run_all())
        clients_done = time.monotonic() - t0
        # the clients are gone: the server must come back to idle
        idle_after, last = None, {}
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < 60:
            try:
                last = srv.metrics()
            except Exception:  # noqa: BLE001
                last = {}
            if last and all(last.get(k, 1) == 0 for k in ("kt_kv_blocks_used", "kt_running_requests",
                                                          "kt_queue_depth")):
                idle_after = time.monotonic() - t_idle
                break
            time.sleep(0.5)
        sampler.halt.set()
        sampler.join(30)
        health = httpx.get(srv.url + "/health", timeout=10).status_code
        final_sample = sampler.take()
    finally:
        rc = srv.stop()
    log_text = (work / "server.log").read_text(errors="replace")
    tracebacks = log_text.count("Traceback (most recent call last)")
    log_errors = [ln for ln in log_text.splitlines() if " ERROR " in ln or ln.startswith("ERROR")][:5]
    # RSS growth after the warm-up
    samples = [s for s in sampler.samples if "rss_mb" in s]
    warmup_s = max(args.warmup * args.minutes * 60, args.warmup_s)
    warm = [s for s in samples if s["t_s"] >= warmup_s]
    base = sum(s["rss_mb"] for s in warm[:3]) / max(len(warm[:3]), 1) if warm else float("nan")
    end = sum(s["rss_mb"] for s in warm[-3:]) / max(len(warm[-3:]), 1) if warm else float("nan")
    growth = (end - base) / base if warm else float("nan")
    counts = tally.counts
    unexpected = sum(v for k, v in counts.items() if k.startswith("unexpected"))
    stuck = counts.get("stuck", 0)
    idle_ok = idle_after is not None
    ttft = sorted(tally.ttft)
    pct = lambda q: round(ttft[min(int(q * len(ttft)), len(ttft) - 1)] * 1e3, 1) if ttft else None  # noqa: E731
    rejected = sum(v for k, v in counts.items() if k.startswith("rejected_429"))
    ok = unexpected == 0 and stuck == 0 and idle_ok and health == 200 and growth < args.max_rss_growth
    step = max(len(samples) // 24, 1)
    emit({"bench": "fault_soak", "summary": True, "ok": ok, "clients": args.clients,
          "roles": {r: roles.count(r) for r in ("normal", "disconnect", "tiny_timeout")},
          "minutes": args.minutes, "clients_ran_s": round(clients_done, 1), "startup_s": round(up_s, 1),
          "requests": sum(counts.values()), "counts": counts, "unexpected_errors": unexpected, "stuck": stuck,
          "rejected_429": rejected,
          "generated_tokens_checked": tally.tokens, "ttft_ms_p50": pct(0.5), "ttft_ms_p99": pct(0.99),
          "idle_at_end": idle_ok, "idle_after_s": None if idle_after is None else round(idle_after, 1),
          "end_metrics": {k: last.get(k) for k in ("kt_kv_blocks_used", "kt_running_requests", "kt_queue_depth",
                                                   "kt_kv_blocks_cached", "kt_requests_total", "kt_finished_total",
                                                   "kt_cancelled_total", "kt_timeouts_total", "kt_errors_total",
                                                   "kt_rejected_total")},
          "disk_hits": last.get('kt_prefix_cache_hits_total{tier="disk"}'),
          "health_after": health, "exit_code": rc, "tmp_files_left": len(temp_files(cache)),
          "rss_mb": {"warmup_end": round(base, 1), "end": round(end, 1), "max": max(s["rss_mb"] for s in samples),
                     "final": final_sample["rss_mb"]},
          "rss_growth_after_warmup": round(growth, 4), "warmup_s": warmup_s,
          "rss_series": [(s["t_s"], s["rss_mb"]) for s in samples[::step]],
          "server_log_tracebacks": tracebacks, "server_log_errors": log_errors, "examples": tally.examples,
          "wall_minutes": round((time.monotonic() - t_start) / 60, 2)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
