"""Continuous batching over the paged KV cache.

Every ``step()`` runs one forward pass over:

- one new token for every running sequence that is decoding, and
- chunks of prompts still being prefilled, up to ``prefill_chunk`` prompt tokens per
  step, so a long prompt never stalls the running decodes for more than one chunk.

New requests join at the next step. A request is admitted only when the KV cache can
hold its worst case (prompt + max_new_tokens), so a running sequence never runs out of
blocks mid-generation; one that cannot be admitted waits in a bounded queue
(``QueueFull`` beyond ``max_queue``). Cancelled and timed-out requests free their
blocks at the next step. ``Engine.generate`` and the HTTP server both drive this class.

Failures stay with the request they belong to: an exception while admitting, sampling,
detokenizing or emitting for one request finishes that request alone (finish reason
``"error"``, the message in ``Request.error``) and the rest of the batch carries on. Only a
failure of the shared forward pass fails every request in that batch (``"error"`` too, in
``run()``); ``"abort"`` is kept for requests ended by shutdown or an interrupted generate.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kt_core.errors import KtError
from kt_core.runtime.sampling import SamplingParams, TextStream, apply_repetition_penalty


log = logging.getLogger(__name__)


class QueueFull(KtError):
    """The waiting queue is at server.max_queue."""


# sink(request, new token id or None, new text); called from the thread that runs step()
Sink = Callable[["Request", Optional[int], str], None]
_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Optional[Sink] = None
    timeout_s: Optional[float] = None
    id: int = field(default_factory=lambda: next(_ids))
    seq: int = -1  # its sequence in the KV cache once admitted
    # state, owned by the scheduler
    output: list[int] = field(default_factory=list)
    text: Optional[TextStream] = None
    finish_reason: Optional[str] = None  # "stop", "length", "cancelled", "timeout", "abort" (shutdown), "error"
    error: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    cache_salt: Optional[str] = None  # shares cached prefixes only with requests of the same salt (kvcache/prefix.py)
    computed: int = 0  # prompt tokens whose KV exists
    reserved_blocks: int = 0
    stop_ids: set = field(default_factory=set)  # token ids that end it (its own + eos unless ignore_eos)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    cancelled: bool = False
    generator: Optional[torch.Generator] = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 512) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise KtError(f"scheduler needs max_batch >= 1, max_queue >= 0, prefill_chunk >= 1 "
                          f"(got {max_batch}, {max_queue}, {prefill_chunk})")
        self.engine, self.cache = engine, engine.cache
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.cond = threading.Condition()
        self.draining = False
        self.drain_deadline: Optional[float] = None
        self.counters = {"requests": 0, "finished": 0, "prompt_tokens": 0, "generation_tokens": 0,
                         "cancelled": 0, "timeouts": 0, "rejected": 0, "errors": 0, "steps": 0}
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) of recent steps

    # ---- from any thread --------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        req.params.validate()
        eng = self.engine
        prompt = eng._check_ids(req.prompt)
        if len(prompt) + req.params.max_new_tokens > eng.max_seq_len:
            raise KtError(f"prompt of {len(prompt)} tokens + max_new_tokens={req.params.max_new_tokens} exceeds "
                          f"the context of {eng.max_seq_len}; shorten one or raise model.max_seq_len")
        req.prompt = prompt
        req.stop_ids = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else self.engine.eos_ids)
        req.reserved_blocks = math.ceil((len(prompt) + req.params.max_new_tokens) / self.cache.block_size)
        if req.reserved_blocks > self.cache.num_blocks:
            raise KtError(f"this request needs {req.reserved_blocks} KV blocks but the cache has "
                          f"{self.cache.num_blocks}; shorten it or raise plan.kv_tokens")
        if not req.params.greedy:
            req.generator = torch.Generator(device=eng.model.device)
            req.generator.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        if eng.tokenizer is not None:
            req.text = TextStream(eng.tokenizer, req.params.stop)
        with self.cond:
            if self.draining:
                raise QueueFull("the server is shutting down; retry against another instance")
            # cancelled requests leave the queue at the next step; they never hold a place in it
            waiting = sum(1 for r in self.waiting if not r.cancelled)
            if waiting >= self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{waiting} requests are already waiting (server.max_queue="
                                f"{self.max_queue}); retry later")
            self.waiting.append(req)
            self.counters["requests"] += 1
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client went away); its KV blocks are freed at the next step."""
        if not req.finished:
            req.cancelled = True
            with self.cond:
                self.cond.notify()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- from the thread that owns the engine -------------------------------------------
    def drain(self, grace_s: float) -> None:
        """Stop taking requests; what is queued or running gets ``grace_s`` seconds to finish
        (a later call can only shorten that: ``drain(0)`` ends them at the next loop turn)."""
        with self.cond:
            deadline = time.monotonic() + grace_s
            if not self.draining or deadline < self.drain_deadline:
                self.draining = True
                self.drain_deadline = deadline
                self.cond.notify()

    def run(self, stop: threading.Event) -> None:
        """Step while there is work; sleep (no spinning) while idle; return when ``stop`` is set.
        A step that raises (the shared forward pass failed) fails the requests of that batch with
        ``"error"``, not the loop and not the requests still waiting."""
        while not stop.is_set():
            if self.drain_deadline is not None and time.monotonic() > self.drain_deadline and self.has_work():
                self.abort_all("the server shut down before the request finished (server.shutdown_grace_s)")
            with self.cond:
                if not self.has_work():
                    self.cond.wait(0.25)
                    continue
            try:
                self.step()
            except Exception as exc:
                log.exception("a forward step failed; the %d requests in its batch fail", len(self.running))
                for r in list(self.running):
                    self._finish(r, "error", f"internal error in the forward step: {type(exc).__name__}: {exc}")
        self.abort_all("the server shut down")

    def abort_all(self, why: str) -> None:
        with self.cond:
            pending = list(self.waiting) + list(self.running)
            self.waiting.clear()
        for r in pending:
            self._finish(r, "abort", why)

    @torch.inference_mode()
    def step(self) -> bool:
        """One forward pass over the running batch; returns False when there was nothing to do."""
        self._reap()
        self._admit()
        if not self.running:
            return False
        entries, budget = [], self.prefill_chunk
        for r in self.running:
            if r.computed >= len(r.prompt):
                entries.append((r, [r.output[-1]], True))
        for r in self.running:
            left = len(r.prompt) - r.computed
            if left > 0 and budget > 0:
                n = self._chunk(r, min(left, budget))
                entries.append((r, r.prompt[r.computed:r.computed + n], r.computed + n == len(r.prompt)))
                budget -= n
        batch = self.cache.prepare([r.seq for r, _, _ in entries], [t for _, t, _ in entries])
        logits = self.engine.model.forward(batch, self.cache)
        now = time.perf_counter()
        self.counters["steps"] += 1
        sample_rows, sample_reqs = [], []
        for row, (r, toks, ready) in enumerate(entries):
            if r.computed < len(r.prompt):
                r.computed += len(toks)
            if ready:
                sample_rows.append(row)
                sample_reqs.append(r)
        if sample_rows:
            self._sample_and_emit(logits[sample_rows], sample_reqs, now)
        for r, _, _ in entries:
            if not r.finished:
                try:
                    self.cache.commit(r.seq, r.prompt + r.output)
                except Exception as exc:
                    self._fail(r, "offering its KV blocks to the prefix cache", exc)
        self._recent.append((now, len(sample_reqs)))
        return True

    def _chunk(self, r: Request, n: int) -> int:
        """Prompt tokens of ``r`` to prefill in this step: ``n``, or fewer so the step ends on a block
        boundary when the model's linear-attention state is snapshotted for the prefix cache (a
        state exists only where a step ends; the rest of the prompt follows in the next step)."""
        c = self.cache
        if c.states is None or c.prefix is None:
            return n
        aligned = (r.computed + n) // c.block_size * c.block_size
        return aligned - r.computed if r.computed < aligned < r.computed + n else n

    def _sample_and_emit(self, logits: torch.Tensor, reqs: list[Request], now: float) -> None:
        """Pick and emit each request's next token; a request whose sampling or emission raises
        finishes alone with ``"error"``. ``logits`` is this step's own copy (one row per request)."""
        next_ids = logits.argmax(dim=-1).tolist()  # the answer for greedy rows without a penalty
        for i, r in enumerate(reqs):
            try:
                p = r.params
                if not p.greedy or p.repetition_penalty != 1.0:
                    next_ids[i] = self._pick(logits[i:i + 1], r)
            except Exception as exc:
                self._fail(r, "sampling its next token", exc)
                continue
            if r.first_token_at is None:
                r.first_token_at = now
            try:
                self._emit(r, next_ids[i])
            except Exception as exc:
                self._fail(r, "emitting its next token", exc)

    def _pick(self, row: torch.Tensor, r: Request) -> int:
        """Next token for one request from its [1, vocab] logits row (changed in place)."""
        p = r.params
        if p.repetition_penalty != 1.0:
            row = apply_repetition_penalty(row, [r.prompt + r.output], [p.repetition_penalty])
        if p.greedy:
            return int(row.argmax(dim=-1)[0])
        dev = row.device
        top_k = p.top_k if p.top_k < row.shape[-1] else 0  # >= the vocabulary keeps every token
        one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt, device=dev)  # noqa: E731
        return int(self.engine.model.be.sample(row, one(p.temperature), one(top_k, torch.long), one(p.top_p),
                                               one(p.min_p), generator=r.generator)[0])

    def _fail(self, r: Request, what: str, exc: Exception) -> None:
        """Finish ``r`` alone after an exception raised for it; its batch carries on."""
        log.error("request %d failed while %s; the rest of the batch carries on", r.id, what,
                  exc_info=(type(exc), exc, exc.__traceback__))
        self._finish(r, "error", f"internal error while {what}: {type(exc).__name__}: {exc}")

    def _emit(self, r: Request, tok: int) -> None:
        if tok in r.stop_ids:
            self._finish(r, "stop")
            return
        r.output.append(tok)
        self.counters["generation_tokens"] += 1
        text, reason = r.text.push(r.output) if r.text is not None else ("", None)
        if r.sink is not None:
            r.sink(r, tok, text)
        if reason is not None:
            self._finish(r, reason)
        elif len(r.output) >= r.params.max_new_tokens:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str, error: Optional[str] = None) -> None:
        if r.finished:
            return
        r.finish_reason, r.error, r.finished_at = reason, error, time.perf_counter()
        if r in self.running:
            self.running.remove(r)
        try:
            self.cache.free(r.seq)
            self.counters["finished"] += 1
            if reason == "cancelled":
                self.counters["cancelled"] += 1
            elif reason == "timeout":
                self.counters["timeouts"] += 1
            elif reason == "error":
                self.counters["errors"] += 1
            if r.sink is not None:
                tail = r.text.flush() if r.text is not None and reason in ("length", "stop") else ""
                r.sink(r, None, tail)
        except Exception:  # a broken sink (its client's event loop gone) must not break the batch
            log.exception("while finishing request %d", r.id)
        finally:
            r.done.set()

    def _reap(self) -> None:
        """Finish cancelled and timed-out requests, waiting or running."""
        now = time.perf_counter()
        with self.cond:
            queued = list(self.waiting)
        for r in queued + list(self.running):
            if r.cancelled:
                reason, err = "cancelled", "the client cancelled the request"
            elif r.timeout_s is not None and now - r.created > r.timeout_s:
                reason, err = "timeout", f"the request ran past its timeout of {r.timeout_s:g} s"
            else:
                continue
            with self.cond:
                if r in self.waiting:
                    self.waiting.remove(r)
            self._finish(r, reason, err)

    def _outstanding(self) -> int:
        return sum(max(r.reserved_blocks - len(self.cache.seqs[r.seq].blocks), 0) if r.seq in self.cache.seqs
                   else r.reserved_blocks for r in self.running)

    def _admit(self) -> None:
        while len(self.running) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    return
                r = self.waiting[0]
                if self.cache.available_blocks - self._outstanding() < r.reserved_blocks:
                    return  # the head waits for blocks (first come, first served)
                self.waiting.popleft()
            r.seq = self.engine._new_seq()
            try:
                r.cached_tokens = r.computed = self.cache.attach_prefix(r.seq, r.prompt, r.cache_salt)
            except Exception as exc:  # e.g. the prefix cache's disk tier: this request fails, not the batch
                self._fail(r, "looking up its prompt in the prefix cache", exc)
                continue
            self.counters["prompt_tokens"] += len(r.prompt)
            if r.params.max_new_tokens == 0:
                self._finish(r, "length")
                continue
            self.running.append(r)

    # ---- numbers for /metrics -------------------------------------------------------------
    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
