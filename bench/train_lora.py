"""LoRA fine-tuning tokens/s and peak RSS of kt-core (`kt sft`'s trainer) vs transformers + peft,
same checkpoint, same sequences, same thread count, each in its own process (so peak RSS is its own),
alternating; prints one JSON line per run and a summary per implementation (medians, ratios).

    python bench/train_lora.py                                 # builds the default model once
    python bench/train_lora.py --model DIR --seq 512 --steps 10 --repeats 3 --threads 2
    python bench/train_lora.py --quant int4 --impls kt-core,kt-core-torch-experts,transformers   # QLoRA

Default model: 2 layers of Qwen3-30B-A3B (hidden 2048, 128 experts top-8, vocab 32000), bf16, LoRA r=16
on q / k / v / o. A step is one sequence of --seq tokens, forward + backward + AdamW; the first
--warmup steps of each run are not timed, then --steps are. transformers' first steps run slower
while glibc's allocator settles (its big temporaries mmapped and faulted in afresh each time): 3
steps after 1 warm-up measured it at 320 tokens/s where 10 after 2 gave 392, and 394 in 3 steps with
--same-heap. So the defaults time 10 steps after 2, which a long training run sees. The profile line
splits kt-core's step into forward and backward time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (alternate, default_bench_model, emit, peak_rss_mb, repo_on_path,  # noqa: E402
                     set_threads, summarize)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def default_model() -> Path:
    return default_bench_model()


def run_one(impl: str, model: Path, seq: int, steps: int, threads: int, quant: str = "none",
            expert_lora: bool = False, profile: bool = False, same_heap: bool = False,
            checkpoint_layers: bool = False, warmup: int = 2) -> dict:
    if impl.startswith("kt-core"):  # as `kt sft` runs: OpenMP's idle spin shortened before torch loads
        repo_on_path()
        from kt_core.runtime.omp import shorten_idle_spin

        shorten_idle_spin()
    import torch
    import torch.nn.functional as F

    set_threads(threads)
    if same_heap and not impl.startswith("kt-core"):  # kt-core's LoraModel sets it itself
        repo_on_path()
        from kt_core.runtime.heap import keep_freed_memory

        keep_freed_memory()
    ids = [(i * 7919) % 30000 + 100 for i in range(seq)]
    first = seq // 4  # the loss covers the last three quarters, as an answer would
    fwd = bwd = optim = 0.0
    if impl.startswith("kt-core"):
        repo_on_path()
        from kt_core.models.model import CausalLM, QuantPlan
        from kt_core.models.spec import parse_config
        from kt_core.train.lora_model import AutogradBackend, LoraModel
        from kt_core.train.sft import Example, loss_of
        from kt_core.weights.checkpoint import Checkpoint

        ck = Checkpoint(model)
        from kt_core.weights.quant import Quant

        plan = QuantPlan() if quant == "none" else QuantPlan(experts=Quant(quant), group_size=32)
        # kt-core: the frozen experts on the native kernels (as kt sft runs them); kt-core-torch-experts:
        # on the torch reference (the path before native backward products, and LoRA on the experts)
        m = CausalLM.load(ck, parse_config(ck.config), AutogradBackend(native_experts=impl == "kt-core"),
                          torch.bfloat16, plan)
        m.checkpoint_layers = checkpoint_layers  # kt sft's train.checkpoint_layers
        lora = LoraModel(m, TARGETS + (["experts.gate_up_proj", "experts.down_proj"] if expert_lora else []),
                         r=16, alpha=32)
        opt = torch.optim.AdamW(lora.parameters(), lr=1e-4)
        ex = Example(ids, first)

        def step():
            nonlocal fwd, bwd, optim
            t = time.perf_counter()
            loss, n = loss_of(m, ex)
            t2 = time.perf_counter()
            (loss / n).backward()
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            fwd, bwd, optim = fwd + t2 - t, bwd + t3 - t2, optim + time.perf_counter() - t3
    else:
        import peft
        from transformers import AutoModelForCausalLM

        # transformers-fp32: the model in float32, what escapes torch's scalar bf16 products on CPUs
        # without oneDNN bf16 (AVX2-only: kt_core/backend/torch_ops/wide_mm.py)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32 if impl == "transformers-fp32"
                                                  else torch.bfloat16)
        extra = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} if expert_lora else {}
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                                     **extra))
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        x = torch.tensor([ids])
        keep = torch.arange(1, seq) >= first

        def step():
            nonlocal fwd, bwd, optim
            t = time.perf_counter()
            logits = pm(x).logits[0].float()
            loss = F.cross_entropy(logits[:-1][keep], x[0, 1:][keep])
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            fwd, bwd, optim = fwd + t2 - t, bwd + t3 - t2, optim + time.perf_counter() - t3
    for _ in range(warmup):
        step()
    fwd = bwd = optim = 0.0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    elapsed = sum(times)
    out = {"impl": impl, "quant": quant if impl.startswith("kt-core") else "none", "expert_lora": expert_lora,
           "same_heap": same_heap or impl.startswith("kt-core"),
           "checkpoint_layers": checkpoint_layers and impl.startswith("kt-core"),
           "seq": seq, "steps": steps, "warmup": warmup, "threads": threads, "tokens_per_s": seq * steps / elapsed,
           "step_ms_median": round(sorted(times)[len(times) // 2] * 1e3, 1),
           "forward_s_per_step": fwd / steps, "backward_s_per_step": bwd / steps,
           "optimizer_s_per_step": optim / steps, "peak_rss_mb": round(peak_rss_mb())}
    if profile:
        out["profile_ms"] = profile_step(step)
    return out


# torch.profiler op names -> what they are in a kt-core step (self CPU time; the rest is "other")
PROFILE_GROUPS = {"experts_forward": ("_Experts", "_Rows"), "experts_backward": ("_ExpertsBackward", "_RowsBackward"),
                  "attention": ("scaled_dot_product", "_CausalAttention", "_CausalAttentionBackward",
                                "_CausalAttentionF32", "_CausalAttentionF32Backward"),
                  "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
                  "optimizer": ("Optimizer.step", "aten::_foreach")}


def profile_step(step) -> dict:
    """One more step under torch.profiler: its self CPU time by PROFILE_GROUPS (ms), what bounds a step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out = {k: 0.0 for k in PROFILE_GROUPS}
    total = 0.0
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1000
        total += ms
        group = next((g for g, names in PROFILE_GROUPS.items()
                      if any(ev.key == n or (not n.startswith("_") and n in ev.key) for n in names)), None)
        if group:
            out[group] += ms
    out["other"] = total - sum(out.values())
    out["total"] = total
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="timed steps a run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocators and caches settle)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="kt-core,transformers",
                    help="kt-core (native expert kernels), kt-core-torch-experts, transformers, transformers-fp32 "
                         "(the model in float32)")
    ap.add_argument("--quant", default="none", choices=["none", "int4", "int8", "fp8"],
                    help="kt-core's frozen experts (QLoRA: int4, g32); transformers stays bf16")
    ap.add_argument("--profile", action="store_true",
                    help="one more step under torch.profiler: self CPU ms by experts forward / backward, attention, "
                         "matmul, optimizer, other")
    ap.add_argument("--expert-lora", action="store_true",
                    help="LoRA on the routed experts too (one adapter an expert; peft's target_parameters)")
    ap.add_argument("--same-heap", action="store_true",
                    help="transformers' process keeps freed memory for reuse as kt-core's trainer does "
                         "(kt_core/runtime/heap.py, glibc): the ratio then leaves the allocator out")
    ap.add_argument("--checkpoint-layers", action="store_true",
                    help="kt-core recomputes each layer in the backward pass (kt sft's train.checkpoint_layers=true)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        emit(run_one(a.child, a.model, a.seq, a.steps, a.threads, a.quant, a.expert_lora, a.profile, a.same_heap,
                     a.checkpoint_layers, a.warmup))
        return
    model = a.model or default_model()
    runs = alternate(__file__, a.impls.split(","), a.repeats,
                     ["--model", str(model), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
                      "--threads", str(a.threads),
                      "--quant", a.quant] + (["--expert-lora"] if a.expert_lora else [])
                     + (["--same-heap"] if a.same_heap else []) + (["--checkpoint-layers"] if a.checkpoint_layers else [])
                     + (["--profile"] if a.profile else []))
    summarize(runs, ['tokens_per_s', 'step_ms_median', 'forward_s_per_step', 'backward_s_per_step',
                     'optimizer_s_per_step', 'peak_rss_mb'],
              {'tokens_per_s': 'tokens_per_s_vs_transformers', 'peak_rss_mb': 'peak_rss_vs_transformers'})


if __name__ == "__main__":
    main()
