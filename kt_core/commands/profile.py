"""kt profile: route prompts through a model and write per-layer expert activation counts."""
from __future__ import annotations

import json
import sys

HELP = "route prompts through a model and write per-layer expert counts (for expert_policy=frequency)"
USAGE = """kt profile [model.path=DIR] [profile.prompts=FILE] [profile.out=stats.json] [profile.max_new_tokens=N]

  kt profile model.path=/models/Qwen3-30B-A3B profile.prompts=my_prompts.txt profile.out=q30b.json
  kt plan model.path=/models/Qwen3-30B-A3B topology=hybrid_1gpu device.cuda.memory_gb=12 \\
      topology.expert_policy.strategy=frequency topology.expert_policy.stats_file=q30b.json

prompts: a text file with one prompt per line, or .jsonl lines with a "prompt" field;
without it a built-in mix of prose, code and numbers is routed."""


def read_prompts(path) -> list[str]:
    from pathlib import Path

    from kt_core.errors import KtError

    p = Path(path).expanduser()
    if not p.is_file():
        raise KtError(f"prompts file not found: {p}")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(lines, 1):
            try:
                out.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError):
                raise KtError(f"{p} line {n}: expected a JSON object with a \"prompt\" field") from None
        lines = out
    if not lines:
        raise KtError(f"{p} has no prompts")
    return lines


def run(overrides, flags) -> int:
    from kt_core.commands._engine import load_engine
    from kt_core.models.synthetic import SAMPLE_TEXT
    from kt_core.progress import progress
    from kt_core.runtime.profiling import record_routing

    engine = load_engine(overrides, "profile", generate=False, notice=False)
    cfg = engine.cfg
    prompts = read_prompts(cfg.profile.prompts) if cfg.profile.prompts else [s.strip() + "." for s in
                                                                                 SAMPLE_TEXT.split(". ") if s.strip()]
    with record_routing(engine) as stats, progress("routing prompts", len(prompts)) as advance:
        for text in prompts:
            ids = engine.encode_prompt(text)[: engine.max_seq_len - cfg.profile.max_new_tokens - 1]
            engine.generate(ids, max_new_tokens=max(cfg.profile.max_new_tokens, 1), ignore_eos=True)
            stats.tokens += len(ids) + max(cfg.profile.max_new_tokens, 1) - 1  # the last token is not routed
            advance()
    stats.write(cfg.profile.out, engine.spec.arch, engine.spec.moe.top_k)
    reached = {k: int((v > 0).sum()) for k, v in stats.counts.items()}
    print(f"wrote routing statistics of {stats.tokens} tokens over {len(reached)} MoE layers to {cfg.profile.out}")
    print("experts reached per layer: " + ", ".join(f"{k}:{n}" for k, n in sorted(reached.items())), file=sys.stderr)
    return 0
