"""kt merge: write a checkpoint with a LoRA adapter merged into its weights."""
from __future__ import annotations

import sys

HELP = "write a Hugging Face checkpoint with a LoRA adapter (PEFT format) merged into its weights"
USAGE = """kt merge model.path=DIR lora.path=ADAPTER out=DIR

  kt merge model.path=/models/Qwen3-30B-A3B lora.path=/runs/sft/adapter out=/models/Qwen3-30B-A3B-sft
  kt run model.path=/models/Qwen3-30B-A3B-sft        # the same answers as lora.path=..., no adapter to load

Every tensor is copied as stored (dtype, fp8 block scales, pack-quantized int4 alike) except the ones
the adapter adapts, which are written as W + s * B @ A in the checkpoint's float dtype (an adapted fp8
or int4 weight becomes bf16). config.json, the tokenizer and generation files are copied; the folder
appears whole (written beside, then renamed) or not at all."""

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
          "special_tokens_map.json", "chat_template.jinja", "tiktoken.model")
SHARD_BYTES = 4 << 30


def run(overrides, flags) -> int:
    import json
    import os
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from kt_core.config import compose
    from kt_core.errors import KtError
    from kt_core.progress import progress
    from kt_core.weights.checkpoint import Checkpoint
    from kt_core.weights.lora import Adapted, Adapter
    from kt_core.weights.paths import is_gguf

    outs = [o for o in overrides if o.startswith("out=")]
    cfg = compose([o for o in overrides if not o.startswith("out=")])
    if not outs or cfg.model.path is None or not cfg.lora.path:
        raise KtError("kt merge needs model.path=DIR lora.path=ADAPTER out=DIR")
    if is_gguf(cfg.model.path):
        raise KtError("kt merge writes safetensors from a Hugging Face folder; model.path is a GGUF file (run it "
                      "with lora.path=ADAPTER instead)")
    out = Path(outs[-1][4:]).expanduser()
    if out.exists() and any(out.iterdir()):
        raise KtError(f"out={out} is not empty; pick a new folder")
    ck = Checkpoint(cfg.model.path)
    merged = Adapted(ck, Adapter(cfg.lora.path))
    adapted = set(merged.pairs)
    packed = ck.packed_weights
    # an adapted weight is written as floats: its fp8 block scales or int4 parts are not copied
    dropped = {n + "_scale_inv" for n in adapted} | {n + s for n in adapted & packed for s in ("_packed", "_scale",
                                                                                            "_shape")}
    names = sorted((set(ck.keys()) - dropped) | adapted)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, files = 0, []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({k: fname for k in shard})
        shard, size = {}, 0

    with progress(f"merging {merged.adapter.path.name} into {ck.path.name}", len(names)) as advance:
        for name in names:
            if name in adapted:
                plain = name not in packed and not ck.is_fp8(name)
                key, original = ck.stored(name) if plain else (ck.stored(name + "_packed")[0][:-7], None)
                t = merged.get(name).to(original.dtype if plain else torch.bfloat16)
            else:
                key, t = ck.stored(name)
            shard[key] = t.contiguous()
            size += t.numel() * t.element_size()
            if size >= SHARD_BYTES:
                flush()
            advance()
        flush()
    n = len(files)
    renamed = {}
    for i, fname in enumerate(files, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / fname, tmp / final)
        renamed[fname] = final
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, indent=1),
        encoding="utf-8")
    for f in COPIED:
        if (ck.path / f).is_file():
            shutil.copy2(ck.path / f, tmp / f)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"wrote {out} ({len(adapted)} weights merged, {len(names)} tensors)", file=sys.stderr)
    return 0
