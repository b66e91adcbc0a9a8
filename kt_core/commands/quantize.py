"""kt quantize: quantize a checkpoint's experts once and save them for fast reload."""
from __future__ import annotations

import sys

HELP = "quantize a model's experts once into a file that later loads skip quantizing from"
USAGE = """kt quantize model.path=DIR quant=int4|int8|w8a8|fp8 [quant.group_size=N] [out=FILE]

  kt quantize model.path=/models/Qwen3-30B-A3B quant=int4
  kt run model.path=/models/Qwen3-30B-A3B quant=int4         # now loads the saved experts

Writes <model folder>/kt-experts-<format>-g<group>-<sym|asym>.ktq (or out=FILE, then load it with
quant.prepacked=FILE). Its header names the format, version and the checkpoint's checksum: a file
made from another checkpoint or with other settings is refused, never misread."""


def run(overrides, flags) -> int:
    import time
    from pathlib import Path

    from kt_core.config import compose
    from kt_core.config.schema import choice
    from kt_core.config.validate import torch_dtype
    from kt_core.errors import KtError
    from kt_core.models.model import QuantPlan
    from kt_core.models.spec import parse_config
    from kt_core.weights.checkpoint import open_checkpoint
    from kt_core.weights.prequant import default_path, write_model
    from kt_core.weights.quant import Quant

    outs = [o for o in overrides if o.startswith("out=")]
    cfg = compose([o for o in overrides if not o.startswith("out=")])
    if cfg.model.path is None:
        from kt_core.models.synthetic import default_checkpoint

        cfg.model.path = str(default_checkpoint())
    qp = QuantPlan.from_config(cfg.quant)
    if qp.experts is Quant.NONE:
        raise KtError("kt quantize needs a quantized expert format: quant=int4, int8, w8a8 or fp8")
    if qp.down_format is not qp.experts:
        raise KtError("kt quantize writes one format for all of an expert's projections; drop quant.experts_down "
                      "(a load quantizes the down projections in their own format)")
    ck = open_checkpoint(cfg.model.path, allow_bin=bool(cfg.model.allow_bin_weights))
    spec = parse_config(ck.config)
    if spec.moe is None:
        raise KtError(f"{spec.arch} has no MoE experts to quantize")
    out = Path(outs[-1][4:]).expanduser() if outs else default_path(ck.path, qp.experts.value,
                                                                     qp.group_of(qp.experts), qp.symmetric)
    if not out.parent.is_dir():
        raise KtError(f"the folder of out={out} does not exist")
    if not os_writable(out.parent):
        raise KtError(f"cannot write to {out.parent}; pass out=FILE somewhere writable and load it with "
                      "quant.prepacked=FILE")
    start = time.perf_counter()
    path = write_model(ck, spec, qp, out, torch_dtype(choice(cfg.model.dtype)))
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**30:.2f} GiB, {time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if outs:
        print(f"load it with: quant={cfg.quant.name} quant.prepacked={path}", file=sys.stderr)
    return 0


def os_writable(folder) -> bool:
    import os

    return os.access(folder, os.W_OK)
