"""Per-request sampling parameters and the logits processing that precedes sampling."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from kt_core.errors import KtError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (HF semantics: divide positive logits, multiply negative)
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise KtError(msg)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        return self


def apply_repetition_penalty(logits: torch.Tensor, histories: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """HF semantics: every token already seen (prompt or output) gets its logit divided by the
    penalty when positive, multiplied when negative."""
    for row, (seen, pen) in enumerate(zip(histories, penalties)):
        if pen == 1.0 or not seen:
            continue
        ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
        vals = logits[row, ids]
        logits[row, ids] = torch.where(vals > 0, vals / pen, vals * pen)
    return logits


def find_stop(text: str, stops: Sequence[str], search_from: int) -> Optional[int]:
    """Index where the earliest stop string starts, looking only at text that could be new."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class TextStream:
    """Incremental detokenization with stop strings.

    Decodes only a short window of recent tokens each step (the window's start stays a
    few tokens back so tokenizers that merge or strip spaces decode consistently), holds
    back a trailing partial UTF-8 character and any tail that could begin a stop string,
    and cuts the text where a stop string starts."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.text = ""  # everything decoded so far (cut at a stop string once one is seen)
        self.emitted = 0  # characters of ``text`` already handed out
        self._prefix = self._read = 0  # token offsets of the decode window

    def push(self, ids: list[int]) -> tuple[str, Optional[str]]:
        """``ids``: every output token so far. Returns (new stable text, "stop" or None)."""
        dec = lambda a, b=None: self.tok.decode(ids[a:b], skip_special_tokens=True)  # noqa: E731
        before = dec(self._prefix, self._read)
        now = dec(self._prefix)
        reason = None
        if len(now) > len(before) and not now.endswith("\ufffd"):
            searched = len(self.text)
            self.text += now[len(before):]
            self._prefix, self._read = max(self._read - 4, 0), len(ids)
            cut = find_stop(self.text, self.stops, searched)
            if cut is not None:
                self.text, reason = self.text[:cut], "stop"
        stable = len(self.text)
        if reason is None:
            for s in self.stops:
                for k in range(min(len(s) - 1, stable), 0, -1):
                    if self.text.endswith(s[:k]):
                        stable = min(stable, len(self.text) - k)
                        break
        new = self.text[self.emitted:stable] if stable > self.emitted else ""
        self.emitted = max(self.emitted, stable)
        return new, reason

    def flush(self) -> str:
        """The text still held back (called once the sequence has ended)."""
        new, self.emitted = self.text[self.emitted:], len(self.text)
        return new
