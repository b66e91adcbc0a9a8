"""Supervised fine-tuning of LoRA adapters: data, loss on the assistant's tokens, the training loop.

Data (``kt_core.train.data``: JSON lines, JSON arrays, parquet / csv / arrow, saved datasets):
``{"messages": [{"role": ..., "content": ...}, ...]}`` (the last message is the assistant's answer),
ShareGPT's ``{"conversations": [{"from": ..., "value": ...}]}`` or alpaca's
``{"instruction": ..., "input": ..., "output": ...}``. The prompt is the model's chat template with
the generation prompt; the loss covers the answer's tokens and the end-of-sequence token only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kt_core.errors import KtError


@dataclass
class Example:
    tokens: list[int]
    first_label: int  # tokens[first_label:] are the answer (and end of sequence): the loss covers them


def read_examples(path, tokenizer, max_len: int) -> list[Example]:
    """The file's examples, tokenized; a malformed line fails naming the file and line, an example
    over ``max_len`` tokens fails naming it and the limit, an empty file says so."""
    from kt_core.train.data import chat_prompt, messages_of, records

    out = []
    shape = ("an object with 'messages' / ShareGPT's 'conversations' (ending with the assistant's answer) or "
             "alpaca's 'instruction' / 'output'")
    for where, messages in records(path, "examples", shape, messages_of):
        prompt = chat_prompt(tokenizer, messages[:-1], where)
        answer = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        tokens = prompt + answer + eos
        if len(tokens) > max_len:
            raise KtError(f"{where}: {len(tokens)} tokens, over train.max_seq_len={max_len}; "
                          "raise the limit or shorten the example")
        out.append(Example(tokens, len(prompt)))
    if not out:
        raise KtError(f"{path} holds no examples")
    return out


def loss_of(model, ex: Example) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer's tokens, and how many there are."""
    from kt_core.train.token_logprobs import answer_logprobs

    logp = answer_logprobs(model, ex.tokens, ex.first_label)
    return -logp.sum(), int(logp.numel())


def packed_loss_of(model, examples: list[Example]) -> tuple[torch.Tensor, int]:
    """``loss_of`` summed over ``examples`` run as one forward pass of several sequences (packing:
    each keeps its own positions and causal attention, nothing is padded or mixed across them)."""
    from kt_core.train.token_logprobs import answer_rows, token_logprobs

    lens = [len(ex.tokens) for ex in examples]
    cache = model.new_cache(sum(math.ceil(n / 16) for n in lens) + 1, 16)
    batch = cache.prepare(list(range(len(examples))), [ex.tokens for ex in examples], all_logits=True)
    rows, targets, at = [], [], 0
    for ex, n in zip(examples, lens):
        own = answer_rows(n, ex.first_label)
        rows.append(at + own)
        targets.append(torch.tensor(ex.tokens, dtype=torch.long)[own + 1])
        at += n
    rows, targets = torch.cat(rows), torch.cat(targets)
    with torch.enable_grad():
        h = model.forward_hidden(batch, cache)
        return -token_logprobs(model, h[rows.to(h.device)], targets).sum(), int(rows.numel())


def train(lora, examples: list[Example], steps: int, lr: float, batch: int = 1, seed: int = 0,
          on_step: Optional[Callable[[int, float, int], None]] = None) -> list[float]:
    """AdamW on the adapters for ``steps`` optimizer steps of ``batch`` examples each (see Trainer)."""
    from kt_core.train.trainer import Trainer

    return Trainer(lora, examples, lr, batch, seed).run(steps, on_step)
