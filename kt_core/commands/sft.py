"""kt sft: LoRA supervised fine-tuning; writes a PEFT adapter that kt run / serve and peft load."""
from __future__ import annotations

import sys

HELP = "fine-tune LoRA adapters on a JSON-lines dataset (supervised); writes a PEFT adapter folder"
USAGE = """kt sft [model.path=DIR] train.data=FILE.jsonl train.output=OUT [train.max_steps=N] [train.lr=X]
       [train.batch=N] [train.lora.r=16] [train.lora.alpha=32] [train.lora.dropout=0.05]
       [train.lora.targets=[q_proj,v_proj]] [topology=hybrid_1gpu] [quant=int4]

  kt sft model.path=/models/Qwen3-30B-A3B train.data=chat.jsonl train.output=/runs/qa train.max_steps=200
  kt run model.path=/models/Qwen3-30B-A3B lora.path=/runs/qa prompt="..."

Without model.path the embedded synthetic model of kt run trains (random weights: a smoke test of the
machinery, nothing downloaded); kt run lora.path=OUT then loads its adapter on it.

Each line of the data is {"messages": [..., {"role": "assistant", "content": ...}]} or alpaca's
{"instruction": ..., "input": ..., "output": ...}; the loss covers the answer's tokens. Prints a line
every train.log_every steps (loss, tokens/s, ETA) and JSON lines to <OUT>.metrics.jsonl; every
train.save_every steps a checkpoint <OUT>.ckpt (adapters, optimizer, data position, RNG), which
train.resume=true continues with the same loss curve.
Placement follows the topology group: attention, dense layers and the adapters on the attention
device (topology=hybrid_1gpu: the accelerator; cpu_only: the CPU), torch autograd through them; the
frozen routed experts (bf16, int8, int4, fp8: quant=... keeps them quantized, QLoRA) in host RAM on
the native CPU kernels forward and backward (with LoRA on them too: train.lora.targets=
[experts.gate_up_proj, experts.down_proj]). Ctrl+C saves the adapter so far and stops."""


def run(overrides, flags) -> int:
    return train_command(list(overrides), "sft")


