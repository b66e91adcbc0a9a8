"""Per-request sampling parameters and the logits processing that precedes sampling."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from kt_core.errors import KtError

if TYPE_CHECKING:  # torch loads where logits are processed, not where the values are checked (kt run's
    import torch  # bad generate.* values fail before it: 0.4 s instead of 2)

# Ranges every parameter is checked against before a request joins a batch (``validate``): inside
# them the float32 sampling math stays finite.
# 0 < temperature < TEMPERATURE_FLOOR samples greedily (the limit of T -> 0); logits / T overflow from ~1e-38 on
TEMPERATURE_FLOOR = 1e-5
TOP_K_MAX = 2**31 - 1  # a top_k at or above the vocabulary size keeps every token, as 0 does
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes (negative seeds wrap mod 2**64)


class SamplingError(KtError):
    """A sampling parameter outside what kt-core can sample with; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """What one request samples with. ``validate()`` checks every field against the ranges above
    (a ``SamplingError`` naming the field), so the decode step never sees a value it cannot take.

    - temperature: 0 = greedy; a positive temperature below ``TEMPERATURE_FLOOR`` (1e-5) is greedy too,
      the limit sampling approaches as T -> 0 (dividing logits by a denormal would overflow to inf/NaN).
    - top_k: 0 = off; at most ``TOP_K_MAX``; a value at or above the vocabulary size also keeps every token.
    - top_p in (0, 1] (1 = off), min_p in [0, 1] (0 = off).
    - repetition_penalty in [0.01, 100] (1 = off; HF semantics: divide positive logits, multiply negative).
    - seed: an integer in [-2**63, 2**64 - 1], or None for a random one.
    NaN and infinities are refused everywhere."""

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

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0, or below ``TEMPERATURE_FLOOR``)."""
        return self.temperature < TEMPERATURE_FLOOR

    def validate(self) -> "SamplingParams":
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise SamplingError(name, f"{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        for name in ("max_new_tokens", "top_k", "seed"):
            v = getattr(self, name)
            if not (v is None and name == "seed") and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise SamplingError(name, f"{name} must be an integer, got {v!r}")
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            ("temperature", self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            ("top_k", 0 <= self.top_k <= TOP_K_MAX,
             f"top_k must be in [0, {TOP_K_MAX}] (0, or any value >= the vocabulary size, keeps every token), "
             f"got {self.top_k}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("min_p", 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            ("repetition_penalty", REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX,
             f"repetition_penalty must be in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}] (1 = off), "
             f"got {self.repetition_penalty}"),
            ("seed", self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be in [-2**63, 2**64 - 1], got {self.seed}"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise SamplingError(name, msg)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        return self


def apply_repetition_penalty(logits: torch.Tensor, histories: list[list[int]], penalties: list[float]) -> torch.Tensor:
    """HF semantics: every token already seen (prompt or output) gets its logit divided by the
    penalty when positive, multiplied when negative."""
    import torch

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
        if reason is None and self.text:
            last = self.text[-1]
            for s in self.stops:  # the longest tail that begins s (a character compared before a slice)
                for k in range(min(len(s) - 1, stable), 0, -1):
                    if s[k - 1] == last and self.text.endswith(s[:k]):
                        stable = min(stable, len(self.text) - k)
                        break
        new = self.text[self.emitted:stable] if stable > self.emitted else ""
        self.emitted = max(self.emitted, stable)
        return new, reason

    def flush(self) -> str:
        """The text still held back (called once the sequence has ended)."""
        new, self.emitted = self.text[self.emitted:], len(self.text)
        return new
