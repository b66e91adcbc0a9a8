"""Per-part profile of kt-core's prefill and decode steps, next to each part's roofline.

    python bench/profile_step.py --model DIR [--override quant=int8 --override quant.dense=int8]
                                 [--prompt-tokens 512] [--new-tokens 32] [--threads 2]

Prints one JSON line per part and phase (ms per step, share of the step, weight MB a decode token
reads, GB/s achieved, roofline ms at the natively measured bandwidth and roofline share), then a
table. A part whose share of the decode step is far above its roofline share is where the time
goes that the bytes do not explain.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, repo_on_path, set_threads  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--override", action="append", default=[], help="a Hydra override (repeatable)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="intra-op threads of torch's own ops in every step (default: as kt-core sets them, "
                         "1 in decode and all in prefill when the native kernels run)")
    args = ap.parse_args()
    repo_on_path()
    set_threads(args.threads)
    import kt_core
    from kt_backends.cpu import native
    from kt_core.runtime.step_profile import StepProfiler, format_table

    ov = [f"device.cpu.threads={args.threads}", *args.override]
    t0 = time.perf_counter()
    engine = kt_core.Engine.from_pretrained(args.model, overrides=ov)
    load_s = time.perf_counter() - t0
    if args.torch_threads:
        from kt_backends.cpu import CpuBackend

        CpuBackend.set_torch_threads(decode=args.torch_threads, prefill=args.torch_threads)
    bw = native.memory_bandwidth_gbps() if native.available() else None
    vocab = engine.model.spec.vocab_size
    prompt = [(i * 7919) % (vocab - 200) + 100 for i in range(args.prompt_tokens)]
    engine.generate(prompt[:8], max_new_tokens=4)  # warm-up: first-use checks, page faults
    prof = StepProfiler(engine)  # the prompt's prefill alone (the decode run's 8-token prefill step,
    with prof.active():  #          averaged in, halved the table's prefill ms/step)
        t0 = time.perf_counter()
        engine.generate(prompt, max_new_tokens=1, ignore_eos=True)
        prefill_wall = time.perf_counter() - t0
    dec = StepProfiler(engine)
    with dec.active():
        t0 = time.perf_counter()
        out = engine.generate(prompt[:8], max_new_tokens=args.new_tokens, ignore_eos=True)
        # the decode run's wall time less its 8-token prefill step
        decode_ms = (time.perf_counter() - t0) * 1e3 - dec.ms.get(("prefill", "_step"), 0.0)
    n_dec = max(1, dec.steps.get("decode", 0))
    rows = prof.report("prefill") + dec.report("decode", bw)
    outside = decode_ms - dec.ms.get(("decode", "_step"), 0.0)
    rows.append({"phase": "decode", "part": "outside_step", "ms_per_step": round(max(0.0, outside) / n_dec, 3),
                 "what": "sampling, scheduling, KV bookkeeping, detokenizing: per decode token"})
    meta = {"model": str(args.model), "overrides": ov, "threads": args.threads, "bandwidth_gbps": bw,
            "load_s": round(load_s, 2), "cpu": native.status() if native.available() else "torch",
            "prefill_tok_s": round(args.prompt_tokens / prefill_wall, 2),
            "decode_tok_s": round(n_dec / (decode_ms / 1e3), 2), "generated": len(out.token_ids)}
    emit(meta)
    for r in rows:
        emit(r)
    print("\n" + format_table(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
