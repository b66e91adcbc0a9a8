"""Runs kt-kernel's CPU MoE operator on weights and inputs that bench/moe_layer.py wrote, in
whatever interpreter has kt-kernel installed (it pins its own torch, so it usually lives in
a venv of its own). Writes one JSON record per (format, tokens, threads) to --out and the
operator's output for the first routing of every case to --outputs (safetensors).

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

# our format name -> kt-kernel's AVX2 operator class (what its avx2 build offers)
CLASSES = {"bf16": "AVX2BF16_MOE", "int4": "AVX2RawInt4_MOE", "fp8": "AVX2FP8_MOE", "q8_0": "MOE"}


def make_moe(ext, cpu, kind: str, group: int, t: dict, E: int, K: int, H: int, I: int, max_len: int):
    cfg = ext.moe.MOEConfig(E, K, H, I, 0)
    cfg.max_len, cfg.layer_idx, cfg.pool = max_len, 0, cpu.backend_
    keep = []
    if kind == "bf16":
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
    else:  # int4 / fp8: codes and scales as prepared by the bench
        srcs = [t[f"{n}_codes"] for n in ("gate", "up", "down")]
        scales = [t[f"{n}_scales"] for n in ("gate", "up", "down")]
        cfg.gate_scale, cfg.up_scale, cfg.down_scale = (s.data_ptr() for s in scales)
        cfg.quant_config.bits = 4 if kind == "int4" else 8
        cfg.quant_config.group_size = group
        cfg.quant_config.zero_point = False
        keep += scales
    keep += srcs
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = (s.data_ptr() for s in srcs)
    moe = getattr(ext.moe, CLASSES[kind])(cfg)
    p2l = torch.arange(E, dtype=torch.int64)
    cpu.submit(moe.load_weights_task(p2l.data_ptr()))
    cpu.sync()
    return moe, keep, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    job_dir = Path(ap.parse_args().job)
    job = json.loads((job_dir / "job.json").read_text())
    t = load_file(str(job_dir / "inputs.safetensors"))
    import kt_kernel

    ext = kt_kernel.kt_kernel_ext
    E, K, H, I = job["E"], job["K"], job["H"], job["I"]
    records, outputs = [], {}
    for threads in job["threads"]:
        cpu = ext.CPUInfer(threads)
        moe, keep, cfg = make_moe(ext, cpu, job["kind"], job["group"], t, E, K, H, I, max(job["tokens"]))
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
            outputs[f"out_{T}_{threads}"] = out.clone()
            records.append({"tokens": T, "threads": threads, "ms": statistics.median(times) * 1e3})
        del moe, keep, cpu
    save_file(outputs, str(job_dir / "outputs.safetensors"))
    (job_dir / "results.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main()
