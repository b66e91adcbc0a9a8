"""A/B of the dense weights' huge pages: decode tok/s with the LM head and attention projections in
huge pages (the default) vs in plain memory, the same build, alternating processes.

    python bench/ab_dense_pages.py --model DIR [--override quant=int4 ...] [--pairs 3] [--new-tokens 64]

"off" patches ``CpuBackend.dense_empty`` to None and packs quantized dense weights into plain memory;
the experts stay in huge pages either way (``KT_HUGEPAGES=0`` turns off both). One JSON line a run,
then the medians and their ratio.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, emit, median, peak_rss_mb, repo_on_path, set_threads  # noqa: E402


def child(args) -> dict:
    set_threads(args.threads)
    repo_on_path()
    import torch

    import kt_core
    from kt_backends.cpu import native_linear
    from kt_backends.cpu.backend import CpuBackend

    if args.child == "off":
        CpuBackend.dense_empty = lambda self, shape, dtype, index=0: None
        native_linear.huge_empty = lambda shape, dtype: torch.empty(tuple(shape), dtype=dtype)
    overrides = [*args.override, f"device.cpu.threads={args.threads}"]
    engine = kt_core.Engine.from_pretrained(args.model, overrides=overrides)
    ids = [(i * 7919) % (engine.model.spec.vocab_size - 200) + 100 for i in range(16)]
    engine.generate(ids, max_new_tokens=4, ignore_eos=True)  # warm-up
    runs = [engine.generate(ids, max_new_tokens=args.new_tokens + 1, ignore_eos=True)
            .timing["decode_tokens_per_s"] for _ in range(3)]
    return {"dense_pages": args.child, "decode_tokens_per_s": median(runs), "runs": runs,
            "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--override", action="append", default=["model.dtype=bfloat16"],
                    help="a Hydra override (repeatable)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        emit(child(args))
        return
    runs = alternate(__file__, ["on", "off"], args.pairs, list(sys.argv[1:]), flip=True)
    on, off = (median([r["decode_tokens_per_s"] for r in runs[side]]) for side in ("on", "off"))
    emit({"summary": True, "on_tokens_per_s": on, "off_tokens_per_s": off, "on_vs_off": on / off})


if __name__ == "__main__":
    main()
