"""Fault campaign: property-based API fuzzing of a live `kt serve` with schemathesis.

Starts `kt serve` (a subprocess on 127.0.0.1, a free port, a tiny synthetic model made in a
temp dir unless ``--model DIR``), loads its /openapi.json with schemathesis and, for every
operation, generates ``--max-examples`` schema-valid requests (``positive``) and as many
invalid ones (``negative``), sends them and runs schemathesis' response checks (server error,
status code, content type, response schema, ...). Bodies are steered so that most valid
requests reach the model: ``model`` is set to the served id in 85% of the cases (the
``model_id`` of /v1/models/{model_id} in half of them), and
``max_tokens`` / ``max_completion_tokens`` are capped at 16 (a missing or null one becomes
1-16), which also keeps the run bounded. The run stops by itself after ``--max-minutes``.

Reports (JSON lines: one per operation and mode, then a summary): requests sent, statuses,
the number of 5xx answers (target 0) with examples, the check failures by check (schema
mismatches), and /health and the idle gauges of /metrics after the run.

schemathesis is not a dependency of kt-core: ``pip install schemathesis`` first (4.x).

    python bench/fault_schemathesis.py                       # 25 examples per operation and mode
    python bench/fault_schemathesis.py --max-examples 100 --max-minutes 10
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_kill9 import MODEL_ID, Server, emit, make_model  # noqa: E402

MISSING = "schemathesis is not installed: `pip install schemathesis` (4.x) into this environment, then rerun"
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def steer(case, rng: random.Random) -> None:
    """Point most generated bodies at the served model with a small token budget."""
    params = case.path_parameters
    if isinstance(params, dict) and "model_id" in params and rng.random() < 0.5:
        params["model_id"] = MODEL_ID
    body = case.body
    if not isinstance(body, dict):
        return
    if "model" in body and rng.random() < 0.85:
        body["model"] = MODEL_ID
    for key in TOKEN_FIELDS:
        if key in body:
            v = body[key]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 16:  # JSON Schema: 1257.0 is an integer
                body[key] = rng.randint(1, 16)
            elif v is None:
                body[key] = rng.randint(1, 16)
    if ("prompt" in body or "messages" in body) and not any(k in body for k in TOKEN_FIELDS):
        body["max_tokens"] = rng.randint(1, 16)  # the server default (the rest of the context) is slow here


def _message(resp) -> str:
    """The error message of a JSON error answer, else the start of the body."""
    try:
        return str(resp.json()["error"]["message"])[:160]
    except Exception:  # noqa: BLE001
        return resp.text[:80]


def failures_of(exc: BaseException) -> list:
    out = []
    for e in getattr(exc, "exceptions", None) or [exc]:
        title = getattr(e, "title", None) or type(e).__name__
        msg = str(getattr(e, "message", "") or e)
        out.append((str(title), msg))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=25, help="per operation and generation mode")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--modes", default="positive,negative")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="a model folder to serve (default: a tiny synthetic one)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (server log)")
    ap.add_argument("overrides", nargs="*", help="extra kt serve overrides")
    args = ap.parse_args(argv)
    try:
        import hypothesis  # noqa: F401
        import schemathesis  # noqa: F401
    except ImportError:
        print(MISSING, file=sys.stderr)
        emit({"bench": "fault_schemathesis", "error": MISSING})
        return 2
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return fuzz(args, args.keep)
    with tempfile.TemporaryDirectory(prefix="kt-schemathesis-") as tmp:
        return fuzz(args, Path(tmp))


def fuzz(args, work: Path) -> int:
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable

    t_start = time.monotonic()
    deadline = t_start + args.max_minutes * 60
    model = args.model or make_model(work / "model")
    srv = Server(model, work / "cache", work / "server.log", "server.max_batch=8", *args.overrides)
    rng = random.Random(args.seed)
    statuses: Counter = Counter()
    checks: Counter = Counter()
    five: list = []
    mismatch_examples: dict = {}
    calls = transport_errors = 0
    ran_out = False
    try:
        srv.wait_ready()
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        ops = []
        for result in schema.get_all_operations():
            try:
                ops.append(result.ok())
            except Exception as exc:  # an operation schemathesis cannot use: reported, not fatal
                emit({"bench": "fault_schemathesis", "operation_error": str(exc)[:300]})
        for op in ops:
            for mode_name in args.modes.split(","):
                mode = schemathesis.GenerationMode(mode_name)
                st, op_checks, op_calls, op_five = Counter(), Counter(), [0], [0]

                @seed(args.seed)
                @settings(max_examples=args.max_examples, deadline=None, database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
                @given(case=op.as_strategy(generation_mode=mode))
                def one(case):
                    nonlocal calls, transport_errors, ran_out
                    if time.monotonic() > deadline:
                        ran_out = True
                        return
                    steer(case, rng)
                    try:
                        resp = case.call(base_url=srv.url, timeout=60)
                    except Exception as exc:  # connection refused / reset: the server fell over?
                        transport_errors += 1
                        five.append({"op": op.label, "mode": mode_name, "transport_error": f"{type(exc).__name__}: "
                                     f"{exc}"[:300], "body": json.dumps(case.body, default=str)[:300]})
                        return
                    calls += 1
                    op_calls[0] += 1
                    st[resp.status_code] += 1
                    statuses[resp.status_code] += 1
                    if resp.status_code >= 500:
                        op_five[0] += 1
                        five.append({"op": op.label, "mode": mode_name, "status": resp.status_code,
                                     "body": json.dumps(case.body, default=str)[:300],
                                     "response": resp.text[:300]})
                    try:
                        case.validate_response(resp)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:  # noqa: BLE001 -- FailureGroup (a BaseExceptionGroup): by check
                        for title, msg in failures_of(exc):
                            op_checks[title] += 1
                            checks[title] += 1
                            ex = mismatch_examples.setdefault(title, {
                                "op": op.label, "mode": mode_name, "status": resp.status_code,
                                "message": msg[:400], "body": json.dumps(case.body, default=str)[:200],
                                "distinct_answers": []})
                            answer = f"{op.label} {resp.status_code}: {_message(resp)}"
                            if answer not in ex["distinct_answers"] and len(ex["distinct_answers"]) < 8:
                                ex["distinct_answers"].append(answer)

                note = None
                try:
                    one()
                except Unsatisfiable:  # e.g. no invalid request exists for GET /health
                    note = "no case can be generated in this mode"
                emit({"bench": "fault_schemathesis", "operation": op.label, "mode": mode_name, "note": note,
                      "requests": op_calls[0],
                      "statuses": {str(k): v for k, v in sorted(st.items())}, "5xx": op_five[0],
                      "check_failures": dict(op_checks)})
        health = httpx.get(srv.url + "/health", timeout=10).status_code
        time.sleep(1.0)
        m = srv.metrics()
        idle = {k: m.get(k) for k in ("kt_kv_blocks_used", "kt_running_requests", "kt_queue_depth")}
        reached = {k: m.get(k) for k in ("kt_requests_total", "kt_generation_tokens_total", "kt_errors_total")}
    finally:
        rc = srv.stop()
    log_text = (work / "server.log").read_text(errors="replace")
    n5 = sum(v for k, v in statuses.items() if k >= 500)
    ok = n5 == 0 and transport_errors == 0 and health == 200 and all(v == 0 for v in idle.values())
    emit({"bench": "fault_schemathesis", "summary": True, "ok": ok, "schemathesis": schemathesis.__version__,
          "max_examples": args.max_examples, "requests": calls,
          "statuses": {str(k): v for k, v in sorted(statuses.items())},
          "5xx": n5, "transport_errors": transport_errors, "check_failures": dict(checks),
          "health_after": health, "idle_after": idle, "reached_the_model": reached, "exit_code": rc,
          "server_log_tracebacks": log_text.count("Traceback (most recent call last)"),
          "ran_out_of_time": ran_out, "examples_5xx": five[:8], "examples_check_failures": mismatch_examples,
          "minutes": round((time.monotonic() - t_start) / 60, 2)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