def train_command(overrides: list[str], mode: str) -> int:
    """kt sft / kt dpo: compose (``train=dpo`` for DPO), load, train, write the adapter."""
    import json
    import time
    from pathlib import Path

    from kt_core.config import compose
    from kt_core.config.schema import choice
    from kt_core.config.validate import torch_dtype
    from kt_core.errors import KtError
    from kt_core.models.model import CausalLM, QuantPlan
    from kt_core.models.spec import parse_config
    from kt_core.train.lora_model import LoraModel
    from kt_core.train.sft import read_examples
    from kt_core.train.trainer import Trainer
    from kt_core.weights.checkpoint import open_checkpoint

    cfg = compose(([] if mode == "sft" else [f"train={mode}"]) + overrides)
    t = cfg.train
    if not t.data or not t.output:
        raise KtError(f"kt {mode} needs train.data=FILE.jsonl train.output=OUT (and model.path=DIR: without it the "
                      "embedded synthetic model trains, a smoke test of the machinery)")
    if cfg.model.path is None:  # as kt run: the embedded synthetic model (random weights), said first
        from kt_core.commands._engine import default_model_notice
        from kt_core.models.synthetic import default_checkpoint

        print(default_model_notice(mode), file=sys.stderr, flush=True)
        cfg.model.path = str(default_checkpoint())
    if mode == "dpo" and t.get("packing", False):
        raise KtError("train.packing applies to kt sft; kt dpo runs each preference pair on its own: drop it")
    if t.max_steps < 1 or t.batch < 1 or t.lr <= 0:
        raise KtError(f"train.max_steps={t.max_steps}, train.batch={t.batch} and train.lr={t.lr} must be positive")
    from kt_core.train.lora_model import check_output

    check_output(t.output, cfg.model.path)  # before hours of training, not at the save
    ck = open_checkpoint(cfg.model.path)
    spec = parse_config(ck.config)
    tokenizer = ck.tokenizer()
    if tokenizer is None or not tokenizer.chat_template:
        raise KtError(f"{cfg.model.path} has no tokenizer with a chat template, which kt sft formats examples with")
    if mode == "dpo":
        from kt_core.train.dpo import read_pairs

        examples = read_pairs(t.data, tokenizer, int(t.max_seq_len))
    else:
        examples = read_examples(t.data, tokenizer, int(t.max_seq_len))
    # the frozen base in any format the quant group names (QLoRA: quant=int4 keeps the experts int4)
    from kt_core.train.placement import place

    at = place(cfg, spec, native_experts=True)  # the topology group: attention on its device, experts in host RAM
    model = CausalLM.load(ck, spec, at.backend, torch_dtype(choice(cfg.model.dtype)),
                          QuantPlan.from_config(cfg.quant), placer=at.placer, homes=at.homes)
    import psutil

    from kt_core.train.placement import checkpointing

    tokens = int(t.max_seq_len) * (int(t.batch) if t.get("packing", False) else 1) * (2 if mode == "dpo" else 1)
    model.checkpoint_layers, why = checkpointing(t.checkpoint_layers, spec, tokens,
                                                 at.backend.device_type != "cpu", psutil.virtual_memory().available)
    lora = LoraModel(model, list(t.lora.targets), int(t.lora.r), float(t.lora.alpha),
                     init=Path(t.init).expanduser() if t.init else None, seed=int(t.seed),
                     dropout=float(t.lora.dropout))
    out = Path(t.output).expanduser()
    metrics = out.with_name(out.name + ".metrics.jsonl")
    start, tokens_seen = time.perf_counter(), [0]

    def on_step(step: int, loss: float, n_tok: int) -> None:
        tokens_seen[0] += n_tok
        elapsed = time.perf_counter() - start
        row = {"step": step + 1, "loss": loss, "tokens": tokens_seen[0], "seconds": elapsed}
        if mode == "dpo":  # the chosen-minus-rejected log-ratio margin of this step's pairs
            row["margin"] = sum(trainer.infos[-int(t.batch):]) / int(t.batch)
        with open(metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if (step + 1) % max(int(t.log_every), 1) == 0 or step + 1 == t.max_steps:
            eta = elapsed / (step + 1) * (t.max_steps - step - 1)
            print(f"step {step + 1}/{t.max_steps}  loss {loss:.4f}  {tokens_seen[0] / elapsed:.0f} tok/s  "
                  f"eta {eta:.0f} s", file=sys.stderr)

    on_experts = f" and {len(lora.experts)} on the routed experts (one an expert)" if lora.experts else ""
    print(f"training {len(lora.modules)} LoRA adapters{on_experts} (r={lora.r}) of {spec.arch} by {mode} on {len(examples)} "
          f"{'pairs' if mode == 'dpo' else 'examples'}; {at.where}; activation checkpointing {why}", file=sys.stderr)
    from kt_core.train.dpo import dpo_loss

    beta, smoothing = float(t.beta), float(t.label_smoothing)
    trainer = Trainer(lora, examples, float(t.lr), int(t.batch), int(t.seed),
                      (lambda pair: dpo_loss(lora, pair, beta, smoothing)) if mode == "dpo" else None,
                      packing=bool(t.get("packing", False)))
    ckpt = out.with_name(out.name + ".ckpt")
    if t.resume:
        from kt_core.runtime.folder_swap import current

        if current(ckpt) != ckpt:
            print(f"{ckpt}: the last save was cut between its renames; resuming from the checkpoint before it "
                  f"({current(ckpt)})", file=sys.stderr)
        if not (current(ckpt) / "state.json").is_file():
            raise KtError(f"train.resume=true but there is no checkpoint at {ckpt}; drop train.resume")
        trainer.load(ckpt)
        print(f"resuming at step {trainer.step} from {ckpt}", file=sys.stderr)
    elif metrics.exists():
        metrics.unlink()  # a fresh run starts its own metrics
    try:
        trainer.run(int(t.max_steps), on_step, int(t.save_every), ckpt)
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}: saving the adapter and {ckpt} (train.resume=true continues)",
              file=sys.stderr)
        trainer.save(ckpt)
        lora.save(out, str(cfg.model.path))
        return 130
    trainer.save(ckpt)
    lora.save(out, str(cfg.model.path))
    print(f"wrote {out}; use it with lora.path={out}", file=sys.stderr)
    return 0
