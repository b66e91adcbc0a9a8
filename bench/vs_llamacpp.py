"""kt-core vs llama.cpp end to end, same checkpoint, same threads, one sitting.

    python bench/vs_llamacpp.py --model DIR --llama-bench PATH --gguf-dir DIR
        [--precisions bf16,8bit,4bit] [--threads 2] [--repeats 3] [--prompt-tokens 512] [--new-tokens 64]
        [--llama-perplexity PATH]   # adds llama.cpp's own KL divergence to its BF16

Each run is its own process (peak RSS is its own), kt-core and llama.cpp alternate, and the
summary takes medians. Precisions and what each side runs (GGUFs made by llama.cpp's own converter
and quantizer from the same safetensors, see ../shared/tools/llamacpp/README.md):

    bf16   kt-core: bf16                              llama.cpp: {stem}-bf16.gguf
    8bit   kt-core: quant=int8 quant.dense=int8       llama.cpp: {stem}-q8_0.gguf
    4bit   kt-core: quant=int4 quant.dense=int4       llama.cpp: {stem}-q4_0.gguf (and q4_k_m if present)
           (group 32; the lm_head follows quant.dense, where llama.cpp keeps output.weight at 6-8 bits)
    8bit-g32  as 8bit with quant.int8_group_size=32 (Q8_0's scale per 32 weights)
    8bit-q8   as 8bit-g32 with the token embedding in int8 too (quant.embed=int8): Q8_0's whole recipe
    4bit-d8   as 4bit with the experts' down projections in int8 g32 (quant.experts_down=int8)
    4bit-h8   as 4bit with the lm_head in int8 g32 (quant.head=int8)
    4bit-asym as 4bit with a zero point per group (quant.symmetric=false), as Q4_K's mins
    4bit-mix  4bit-asym with 4bit-d8's and 4bit-h8's int8 parts (Q4_K_M's kind of mix)
    gguf-KIND kt-core runs the GGUF file itself ({stem}-KIND.gguf, its quantization kept), llama.cpp the same file

Quality: the mean KL divergence of each engine's next-token distribution from its own bf16's, on
the same text and token windows for both (llama-perplexity's definition): the text is cut into
KL_CHUNKS windows of 512 tokens, each run alone, and positions 256..510 of each are scored.
kt-core tokenizes it with the model's tokenizer; llama.cpp's KL (with --llama-perplexity) is
llama-perplexity --kl-divergence over the same windows of each quantized GGUF against its BF16 GGUF.
Prints JSON lines (one per run, then one summary per engine and precision) and a table.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, median, peak_rss_mb, repo_on_path, set_threads  # noqa: E402

KT = {"bf16": ["model.dtype=bfloat16"],
      "8bit": ["model.dtype=bfloat16", "quant=int8", "quant.dense=int8"],
      "4bit": ["model.dtype=bfloat16", "quant=int4", "quant.dense=int4", "quant.group_size=32"]}
KT["8bit-g32"] = KT["8bit"] + ["quant.int8_group_size=32"]
KT["8bit-q8"] = KT["8bit-g32"] + ["quant.embed=int8"]  # Q8_0 files quantize token_embd too
KT["4bit-d8"] = KT["4bit"] + ["quant.experts_down=int8", "quant.int8_group_size=32"]  # Q4_K_M's kind of mix
KT["4bit-h8"] = KT["4bit"] + ["quant.head=int8", "quant.int8_group_size=32"]  # the lm_head at 8 bits
KT["4bit-asym"] = KT["4bit"] + ["quant.symmetric=false"]  # a zero point per group, as Q4_K's mins
KT["4bit-mix"] = KT["4bit-asym"] + ["quant.experts_down=int8", "quant.head=int8", "quant.int8_group_size=32"]
GGUF = {"bf16": ["bf16"], "8bit": ["q8_0"], "8bit-g32": ["q8_0"], "8bit-q8": ["q8_0"], "4bit": ["q4_0", "q4_k_m"], "4bit-d8": ["q4_k_m"],
        "4bit-h8": ["q4_k_m"], "4bit-asym": ["q4_0", "q4_k_m"], "4bit-mix": ["q4_0", "q4_k_m"]}


def kt_model(model: Path, precision: str, gguf_dir: Path, stem: str) -> tuple[Path, list[str]]:
    """What kt-core loads for a precision: the checkpoint with quant overrides, or a GGUF file."""
    if precision.startswith("gguf-"):
        return gguf_dir / f"{stem}-{precision[5:]}.gguf", ["model.dtype=bfloat16"]
    return model, KT[precision]


def gguf_kinds(precision: str) -> list[str]:
    return [precision[5:]] if precision.startswith("gguf-") else GGUF[precision]


KL_CHUNKS, KL_CTX = 2, 512


def kl_text(work: Path) -> Path:
    text = work / "text.txt"
    text.write_text(" ".join(f"word{i % 997} number {i}" for i in range(3000)), encoding="utf-8")
    return text


def prompt_ids(vocab: int, n: int) -> list[int]:
    return [(i * 7919) % (vocab - 200) + 100 for i in range(n)]


def kt_child(model: Path, precision: str, prompt_tokens: int, new_tokens: int, threads: int,
             logits_out: Path | None, gguf_dir: Path, stem: str) -> dict:
    import time

    repo_on_path()
    from kt_core.runtime.omp import shorten_idle_spin

    shorten_idle_spin()  # as `kt run` does, before torch loads
    set_threads(threads)
    import torch

    import kt_core

    t0 = time.perf_counter()
    path, overrides = kt_model(model, precision, gguf_dir, stem)
    engine = kt_core.Engine.from_pretrained(path, overrides=[*overrides, f"device.cpu.threads={threads}"])
    load_s = time.perf_counter() - t0
    ids = prompt_ids(engine.model.spec.vocab_size, prompt_tokens)
    engine.generate(ids[:16], max_new_tokens=4, ignore_eos=True)  # warm-up: first-use checks
    t = time.perf_counter()
    engine.generate(ids, max_new_tokens=1, ignore_eos=True)
    prefill_s = time.perf_counter() - t
    r = engine.generate(ids[:16], max_new_tokens=new_tokens + 1, ignore_eos=True)
    rec = {"engine": "kt-core", "precision": precision, "threads": threads, "load_s": round(load_s, 2),
           "prefill_tokens_per_s": prompt_tokens / prefill_s, "decode_tokens_per_s": r.timing["decode_tokens_per_s"],
           "peak_rss_mb": round(peak_rss_mb())}
    if logits_out is not None:  # log-probs of llama-perplexity's scored positions, for the KL column
        text = kl_text(logits_out.parent).read_text(encoding="utf-8")
        toks = engine.tokenizer.encode(text, add_special_tokens=False)[:KL_CHUNKS * KL_CTX]
        lp = [torch.log_softmax(engine.logits(toks[c * KL_CTX:(c + 1) * KL_CTX])[KL_CTX // 2:KL_CTX - 1].float(), -1)
              for c in range(KL_CHUNKS)]
        torch.save(torch.cat(lp), logits_out)
    return rec


def kl_from(ref: Path, other: Path) -> float:
    import torch

    p, q = torch.load(ref, weights_only=True), torch.load(other, weights_only=True)
    return float((p.exp() * (p - q)).sum(-1).mean())


def llama_bench(exe: str, gguf: Path, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """llama-bench's JSON for one file: pp (prefill) and tg (decode) tokens/s."""
    import psutil

    cmd = [exe, "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(new_tokens), "-r", "1",
           "-o", "json"]
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        try:
            proc.wait(timeout=0.2)
        except psutil.TimeoutExpired:
            pass
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"llama-bench failed on {gguf}: {err[-2000:]}")
    rows = json.loads(out)
    pp = next(r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
    tg = next(r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0)
    return {"prefill_tokens_per_s": pp["avg_ts"], "decode_tokens_per_s": tg["avg_ts"],
            "peak_rss_mb": round(peak / 2**20), "load_s": round(pp.get("t_load_ms", 0) / 1e3, 2) or None}


def llama_kl(exe: str, base: Path, gguf: Path, text: Path, threads: int, work: Path) -> float | None:
    """llama-perplexity's mean KLD of ``gguf`` from ``base`` on ``text`` (512-token chunks)."""
    logits = work / f"{base.stem}-{KL_CHUNKS}x{KL_CTX}.kld"
    if not logits.exists():
        subprocess.run([exe, "-m", str(base), "-f", str(text), "-t", str(threads), "-c", str(KL_CTX),
                        "--chunks", str(KL_CHUNKS), "--kl-divergence-base", str(logits)],
                       capture_output=True, text=True, check=True)
    r = subprocess.run([exe, "-m", str(gguf), "-t", str(threads), "-c", str(KL_CTX), "--chunks", str(KL_CHUNKS),
                        "--kl-divergence-base", str(logits), "--kl-divergence"], capture_output=True, text=True)
    m = re.search(r"Mean\s+KLD:\s+([-\d.eE+]+)", r.stdout + r.stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the safetensors checkpoint both engines run")
    ap.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-bench")
    ap.add_argument("--gguf-dir", type=Path, required=True, help="folder with {stem}-bf16/q8_0/q4_0[/q4_k_m].gguf")
    ap.add_argument("--gguf-stem", default=None, help="file name stem (default: the model folder's name)")
    ap.add_argument("--llama-perplexity", default=None, help="llama-perplexity, for llama.cpp's KL column")
    ap.add_argument("--precisions", default="bf16,8bit,4bit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("vs_llamacpp_work"), help="scratch folder for logits")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        precision, logits = a.child
        emit(kt_child(a.model, precision, a.prompt_tokens, a.new_tokens, a.threads,
                      Path(logits) if logits != "-" else None, a.gguf_dir, a.gguf_stem or a.model.name))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    stem = a.gguf_stem or a.model.name
    precisions = a.precisions.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(a.repeats):
        for prec in precisions:
            logits = a.work / f"kt-{stem}-{prec}.kl{KL_CHUNKS}.pt" if rep == 0 else None  # per model: never another's
            cmd = [sys.executable, __file__, "--child", prec, str(logits or "-"), "--model", str(a.model),
                   "--llama-bench", a.llama_bench, "--gguf-dir", str(a.gguf_dir), "--threads", str(a.threads),
                   "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens), "--gguf-stem", stem]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"kt-core {prec} failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            emit({**rec, "repeat": rep})
            runs.setdefault(("kt-core", prec), []).append(rec)
            for kind in gguf_kinds(prec):
                gguf = a.gguf_dir / f"{stem}-{kind}.gguf"
                if not gguf.exists():
                    continue
                rec = {"engine": "llama.cpp", "precision": f"{prec} ({kind.upper()})", "threads": a.threads,
                       **llama_bench(a.llama_bench, gguf, a.prompt_tokens, a.new_tokens, a.threads)}
                emit({**rec, "repeat": rep})
                runs.setdefault(("llama.cpp", rec["precision"]), []).append(rec)
    ref = a.work / f"kt-{stem}-bf16.kl{KL_CHUNKS}.pt"  # this model's bf16 log-probs, from this run or an earlier one
    if any(p != "bf16" for p in precisions) and not ref.exists():
        print(f"no kt-core KL: {ref} is missing; run once with bf16 in --precisions", file=sys.stderr)
    kl = {("kt-core", p): kl_from(ref, a.work / f"kt-{stem}-{p}.kl{KL_CHUNKS}.pt")
          for p in precisions if p != "bf16" and ref.exists()}
    if a.llama_perplexity:
        text = kl_text(a.work)
        base = a.gguf_dir / f"{stem}-bf16.gguf"
        by_file: dict[str, float | None] = {}  # one llama-perplexity run per GGUF
        for prec in precisions:
            for kind in gguf_kinds(prec):
                g = a.gguf_dir / f"{stem}-{kind}.gguf"
                if prec != "bf16" and g.exists() and base.exists():
                    if kind not in by_file:
                        by_file[kind] = llama_kl(a.llama_perplexity, base, g, text, a.threads, a.work)
                    kl[("llama.cpp", f"{prec} ({kind.upper()})")] = by_file[kind]
    summary = []
    for (engine, prec), rs in runs.items():
        s = {"engine": engine, "precision": prec, "summary": True, "runs": len(rs),
             **{k: median([r[k] for r in rs]) for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb")},
             "load_s": median([r["load_s"] for r in rs if r.get("load_s") is not None]),
             "kl_to_bf16": kl.get((engine, prec))}
        summary.append(s)
        emit(s)
    print(f"\n{'engine':10} {'precision':16} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12} "
          f"{'load s':>7} {'KL to bf16':>11}", file=sys.stderr)
    for s in summary:
        kl_txt = f"{s['kl_to_bf16']:.4g}" if s["kl_to_bf16"] is not None else "-"
        print(f"{s['engine']:10} {s['precision']:16} {s['prefill_tokens_per_s']:14.1f} {s['decode_tokens_per_s']:13.2f} "
              f"{s['peak_rss_mb']:12.0f} {s['load_s']:7.1f} {kl_txt:>11}", file=sys.stderr)


if __name__ == "__main__":
    main()
