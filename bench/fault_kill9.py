"""Fault campaign: kill -9 a live `kt serve` at random points and check its prefix-cache disk tier.

Each round starts `kt serve` (a subprocess on 127.0.0.1, a free port) on one shared disk-tier
folder, sends greedy completions (a pool of prompts with shared prefixes, plus fresh prompts
each round so every round makes new blocks) and kills the process -- SIGKILL on POSIX,
TerminateProcess on Windows (``Popen.kill``) -- at a random point of one of these phases:

- ``mid_traffic``: while requests are being prefilled / decoded;
- ``write_through``: 0-300 ms after the last response (the background writer is busy);
- ``idle``: 1-3 s after the last response;
- ``drain``: after a graceful stop was asked for (SIGINT / CTRL_BREAK) with requests running;
- ``flush``: after a graceful stop was asked for with no request running (the flush at shutdown).

Checks, every round: no ``*.tmp`` file is left once the server is up again; every entry on disk
passes an independent format check (magic, header, name, payload length, sha256); every
response that completed equals the cold run's (same prompts, a server with the prefix cache
off); and every few rounds (``--inject-every``) entries the next round will read are
corrupted on purpose (a flipped payload byte; a header naming another model), which the
server must detect and drop (its log) while the outputs stay identical. It also counts the
rounds whose kill found entries written in that round (write-through), and disk-tier hits.

``kill_after_s`` in a round's line counts from the first request (mid_traffic, drain), from
the last response (write_through, idle) or from the graceful stop (flush).

Prints one JSON line per round and a summary line; exits 1 if a check failed. Bounded by
``--rounds`` and ``--max-minutes``; makes a tiny synthetic model in a temp dir unless
``--model DIR``. Talks only to 127.0.0.1.

    python bench/fault_kill9.py                 # 20 rounds
    python bench/fault_kill9.py --rounds 10 --seed 1

The helpers it uses (tiny model, server process, /metrics, entry check) live in bench/fault_server.py
and are re-exported here for bench/fault_soak.py and bench/fault_schemathesis.py.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_server import (  # noqa: E402,F401 (MODEL_ID: re-exported for fault_soak / fault_schemathesis)
    MAGIC, MODEL_ID, ROOT, SUFFIX, HttpStatus, Server, check_entry, complete, emit, entries, entry_model, make_model,
    temp_files)


# ---- the campaign --------------------------------------------------------------------------
MODES = ("mid_traffic", "write_through", "idle", "drain", "flush")


def make_prompts(rng: random.Random, rounds: int, fresh_per_round: int) -> tuple[list, list]:
    """A pool of prompts sharing three 48-token prefixes, and fresh prompts for each round."""
    tok = lambda n: [rng.randrange(100, 20000) for _ in range(n)]  # noqa: E731
    prefixes = [tok(48) for _ in range(3)]
    pool = [prefixes[i % 3] + tok(rng.randrange(5, 60)) for i in range(9)]
    fresh = [[tok(rng.randrange(20, 120)) for _ in range(fresh_per_round)] for _ in range(rounds)]
    return pool, fresh


def run_requests(url: str, prompts: list, max_tokens: int, concurrency: int) -> tuple[cf.Executor, list]:
    import httpx

    client = httpx.Client(timeout=120)
    pool = cf.ThreadPoolExecutor(concurrency)
    futs = [pool.submit(complete, client, url, p, max_tokens) for p in prompts]
    pool.shutdown(wait=False)
    return pool, futs


def reference_outputs(model: Path, work: Path, prompts: list, max_tokens: int, concurrency: int,
                      overrides=()) -> tuple[list, float]:
    """The cold run: a server with the prefix cache off. Returns the outputs and the seconds they took."""
    srv = Server(model, work / "ref-cache", work / "ref.log", *overrides, "server.prefix_cache=false")
    try:
        srv.wait_ready()
        t0 = time.monotonic()
        _, futs = run_requests(srv.url, prompts, max_tokens, concurrency)
        out = [f.result() for f in futs]
        return out, time.monotonic() - t0
    finally:
        srv.stop()


def inject(cache: Path, names: list, rng: random.Random) -> list:
    """Corrupt entries the next round will read: a flipped payload byte, a header naming another model."""
    done = []
    for i, name in enumerate(names):
        path = cache / f"{name}{SUFFIX}"
        try:
            data = bytearray(path.read_bytes())
        except OSError:
            continue
        n = struct.unpack("<I", data[4:8])[0]
        if i % 2 == 0:
            pos = 8 + n + rng.randrange(len(data) - 8 - n)
            data[pos] ^= 0x5A
            kind = "bitflip"
        else:  # a well-formed entry, checksum right, but written for another model
            head = json.loads(data[8:8 + n])
            head["model"] = "another-model|" + head["model"]
            raw = json.dumps(head, sort_keys=True).encode()
            data = bytearray(MAGIC + struct.pack("<I", len(raw)) + raw + data[8 + n:])
            kind = "foreign"
        path.write_bytes(bytes(data))
        done.append((name, kind))
    return done


def block_names(model_fp: str, prompts: list, block_size: int = 16) -> list:
    """Disk names of the first block of each prompt (chain hashes seeded with the model's fingerprint)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kt_core.kvcache.prefix import chain_hashes

    seed = hashlib.sha256(model_fp.encode()).digest()
    return sorted({chain_hashes(seed, p, block_size)[0].hex() for p in prompts if len(p) >= block_size})


def dropped_in_log(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("dropping disk entry")
    except OSError:
        return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--max-minutes", type=float, default=20.0, help="stop starting rounds after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", type=int, default=4, help="new prompts per round (new blocks to write)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--inject-every", type=int, default=3, help="corrupt entries before every Nth round (0: never)")
    ap.add_argument("--model", type=Path, help="a model folder to serve (default: a tiny synthetic one)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, cache) instead of a temp dir")
    ap.add_argument("overrides", nargs="*", help="extra kt serve overrides")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    tmp = None
    if args.keep:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kt-kill9-")
        work = Path(tmp.name)
    try:
        return _campaign(args, rng, work, t_start)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _campaign(args, rng: random.Random, work: Path, t_start: float) -> int:
    model = args.model or make_model(work / "model")
    cache = work / "cache"
    cache.mkdir(exist_ok=True)
    pool, fresh = make_prompts(rng, args.rounds, args.fresh)
    everything = pool + [p for f in fresh for p in f]
    outs, t_ref = reference_outputs(model, work, everything, args.max_tokens, args.concurrency, args.overrides)
    ref = dict(zip(map(tuple, everything), outs))
    emit({"bench": "fault_kill9", "phase": "reference", "prompts": len(everything),
          "seconds": round(time.monotonic() - t_start, 1)})
    # how long a round's requests take (refined by every round that runs them to the end):
    # kills "mid_traffic" and graceful stops "drain" land inside that window
    work_s = [max(t_ref * (4 + args.fresh) / len(everything), 0.2)]
    totals = dict(rounds=0, mismatches=0, corrupt_on_disk=0, tmp_left_after_restart=0, rounds_wrote_before_kill=0,
                  rounds_with_completions=0, completed=0, cut_by_kill=0, http_errors=0, unexpected_errors=0,
                  disk_hits=0, injected=0, injected_resolved=0, dropped_logged=0, tmp_left_by_kill=0)
    by_mode: dict = {m: 0 for m in MODES}
    examples: list = []
    injected: dict = {}  # name -> kind, until the server dropped it (deleted, or rewritten sound)
    model_fp: Optional[str] = None
    for r in range(args.rounds):
        if time.monotonic() - t_start > args.max_minutes * 60:
            break
        mode = MODES[r % len(MODES)] if r < len(MODES) else rng.choice(MODES)
        by_mode[mode] += 1
        log = work / f"round-{r:03d}.log"
        tmp_before = temp_files(cache)
        srv = Server(model, cache, log, *args.overrides)
        try:
            up_s = srv.wait_ready()
        except RuntimeError as exc:
            emit({"bench": "fault_kill9", "round": r, "error": str(exc)})
            totals["unexpected_errors"] += 1
            break
        left = temp_files(cache)
        at_start = entries(cache)
        if injected:  # one prompt per shared prefix: the corrupted first blocks are read first
            prompts = pool[:3] + [rng.choice(pool)] + fresh[r]
        else:
            prompts = rng.sample(pool, 4) + fresh[r]
        rng.shuffle(prompts)
        t_work = time.monotonic()
        executor, futs = run_requests(srv.url, prompts, args.max_tokens, args.concurrency)
        hits = None
        est = sorted(work_s)[len(work_s) // 2]
        if mode in ("mid_traffic", "drain"):
            delay = rng.uniform(0.05, 0.9 * est)
            time.sleep(delay)
            if mode == "drain":
                srv.interrupt()
                time.sleep(rng.uniform(0.0, 1.0))
                delay = time.monotonic() - t_work
        else:
            cf.wait(futs, timeout=180)
            work_s.append(time.monotonic() - t_work)
            try:
                hits = srv.metrics().get('kt_prefix_cache_hits_total{tier="disk"}')
            except Exception:
                hits = None
            if mode == "write_through":
                delay = rng.uniform(0.0, 0.3)
            elif mode == "idle":
                delay = rng.uniform(1.0, 3.0)
            else:  # flush: a graceful stop, killed while it drains / flushes / exits
                srv.interrupt()
                delay = rng.uniform(0.0, 0.6)
            time.sleep(delay)
        exited_before_kill = srv.proc.poll() is not None
        srv.kill()
        executor.shutdown(wait=True)
        after = entries(cache)
        new = after - at_start
        tmp_now = temp_files(cache)
        model_fp = model_fp or entry_model(cache)
        for n in list(injected):
            if n not in after or check_entry(cache / f"{n}{SUFFIX}", model_fp) is None:
                del injected[n]
                totals["injected_resolved"] += 1
        bad = {n: check_entry(cache / f"{n}{SUFFIX}", model_fp) for n in after if n not in injected}
        bad = {n: why for n, why in bad.items() if why is not None}
        mism = completed = cut = http_err = other = 0
        for p, f in zip(prompts, futs):
            try:
                text = f.result()
            except HttpStatus as exc:
                http_err += 1
                if exc.status not in (503,) or mode not in ("drain", "flush"):
                    other += 1
                    examples.append(f"round {r}: {exc}")
                continue
            except Exception as exc:  # connection cut by the kill
                cut += 1
                if mode not in ("mid_traffic", "drain"):
                    other += 1
                    examples.append(f"round {r}: {type(exc).__name__}: {exc}")
                continue
            completed += 1
            if text != ref[tuple(p)]:
                mism += 1
                examples.append(f"round {r}: output differs from the cold run for a {len(p)}-token prompt")
        dropped = dropped_in_log(log)
        rec = {"bench": "fault_kill9", "round": r, "mode": mode, "kill_after_s": round(delay, 3),
               "exited_before_kill": exited_before_kill, "startup_s": round(up_s, 1),
               "tmp_before_restart": len(tmp_before), "tmp_left_after_restart": len(left),
               "entries_at_start": len(at_start), "new_entries_before_kill": len(new),
               "tmp_left_by_kill": len(tmp_now), "corrupt_on_disk": len(bad), "completed": completed,
               "mismatches": mism, "cut_by_kill": cut, "http_errors": http_err, "disk_hits": hits,
               "injected_unresolved": len(injected), "dropped_logged": dropped}
        emit(rec)
        totals["rounds"] += 1
        totals["mismatches"] += mism
        totals["corrupt_on_disk"] += len(bad)
        totals["tmp_left_after_restart"] += len(left)
        totals["tmp_left_by_kill"] += len(tmp_now)
        totals["rounds_wrote_before_kill"] += bool(new)
        totals["completed"] += completed
        totals["cut_by_kill"] += cut
        totals["http_errors"] += http_err
        totals["unexpected_errors"] += other
        totals["disk_hits"] += int(hits or 0)
        totals["dropped_logged"] += dropped
        totals["rounds_with_completions"] += completed > 0
        examples += [f"round {r}: corrupt entry on disk {n}: {why}" for n, why in bad.items()]
        # corrupt entries the next round reads first (the first blocks of the shared prefixes)
        if args.inject_every and (r + 1) % args.inject_every == 0 and r + 1 < args.rounds and model_fp:
            names = [n for n in block_names(model_fp, pool) if n in after and n not in injected]
            for n, kind in inject(cache, rng.sample(names, min(2, len(names))), rng):
                injected[n] = kind
                totals["injected"] += 1
    # a last, clean restart: the folder as the campaign left it serves the whole pool like a cold run
    srv = Server(model, cache, work / "final.log", *args.overrides)
    srv.wait_ready()
    final_left = temp_files(cache)
    executor, futs = run_requests(srv.url, pool, args.max_tokens, args.concurrency)
    final_mism = sum(f.result() != ref[tuple(p)] for p, f in zip(pool, futs))
    final_hits = srv.metrics().get('kt_prefix_cache_hits_total{tier="disk"}')
    rc = srv.stop()
    model_fp = model_fp or entry_model(cache)
    for n in list(injected):
        if n not in entries(cache) or check_entry(cache / f"{n}{SUFFIX}", model_fp) is None:
            del injected[n]
            totals["injected_resolved"] += 1
    totals["dropped_logged"] += dropped_in_log(work / "final.log")
    final_bad = sum(check_entry(cache / f"{n}{SUFFIX}", model_fp) is not None for n in entries(cache))
    totals["mismatches"] += final_mism
    totals["tmp_left_after_restart"] += len(final_left)
    ok = (totals["mismatches"] == 0 and totals["corrupt_on_disk"] == 0 and final_bad == 0
          and totals["tmp_left_after_restart"] == 0 and totals["unexpected_errors"] == 0
          and not injected and totals["injected_resolved"] == totals["injected"])
    emit({"bench": "fault_kill9", "summary": True, "ok": ok, **totals, "by_mode": by_mode,
          "final": {"mismatches": final_mism, "disk_hits": final_hits, "entries": len(entries(cache)),
                    "corrupt_after_graceful_stop": final_bad, "exit_code": rc},
          "examples": examples[:10], "minutes": round((time.monotonic() - t_start) / 60, 2)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
