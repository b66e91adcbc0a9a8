"""Direct Preference Optimization of LoRA adapters (``kt dpo``), the frozen base as the reference.

Data (JSON lines): ``{"prompt": ..., "chosen": ..., "rejected": ...}``, the prompt a string (one user
turn) or a list of messages, each answer a string. With log-probabilities summed over an answer's
tokens (and its end of sequence), the policy the model with its adapters and the reference the same
model with them switched off (so no second copy of the model is held):

    z = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)       (eps: label smoothing)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kt_core.errors import KtError
from kt_core.train.data import chat_prompt, records
from kt_core.train.sft import Example
from kt_core.train.token_logprobs import answer_logprobs


@dataclass
class Pair:
    chosen: Example
    rejected: Example

    @property
    def tokens(self) -> list[int]:  # for the trainer's token counts
        return self.chosen.tokens + self.rejected.tokens


def _pair_fields(row) -> tuple[list[dict], str, str]:
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
        raise KtError("'chosen' and 'rejected' must be strings")
    prompt = row.get("prompt")
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                         and isinstance(m.get("content"), str) for m in msgs):
        raise KtError("'prompt' must be a string or a list of messages, each with a role and text content")
    return msgs, row["chosen"], row["rejected"]


def read_pairs(path, tokenizer, max_len: int) -> list[Pair]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    shape = "a JSON object with 'prompt', 'chosen' and 'rejected'"
    for where, (msgs, chosen, rejected) in records(path, "preference pairs", shape, _pair_fields):
        head = chat_prompt(tokenizer, msgs, where)
        pair = []
        for answer in (chosen, rejected):
            tokens = head + tokenizer.encode(answer, add_special_tokens=False) + eos
            if len(tokens) > max_len:
                raise KtError(f"{where}: {len(tokens)} tokens, over train.max_seq_len={max_len}")
            pair.append(Example(tokens, len(head)))
        out.append(Pair(*pair))
    if not out:
        raise KtError(f"{path} holds no preference pairs")
    return out


def answer_logp(model, ex: Example) -> torch.Tensor:
    """The sum of the answer tokens' log-probabilities."""
    return answer_logprobs(model, ex.tokens, ex.first_label).sum()


def dpo_loss(lora, pair: Pair, beta: float, smoothing: float = 0.0) -> tuple[torch.Tensor, float]:
    """The pair's DPO loss (differentiable through the adapters) and its reward margin z / beta."""
    with torch.no_grad(), lora.disabled():
        ref_c, ref_r = answer_logp(lora.model, pair.chosen), answer_logp(lora.model, pair.rejected)
    pi_c, pi_r = answer_logp(lora.model, pair.chosen), answer_logp(lora.model, pair.rejected)
    margin = (pi_c - ref_c) - (pi_r - ref_r)
    z = beta * margin
    loss = -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)
    return loss, float(margin.detach())
