"""kt run: load a model (default: the embedded synthetic one) and generate from a prompt."""
from __future__ import annotations

import sys

HELP = "generate from a prompt (no model.path: a built-in synthetic model with random weights, gibberish text)"
USAGE = """kt run [model.path=DIR] [prompt="..."] [generate.max_new_tokens=N] [generate.temperature=T]
       [generate.chat=true] [topology=... quant=... other overrides]

  kt run                                   # synthetic Qwen3-MoE-shaped model, random weights: gibberish
  kt run model.path=/models/Qwen3-30B-A3B prompt="Explain MoE in one line" generate.chat=true
  kt run model.path=DIR quant=int8 generate.temperature=0.7 generate.seed=1

Without model.path the embedded default answers: a small synthetic Qwen3-MoE-shaped checkpoint with
random weights and a real tokenizer, built once into the cache folder (nothing is downloaded). It
shows the machinery and its speed, not language: its text is gibberish. Every value (model.path,
generate.*, topology, devices) is checked before anything loads.

Streams the text, then prints token counts and prefill / decode tokens per second.

--profile  also print where a step's time goes: per part (attention projections, attention, norms
           and rope, router, MoE experts, dense MLP, lm_head, the rest) the ms per prefill and per
           decode step, the weight MB a decode token reads, the GB/s reached, and each part's share
           beside its roofline share at the measured memory bandwidth. Parts are timed with the
           devices synchronised around them, so a profiled run is a little slower than a plain one."""
FLAGS = ("--profile",)
DEFAULT_PROMPT = "The three most useful things to know about mixture-of-experts models are"


def run(overrides, flags) -> int:
    from kt_core.commands._engine import load_engine, sampling_kwargs, stats_line

    engine = load_engine(overrides)
    cfg = engine.cfg
    prompt = cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPT
    if engine.tokenizer is None:
        from kt_core.errors import KtError

        raise KtError(f"{cfg.model.path} has no tokenizer.json, so kt run cannot take text; use the Python API "
                      "with token ids")
    source = [{"role": "user", "content": prompt}] if cfg.generate.chat else prompt
    if not cfg.generate.chat:
        sys.stdout.write(prompt)
    sys.stdout.flush()

    def emit(_i, _tok, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if "--profile" not in flags:
        result = engine.generate(source, on_token=emit, **sampling_kwargs(cfg))
        sys.stdout.write("\n")
        print(stats_line(result), file=sys.stderr)
        return 0
    from kt_core.runtime.step_profile import StepProfiler, format_table, host_bandwidth_gbps

    prof = StepProfiler(engine)
    with prof.active():
        result = engine.generate(source, on_token=emit, **sampling_kwargs(cfg))
    sys.stdout.write("\n")
    print(stats_line(result), file=sys.stderr)
    bandwidth = host_bandwidth_gbps() if engine.model.device.type == "cpu" else None
    rows = prof.report("prefill") + prof.report("decode", bandwidth)
    where = f"; roofline at {bandwidth:.1f} GB/s measured" if bandwidth else ""
    print(f"\nprofile ({prof.steps.get('prefill', 0)} prefill, {prof.steps.get('decode', 0)} decode steps{where}):\n"
          + format_table(rows), file=sys.stderr)
    return 0
