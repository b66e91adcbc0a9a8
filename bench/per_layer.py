"""Decode time per decoder layer, kt-core vs llama.cpp, on models of small layers (issue 11, item 3).

    python bench/per_layer.py --llama-bench PATH [--converter convert_hf_to_gguf.py] [--work DIR]
        [--layers 8,48] [--repeats 5] [--threads 2]

Two synthetic Qwen3-MoE checkpoints that differ only in their number of layers (hidden 256, 4 query /
2 KV heads of 64, 8 experts top-2 of width 128, the real 151,936-token vocabulary), each also as a
BF16 GGUF made by llama.cpp's own converter. Each engine's time per layer is the difference of its
decode step times on the two models divided by the difference of their layers: the head, sampling
and the step's fixed costs cancel. kt-core runs twice, with the whole-layer native decode call
(native_layer.py) and without it (KT_FUSED_DECODE=0, one op at a time), so the change is measured in
the same sitting. Every run is its own process, all alternate, the summary takes medians.
Prints JSON lines and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median, repo_on_path  # noqa: E402
from vs_llamacpp import llama_bench  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, tie_word_embeddings=False)


def models(work: Path, layers: list[int], converter: str | None) -> dict[int, tuple[Path, Path]]:
    """{layers: (checkpoint, bf16 gguf)}, made once in work/."""
    repo_on_path()
    from kt_core.models.synthetic import synthesize

    out = {}
    for n in layers:
        ck, gguf = work / f"tiny{n}", work / f"tiny{n}-bf16.gguf"
        if not (ck / "config.json").exists():
            synthesize(ck, arch="qwen3_moe", layers=n, shape=SHAPE, sample_tokens=128)
        if not gguf.exists():
            if not converter:
                raise SystemExit(f"{gguf} is missing: pass --converter (llama.cpp's convert_hf_to_gguf.py)")
            subprocess.run([sys.executable, converter, str(ck), "--outtype", "bf16", "--outfile", str(gguf)],
                           check=True, capture_output=True)
        out[n] = (ck, gguf)
    return out


def kt_run(model: Path, fused: bool, a) -> dict:
    env = {**os.environ, "KT_FUSED_DECODE": "1" if fused else "0"}
    cmd = [sys.executable, str(Path(__file__).with_name("vs_llamacpp.py")), "--child", "bf16", "-", "--model",
           str(model), "--llama-bench", a.llama_bench, "--gguf-dir", str(a.work), "--threads", str(a.threads),
           "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"kt-core on {model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py (to make the GGUFs once)")
    ap.add_argument("--work", type=Path, default=Path("per_layer_work"))
    ap.add_argument("--layers", default="8,48")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    layers = sorted(int(x) for x in a.layers.split(","))
    if len(layers) != 2:
        raise SystemExit("--layers takes two layer counts, e.g. 8,48")
    made = models(a.work, layers, a.converter)
    engines = ("kt-core fused", "kt-core per-op", "llama.cpp")
    steps: dict[tuple[str, int], list[float]] = {}
    for rep in range(a.repeats):
        for n in layers:
            ck, gguf = made[n]
            for engine in engines:
                if engine == "llama.cpp":
                    tps = llama_bench(a.llama_bench, gguf, a.prompt_tokens, a.new_tokens, a.threads)["decode_tokens_per_s"]
                else:
                    tps = kt_run(ck, engine.endswith("fused"), a)["decode_tokens_per_s"]
                emit({"engine": engine, "layers": n, "repeat": rep, "decode_tokens_per_s": tps, "step_ms": 1e3 / tps})
                steps.setdefault((engine, n), []).append(1e3 / tps)
    lo, hi = layers
    per = {e: (median(steps[(e, hi)]) - median(steps[(e, lo)])) / (hi - lo) * 1e3 for e in engines}
    for engine in engines:
        emit({"engine": engine, "summary": True, f"step_ms_{lo}": median(steps[(engine, lo)]),
              f"step_ms_{hi}": median(steps[(engine, hi)]), "us_per_layer": per[engine],
              "vs_llama_cpp": per[engine] / per["llama.cpp"]})
    print(f"\n{'engine':16} {f'step ms ({lo} layers)':>20} {f'step ms ({hi} layers)':>20} {'us / layer':>11} "
          f"{'x llama.cpp':>12}", file=sys.stderr)
    for engine in engines:
        s_lo, s_hi = median(steps[(engine, lo)]), median(steps[(engine, hi)])
        print(f"{engine:16} {s_lo:20.2f} {s_hi:20.2f} {per[engine]:11.1f} {per[engine] / per['llama.cpp']:12.2f}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
