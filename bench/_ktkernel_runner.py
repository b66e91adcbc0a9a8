"""Runs kt-kernel's CPU MoE operators on weights and inputs that bench/moe_layer.py wrote, in
whatever interpreter has kt-kernel installed (it pins its own torch, so it usually lives in
a venv of its own). Writes one JSON record per (operator class, tokens, threads) to
DIR/results.json and the operator's output for the first routing of every case to
DIR/outputs.safetensors.

    python bench/_ktkernel_runner.py --probe FILE --family auto   # which classes to run here
    python bench/_ktkernel_runner.py --job DIR      # DIR holds job.json and inputs.safetensors

Not imported by kt-core; only bench/moe_layer.py --vs-ktkernel starts it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# kt-kernel's operator classes per family, for each of our formats: [(class, what it is given)]
#   "bf16":   our bf16 weights
#   "online": our bf16 weights, which the class quantizes itself (its own int8 / int4 per channel)
#   "q8_0":   llamafile Q8_0 blocks that kt-kernel makes from our bf16 weights
#   "raw":    our codes and scales (int4: bf16 scale per group; fp8: fp32 per 128x128 block / per row)
# "amx" is what kt-kernel's amx build runs with AMX tiles; its avx512 builds have the same
# classes in AVX-512 code. Its avx2 build has only the "avx2" family (and llamafile's MOE).
FAMILIES = {
    "amx": {"bf16": [("AMXBF16_MOE", "bf16")], "int8": [("AMXInt8_MOE", "online")],
            "int8_g32": [("AMXInt8_MOE", "online")],
            "w8a8": [("AMXInt8_MOE", "online")],
            "int4": [("AMXInt4_KGroup_MOE", "raw"), ("AMXInt4_MOE", "online")],
            "fp8": [("AMXFP8_MOE", "raw")], "fp8_pc": [("AMXFP8PerChannel_MOE", "raw")]},
    "avx2": {"bf16": [("AVX2BF16_MOE", "bf16")], "int8": [("MOE", "q8_0")], "int8_g32": [("MOE", "q8_0")],
             "w8a8": [("MOE", "q8_0")],
             "int4": [("AVX2RawInt4_MOE", "raw")], "fp8": [("AVX2FP8_MOE", "raw")]},
}
M_STEP = 256  # the AMX classes' max_len must be a multiple of this


def cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe(family: str) -> dict:
    """The family to run ('auto': the AMX classes where the kt-kernel build that loaded has them,
    i.e. its amx or avx512 build, else AVX2) and its classes per format."""
    import kt_kernel

    ext = kt_kernel.kt_kernel_ext
    flags = cpu_flags()
    has_amx = hasattr(ext.moe, "AMXBF16_MOE")
    variant = str(getattr(kt_kernel, "__cpu_variant__", "unknown"))
    if family == "auto":
        family = "amx" if has_amx else "avx2"
    elif family == "amx" and not has_amx:
        raise SystemExit(f"kt-kernel's {variant} build has no AMX classes (CPU flags: "
                         f"{' '.join(sorted(f for f in flags if f.startswith(('amx', 'avx512'))))})")
    missing = [c for cases in FAMILIES[family].values() for c, _ in cases if not hasattr(ext.moe, c)]
    if missing:
        raise SystemExit(f"kt-kernel's {variant} build lacks {', '.join(sorted(set(missing)))}")
    return {"variant": variant, "family": family, "cpu_amx": {"amx_int8", "amx_bf16"} <= flags,
            "cpu_avx512": "avx512f" in flags, "cases": FAMILIES[family]}


def make_moe(ext, cpu, cls: str, kind: str, fmt: str, group: int, t: dict, E: int, K: int, H: int, I: int,
             max_len: int):
    cfg = ext.moe.MOEConfig(E, K, H, I, 0)  # 0: no GPU experts mask, every expert on the CPU
    cfg.max_len, cfg.layer_idx, cfg.pool = max_len, 0, cpu.backend_
    keep = []
    if kind in ("bf16", "online"):
        srcs = [t["gate"], t["up"], t["down"]]
    elif kind == "q8_0":  # llamafile's int8 blocks of 32, quantized by kt-kernel itself
        gt = ext.kvcache.ggml_type.Q8_0
        srcs = []
        for name in ("gate", "up", "down"):
            rows = []
            for w in t[name]:
                f = w.float().contiguous()  # named: it must outlive the call that reads its pointer
                rows.append(ext.utils.from_float(f.data_ptr(), f.numel(), gt))
            srcs.append(torch.stack(rows).contiguous())
        cfg.gate_type = cfg.up_type = cfg.down_type = int(gt)
        cfg.hidden_type = int(ext.kvcache.ggml_type.BF16)
        cfg.m_block, cfg.group_min_len, cfg.group_max_len = 32, 10, max_len
    else:  # raw int4 / fp8: codes and scales as prepared by the bench
        srcs = [t[f"{n}_codes"] for n in ("gate", "up", "down")]
        scales = [t[f"{n}_scales"] for n in ("gate", "up", "down")]
        cfg.gate_scale, cfg.up_scale, cfg.down_scale = (s.data_ptr() for s in scales)
        cfg.quant_config.bits = 4 if fmt == "int4" else 8
        cfg.quant_config.group_size = group if fmt == "int4" else 0 if fmt == "fp8_pc" else 128
        cfg.quant_config.zero_point = False
        if fmt == "fp8_pc":
            cfg.quant_config.per_channel = True
        keep += scales
    keep += srcs
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = (s.data_ptr() for s in srcs)
    moe = getattr(ext.moe, cls)(cfg)
    p2l = torch.arange(E, dtype=torch.int64)  # physical -> logical expert id (identity)
    cpu.submit(moe.load_weights_task(p2l.data_ptr()))
    cpu.sync()
    return moe, keep, cfg


def run_job(job_dir: Path) -> None:
    job = json.loads((job_dir / "job.json").read_text())
    t = load_file(str(job_dir / "inputs.safetensors"))
    import kt_kernel

    ext = kt_kernel.kt_kernel_ext
    E, K, H, I = job["E"], job["K"], job["H"], job["I"]
    records, outputs = [], {}
    for c, (cls, kind) in enumerate(job["cases"]):
        max_len = max(job["tokens"])
        if cls.startswith("AMX"):
            max_len = max(M_STEP, -(-max_len // M_STEP) * M_STEP)
        for threads in job["threads"]:
            cpu = ext.CPUInfer(threads)
            moe, keep, cfg = make_moe(ext, cpu, cls, kind, job["format"], job["group"], t, E, K, H, I, max_len)
            qlen = torch.zeros(1, dtype=torch.int32)
            for T in job["tokens"]:
                sets = [(t[f"x_{T}"], t[f"ids_{T}_{i}"], t[f"w_{T}_{i}"]) for i in range(job["sets"])]
                out = torch.zeros(T, H, dtype=torch.bfloat16)

                def run(i):
                    x, ids, w = sets[i]
                    qlen[0] = T
                    cpu.submit(moe.forward_task(qlen.data_ptr(), K, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                                out.data_ptr(), False))
                    cpu.sync()

                run(0)
                times = []
                for r in range(job["repeats"]):
                    start = time.perf_counter()
                    run(r % len(sets))
                    times.append(time.perf_counter() - start)
                run(0)
                outputs[f"out_{c}_{T}_{threads}"] = out.clone()
                records.append({"case": c, "class": cls, "kind": kind, "tokens": T, "threads": threads,
                                "ms": statistics.median(times) * 1e3})
            moe = None  # free its buffers, then its sources and worker pool, before the next one
            keep.clear()
            cpu = None
    save_file(outputs, str(job_dir / "outputs.safetensors"))
    (job_dir / "results.json").write_text(json.dumps(records))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", help="directory with job.json and inputs.safetensors")
    ap.add_argument("--probe", help="write the kt-kernel build, family and classes per format here")
    ap.add_argument("--family", choices=("auto", "amx", "avx2"), default="auto")
    a = ap.parse_args()
    if a.probe:
        Path(a.probe).write_text(json.dumps(probe(a.family)))
    if a.job:
        run_job(Path(a.job))


if __name__ == "__main__":
    main()
