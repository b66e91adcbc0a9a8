"""One Qwen3-30B-A3B-shaped MoE layer (hidden 2048, intermediate 768, 128 experts, top-8) on
the CPU: kt-core's native kernels vs the torch path, per weight format and token count.

    python bench/moe_layer.py                                  # T = 1,16,128,512; bf16,int8,int4
    python bench/moe_layer.py --tokens 1,128 --formats bf16,int4 --repeats 7 --threads 2
    python bench/moe_layer.py --vs-ktkernel --ktkernel-python /tmp/venv-kt/bin/python

--vs-ktkernel adds rows with impl "kt-kernel": kt-kernel's MoE operators on the same inputs and
routings, one row per operator class and kt-kernel thread count (1..--threads; with 2 kt threads
its workers busy-wait, which slows decode on a 2-core machine). --ktkernel-family picks its
classes: "auto" (default) takes its AMX classes where the kt-kernel build that loads has them -
its amx build on CPUs with AMX-INT8/AMX-BF16, or its avx512 build on AVX-512 CPUs, where the same
classes run AVX-512 code - and its AVX2 classes otherwise; "amx" / "avx2" force one. Each row
names the class ("ktkernel_class"), the build ("ktkernel_variant") and what it was given
("ktkernel_weights"); rel_err_basis says what its rel_err compares with.
  amx:  bf16 AMXBF16_MOE; int4 AMXInt4_KGroup_MOE on our codes with bf16-rounded scales (same
        group; group 128 gives NaN in 0.7.2) and AMXInt4_MOE, which quantizes the bf16 weights
        itself per channel; int8 and w8a8 AMXInt8_MOE, which also quantizes them itself; fp8
        AMXFP8_MOE on our 128x128-block codes; fp8_pc AMXFP8PerChannel_MOE on our codes;
        int4_pr (ours with one scale per row) AMXInt4_MOE only.
  avx2: bf16 AVX2BF16_MOE; int4 AVX2RawInt4_MOE on our codes; fp8 AVX2FP8_MOE; int8 and w8a8
        its llamafile Q8_0 (MOE), which it quantizes itself.
Where kt-kernel quantizes the weights itself, rel_err is against the original weights (so it
includes its quantization error); elsewhere against our dequantized weights.
kt-kernel runs in the interpreter given by --ktkernel-python (default: this one, when it can
import kt_kernel), via bench/_ktkernel_runner.py.

With --vs-ktkernel, one line per format and T has impl "ratio": kt-kernel's fastest class and thread
count over kt-core's time, per round (--rounds N: kt-core and kt-kernel timed N times, alternating,
so a drift of the machine between the two shows as spread, not as a ratio), their median and min.

One JSON line per (impl, format, tokens): ms (median), tokens_per_s, weight_gbps (bytes of
the experts the tokens touched / time), bw_fraction (of the memory bandwidth measured in this
run by the extension's native multi-threaded streaming loop), rel_err (max error against an
fp32 reference on the dequantized weights, relative to the reference's max), quant_err (the
format's own error: dequantized vs original weights, relative).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median, repo_on_path, set_threads  # noqa: E402

repo_on_path()
from kt_backends.cpu import native  # noqa: E402
from kt_core.backend.torch_ops.moe import moe_experts as torch_moe  # noqa: E402
from kt_core.weights.quant import ExpertWeights, QuantizedWeight, dequantize, from_fp8_blocks, quantize  # noqa: E402

E, K, H, I = 128, 8, 2048, 768


def make_weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, *shape, generator=g) * shape[1] ** -0.5).to(torch.bfloat16)
            for shape in ((I, H), (I, H), (H, I))]


# --formats names -> (quant format, group size; None = --group)
# (int4_pr: int4 with one scale per row, quant.group_size=0, kt-kernel's AMXInt4 layout)
FORMATS = {"bf16": ("none", 0), "int8": ("int8", 0), "int8_g32": ("int8", 32), "w8a8": ("w8a8", 0),
           "int4": ("int4", None), "int4_pr": ("int4", 0), "fp8": ("fp8", 128), "fp8_pc": ("fp8", 0)}


def build(fmt: str, base, group: int, like_ktkernel: bool = False):
    """The experts in ``fmt``; ``like_ktkernel``: in the exact values kt-kernel can also take
    (int4 scales rounded to bf16, fp8 with 128x128 block scales)."""
    if fmt not in FORMATS:
        sys.exit(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    quant, g = FORMATS[fmt]
    if quant == "none":
        ws = base
    elif like_ktkernel and fmt == "fp8":
        ws = [fp8_blocks(w) for w in base]
    else:
        ws = [quantize(w.float(), quant, group_size=group if g is None else g, int8_group=g if quant == "int8" else 0)
              for w in base]
        if like_ktkernel and quant == "int4":
            ws = [QuantizedWeight(w.format, w.qdata, w.scales.to(torch.bfloat16).float(), w.zeros, w.group_size,
                                  w.in_features) for w in ws]
    return ExpertWeights(torch.arange(E), *ws)


def fp8_blocks(w: torch.Tensor, b: int = 128) -> QuantizedWeight:
    n_e, n, k = w.shape
    f = w.float().reshape(n_e, n // b, b, k // b, b)
    scale = f.abs().amax(dim=(2, 4)).clamp_min(1e-12) / 448.0
    codes = (f / scale[:, :, None, :, None]).to(torch.float8_e4m3fn).reshape(n_e, n, k)
    return from_fp8_blocks(codes, scale, b)


def ktkernel_probe(a) -> dict:
    """kt-kernel's build, the class family --ktkernel-family resolves to, its classes per format."""
    import json
    import subprocess
    import tempfile

    runner = Path(__file__).resolve().parent / "_ktkernel_runner.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "probe.json")
        proc = subprocess.run([a.ktkernel_python, str(runner), "--probe", str(out), "--family", a.ktkernel_family],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode or not out.is_file():
            sys.exit(f"--vs-ktkernel: {(proc.stderr.strip() or proc.stdout.strip())[-400:]}")
        return json.loads(out.read_text())


# what a kt-kernel class is given (see _ktkernel_runner.FAMILIES), for the rows
KT_WEIGHTS = {"bf16": "our bf16 weights", "raw": "our codes and scales",
              "online": "our bf16 weights, quantized by kt-kernel itself",
              "q8_0": "llamafile Q8_0 made by kt-kernel from our bf16 weights"}


def ktkernel_rows(fmt, ex, base, xs, sets_by_t, refs, ref_orig, a, bw, touched, kt, tag):
    """kt-kernel's operators on the same weights and inputs, in its own interpreter: JSON rows (with
    tag's keys), and {tokens: ms of its fastest class and thread count}."""
    import json
    import subprocess
    import tempfile

    from safetensors.torch import load_file, save_file

    cases = kt["cases"].get(fmt)
    if fmt == "int4_pr":  # one scale per row: kt-kernel's per-channel class (it quantizes our bf16 weights)
        cases = [c for c in kt["cases"].get("int4", []) if c[1] == "online"]
    info = {"ktkernel_family": kt["family"], "ktkernel_variant": kt["variant"]}
    if not cases:
        emit({"impl": "kt-kernel", "format": label(fmt, a.group), **info,
              "skipped": f"no kt-kernel {kt['family']} operator for it"})
        return {}
    t = {}
    if any(kind != "raw" for _, kind in cases):
        t.update(gate=base[0], up=base[1], down=base[2])
    if any(kind == "raw" for _, kind in cases):
        for name in ("gate", "up", "down"):
            w = getattr(ex, name)
            t[f"{name}_codes"] = w.qdata.contiguous()
            if fmt == "int4":  # bf16 per group (build() rounded them, so ours are the same values)
                sc = w.scales.to(torch.bfloat16)
            elif fmt == "fp8":  # fp32 per 128x128 block: our rows repeat each block's scale
                sc = w.scales[:, ::128, :].float()
            else:  # fp8_pc: fp32 per row
                sc = w.scales.float().reshape(E, -1)
            t[f"{name}_scales"] = sc.contiguous()
    for T, sets in sets_by_t.items():
        t[f"x_{T}"] = xs[T].contiguous()
        for i, (ids, w) in enumerate(sets):
            t[f"ids_{T}_{i}"], t[f"w_{T}_{i}"] = ids.long().contiguous(), w.float().contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        job = {"E": E, "K": K, "H": H, "I": I, "format": "int4" if fmt == "int4_pr" else fmt, "group": a.group, "cases": cases,
               "tokens": list(sets_by_t), "sets": a.sets, "repeats": a.repeats,
               "threads": list(range(1, a.threads + 1))}
        Path(tmp, "job.json").write_text(json.dumps(job))
        save_file(t, str(Path(tmp, "inputs.safetensors")))
        del t
        runner = Path(__file__).resolve().parent / "_ktkernel_runner.py"
        proc = subprocess.run([a.ktkernel_python, str(runner), "--job", tmp], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            emit({"impl": "kt-kernel", "format": label(fmt, a.group), **info,
                  "ktkernel_class": ",".join(c for c, _ in cases), "returncode": proc.returncode,
                  "error": (proc.stderr.strip() or proc.stdout.strip())[-400:]})
            return {}
        outs = load_file(str(Path(tmp, "outputs.safetensors")))
        best: dict = {}
        for r in json.loads(Path(tmp, "results.json").read_text()):
            T, s, kind = r["tokens"], r["ms"] / 1e3, r["kind"]
            on_orig = kind in ("online", "q8_0")
            ref = ref_orig[T] if on_orig else refs[T]
            out = outs[f"out_{r['case']}_{T}_{r['threads']}"].float()
            # touched[T]: bytes as our format stores them (kt-kernel's own layout may differ, e.g. per channel)
            best[T] = min(best.get(T, float("inf")), r["ms"])
            emit({"impl": "kt-kernel", "format": label(fmt, a.group), "ktkernel_class": r["class"], **info,
                  "ktkernel_weights": KT_WEIGHTS[kind], "tokens": T, "threads": r["threads"], "ms": r["ms"], **tag,
                  "tokens_per_s": T / s, "weight_gbps": touched[T] / s / 1e9, "bw_fraction": touched[T] / s / 1e9 / bw,
                  "rel_err": float((out - ref).abs().max() / ref.abs().max()),
                  "rel_err_basis": "original weights" if on_orig else "dequantized weights"})
    return best


def label(fmt: str, group: int) -> str:
    return {"int4": f"int4_g{group}", "int4_pr": "int4_per_row", "fp8": "fp8_g128",
            "fp8_pc": "fp8_per_channel"}.get(fmt, fmt)


def routes(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def timed(fn, repeats: int, n_sets: int) -> float:
    """Median time of fn(i) over repeats, cycling routing sets i so a decode step cannot reuse
    the previous step's experts from cache."""
    fn(0)  # warm-up
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r % n_sets)
        times.append(time.perf_counter() - t)
    return median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,128,512")
    ap.add_argument("--formats", default="bf16,int8,w8a8,int4,fp8", help=f"any of {','.join(FORMATS)}")
    ap.add_argument("--group", type=int, default=32, help="int4 group size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip the torch-path rows (slow at large T)")
    ap.add_argument("--sets", type=int, default=16, help="distinct routings cycled while timing")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --vs-ktkernel: time kt-core and kt-kernel this many times, alternating, and "
                         "print each round's ratio (impl \"ratio\": kt-kernel's fastest class / kt-core)")
    ap.add_argument("--vs-ktkernel", action="store_true", help="add kt-kernel rows (see the module doc)")
    ap.add_argument("--ktkernel-python", default=None, help="interpreter with kt-kernel installed")
    ap.add_argument("--ktkernel-family", choices=("auto", "amx", "avx2"), default="auto",
                    help="kt-kernel's operator classes (auto: AMX where its build has them, else AVX2)")
    a = ap.parse_args()
    if a.vs_ktkernel and a.ktkernel_python is None:
        import importlib.util

        if importlib.util.find_spec("kt_kernel") is None:
            sys.exit("--vs-ktkernel: kt_kernel is not importable here; pass --ktkernel-python PATH "
                     "(see ../shared/tools/ktkernel-bench/README.md for its venv)")
        a.ktkernel_python = sys.executable
    if a.rounds < 1:
        sys.exit(f"--rounds must be at least 1, got {a.rounds}")
    kt = ktkernel_probe(a) if a.vs_ktkernel else None
    set_threads(a.threads)
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.status()}")
    native.set_threads(a.threads)
    bw = native.memory_bandwidth_gbps(megabytes=1024, iters=5)
    emit({"impl": "membw", "gbps": bw, "threads": a.threads, "variant": native.variant()})
    base = make_weights()
    for fmt in a.formats.split(","):
        ex = build(fmt, base, a.group, like_ktkernel=a.vs_ktkernel)
        packed = native.pack(ex)
        deq = [dequantize(w) for w in (ex.gate, ex.up, ex.down)]
        ref_ex = ExpertWeights(torch.arange(E), *deq)
        quant_err = max(float((d - b.float()).abs().max() / b.float().abs().max()) for d, b in zip(deq, base))
        per_expert = packed.nbytes() / E
        xs, sets_by_t, refs, ref_orig, touched = {}, {}, {}, {}, {}
        orig_ex = ExpertWeights(torch.arange(E), *[b.float() for b in base])
        for T in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(torch.bfloat16)
            sets = [routes(T, T * 1000 + i) for i in range(a.sets)]
            ids, w = sets[0]
            # the reference on the dequantized weights (w8a8: and the same activation quantization)
            xs[T], sets_by_t[T] = x, sets
            touched[T] = median([int(i.unique().numel()) for i, _ in sets]) * per_expert
            refs[T] = torch_moe(x.float(), ids, w, ref_ex if FORMATS[fmt][0] != "w8a8" else ex)
            if a.vs_ktkernel:
                ref_orig[T] = torch_moe(x.float(), ids, w, orig_ex)
        ours: dict = {T: [] for T in xs}
        theirs: dict = {T: [] for T in xs}
        for rnd in range(a.rounds):  # kt-core, then kt-kernel, again each round
            tag = {"round": rnd} if a.rounds > 1 else {}
            for T, x in xs.items():
                sets = sets_by_t[T]
                impls = [("kt-core", lambda i: native.moe_forward(packed, x, *sets[i]))]
                if not a.no_torch and rnd == 0:
                    impls.append(("torch", lambda i: torch_moe(x, *sets[i], ex)))
                for impl, fn in impls:
                    out = fn(0)
                    s = timed(fn, a.repeats, a.sets)
                    if impl == "kt-core":
                        ours[T].append(s * 1e3)
                    emit({"impl": impl, "format": label(fmt, a.group), "tokens": T, **tag,
                          "threads": a.threads, "ms": s * 1e3, "tokens_per_s": T / s, "weight_gbps": touched[T] / s / 1e9,
                          "bw_fraction": touched[T] / s / 1e9 / bw,
                          "rel_err": float((out.float() - refs[T]).abs().max() / refs[T].abs().max()),
                          "quant_err": quant_err})
            if a.vs_ktkernel:
                best = ktkernel_rows(fmt, ex, base, xs, sets_by_t, refs, ref_orig, a, bw, touched, kt, tag)
                for T, ms in best.items():
                    theirs[T].append(ms)
        for T in xs:  # kt-kernel's fastest over ours, round by round
            if theirs[T] and len(theirs[T]) == len(ours[T]):
                ratios = [k / o for k, o in zip(theirs[T], ours[T])]
                emit({"impl": "ratio", "format": label(fmt, a.group), "tokens": T, "rounds": len(ratios),
                      "kt_core_ms": ours[T], "ktkernel_fastest_ms": theirs[T], "ratios": ratios,
                      "ratio_median": median(ratios), "ratio_min": min(ratios)})


if __name__ == "__main__":
    main()
