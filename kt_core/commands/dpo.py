"""kt dpo: Direct Preference Optimization of LoRA adapters; writes a PEFT adapter folder."""
from __future__ import annotations

HELP = "preference-tune LoRA adapters by DPO on prompt / chosen / rejected pairs; writes a PEFT adapter"
USAGE = """kt dpo [model.path=DIR] train.data=PAIRS.jsonl train.output=OUT [train.beta=0.1]
       [train.label_smoothing=0] [train.max_steps=N] [train.lr=X] [train.lora.r=16] [train.init=SFT_ADAPTER]

  kt dpo model.path=/models/Qwen3-30B-A3B train.data=prefs.jsonl train.output=/runs/dpo train.init=/runs/sft

Each line is {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}. The reference is the
model with its adapters switched off (no second copy is held): the base model, also when train.init
starts the adapters from an earlier run's. Metrics add each step's reward margin; checkpoints and
train.resume work as in kt sft."""


def run(overrides, flags) -> int:
    from kt_core.commands.sft import train_command

    return train_command(list(overrides), "dpo")
