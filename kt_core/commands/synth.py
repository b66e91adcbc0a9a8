"""kt synth: write a synthetic checkpoint of any supported architecture, with real layer shapes."""
from __future__ import annotations

HELP = "write a synthetic checkpoint (real layer shapes, calibrated routers, real tokenizer)"
USAGE = """kt synth [arch=NAME] [preset=NAME] [layers=N] out=DIR [seed=N] [tokenizer=qwen|deepseek|mistral] [vocab=N]

  kt synth arch=qwen3_moe layers=2 preset=qwen3-30b-a3b out=/tmp/q30b-2l
  kt synth arch=deepseek_v3 layers=4 out=/tmp/dsv3-4l
  kt synth arch=qwen3_moe layers=2 vocab=32000 tokenizer=mistral out=/tmp/bench   # the e2e benchmark model

Prints, for each MoE layer, how many distinct experts the sample prompt reached."""
KEYS = {"arch": str, "preset": str, "layers": int, "out": str, "seed": int, "tokenizer": str, "vocab": int}


def run(overrides, flags) -> int:
    from pathlib import Path

    from kt_core.errors import KtError
    from kt_core.models.synthetic import ARCH_PRESET, preset_names, synthesize

    args = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or key not in KEYS:
            raise KtError(f"kt synth takes {', '.join(k + '=' for k in KEYS)}; got '{item}'")
        try:
            args[key] = KEYS[key](value)
        except ValueError:
            raise KtError(f"{key}={value!r} must be {KEYS[key].__name__}") from None
    if "out" not in args:
        raise KtError(f"kt synth needs out=DIR; archs: {', '.join(ARCH_PRESET)}; presets: {', '.join(preset_names())}")
    vocab = args.pop("vocab", None)
    report = synthesize(Path(args.pop("out")), shape={"vocab_size": vocab} if vocab else None, **args)
    s = report.spec
    print(f"wrote {s.arch} ({s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size}) to {report.path}")
    if report.reached:
        total = s.moe.num_experts
        for layer, n in report.reached.items():
            print(f"  layer {layer:>3}: {n:>4}/{total} experts reached by {report.sample_tokens} sample tokens")
    return 0
