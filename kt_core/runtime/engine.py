"""The public Python API: ``Engine.from_pretrained``, ``logits``, ``generate``.

    engine = kt_core.Engine.from_pretrained("/models/Qwen3-30B-A3B", overrides=["quant=int8"])
    engine.logits([1, 2, 3])                      # [3, vocab] float32 on CPU
    out = engine.generate("Hello", max_new_tokens=32)
    out.text, out.token_ids, out.timing
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from omegaconf import DictConfig

from kt_core.backend.registry import registry
from kt_core.config import compose
from kt_core.config.schema import choice
from kt_core.config.validate import resolve_topology, torch_dtype
from kt_core.errors import KtError
from kt_core.kvcache.paged import PagedKVCache
from kt_core.models.model import CausalLM, QuantPlan
from kt_core.models.spec import ModelSpec, parse_config
from kt_core.models.tokenizer import Tokenizer
from kt_core.runtime.sampling import SamplingParams, apply_repetition_penalty, find_stop
from kt_core.weights.checkpoint import Checkpoint
from kt_core.weights.quant import Quant

Prompt = Union[str, Sequence[int], Sequence[dict]]
TokenCallback = Callable[[int, int, str], None]  # (prompt index, token id, text delta)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos / stop string / stop token) or "length"
    timing: dict[str, float] = field(default_factory=dict)


def apply_visible_devices(cfg: DictConfig) -> None:
    """Write each device's ``visible`` ids into its plugin's env var before the device starts."""
    for name, d in cfg.device.items():
        if d.visible is None:
            continue
        st = registry().status(d.backend)
        env = getattr(st.cls, "visible_devices_env", None) if st.cls else None
        if env:
            os.environ[env] = str(d.visible)


def configure_cpu_threads(cfg: DictConfig) -> None:
    """device.cpu.threads (default: physical cores) split over device.cpu.count logical devices."""
    from kt_core.backend.cpuinfo import cpu_info

    n = cfg.device.cpu.threads or cpu_info().physical_cores
    if n < 1:
        raise KtError(f"device.cpu.threads={n} must be at least 1")
    logical = int(cfg.device.cpu.count or 1)
    if logical > n:
        raise KtError(f"device.cpu.count={logical} logical CPU devices need at least {logical} threads "
                      f"(device.cpu.threads={n})")
    cpu = registry().get("cpu")
    if hasattr(cpu, "set_threads"):
        cpu.set_threads(int(n), logical)


class Engine:
    def __init__(self, cfg: DictConfig, spec: ModelSpec, model: CausalLM, tokenizer: Optional[Tokenizer],
                 max_batch: int = 4) -> None:
        self.cfg, self.spec, self.model, self.tokenizer = cfg, spec, model, tokenizer
        self.max_seq_len = min(int(cfg.model.max_seq_len), spec.max_positions)
        self.block_size = 16
        blocks = math.ceil(self.max_seq_len / self.block_size) * max_batch
        self.cache: PagedKVCache = model.new_cache(blocks, self.block_size)
        self._next_seq = 0

    # ---- construction -----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, overrides: Sequence[str] = (), max_batch: int = 4) -> "Engine":
        """Load an HF-format folder (``None``: the embedded synthetic default) under a Hydra config."""
        overrides = list(overrides)
        if path is not None:
            overrides.append(f"model.path={_quote(str(path))}")
        cfg = compose(overrides)
        if cfg.model.path is None and cfg.model.hf_config is not None:
            raise KtError(f"model={cfg.model.name} is a config for kt plan only (no weights); point "
                          "model.path at the downloaded model folder to run it")
        if cfg.model.path is None:
            from kt_core.models.synthetic import default_checkpoint

            cfg.model.path = str(default_checkpoint())
        topo = resolve_topology(cfg, check_devices=True)
        apply_visible_devices(cfg)
        configure_cpu_threads(cfg)
        slot = topo.roles["attention"][0]
        backend = registry().get(slot.backend)
        ck = Checkpoint(cfg.model.path, allow_bin=bool(cfg.model.allow_bin_weights))
        spec = parse_config(ck.config)
        from kt_core.placement.plan import make_plan

        plan = make_plan(spec, cfg, topo, check_devices=True)  # a plan that cannot fit fails before any read
        spec.eos_token_ids = tuple(dict.fromkeys(spec.eos_token_ids + generation_eos(ck.path)))
        qp = QuantPlan(Quant(choice(cfg.quant.experts)), Quant(choice(cfg.quant.dense)),
                       int(cfg.quant.group_size), bool(cfg.quant.symmetric))
        dtype = torch_dtype(choice(cfg.model.dtype))
        n_pos = min(int(cfg.model.max_seq_len), spec.max_positions)
        expert_slots = topo.roles["experts"]

        def placer(layer: int):
            return [(registry().get(s.backend), s.index, plan.experts_of(s.label, layer)) for s in expert_slots]

        slots = {s.label: s for s in topo.used}
        for layer, label in plan.layer_attention.items():
            if plan.layer_dense[layer] != label:
                raise KtError(f"layer {layer} has its attention on {label} but its dense weights on "
                              f"{plan.layer_dense[layer]}; the executor keeps them together: give topology.attention "
                              "and topology.dense the same devices")

        def homes(layer: int):
            s = slots[plan.layer_attention[layer]]
            return registry().get(s.backend), s.index

        deferred = int(cfg.topology.deferred_experts)
        if deferred and spec.moe is not None and deferred >= spec.moe.top_k:
            raise KtError(f"topology.deferred_experts={deferred} must be below the model's top-k "
                          f"({spec.moe.top_k}): at least one route per token must finish in its own layer")
        model = CausalLM.load(ck, spec, backend, dtype, qp, max_positions=n_pos, placer=placer,
                              deferred_experts=deferred, homes=homes)
        model.plan = plan
        tokenizer = Tokenizer.from_dir(ck.path) if Tokenizer.present(ck.path) else None
        return cls(cfg, spec, model, tokenizer, max_batch=max_batch)

    # ---- one prefill --------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of every position for one sequence: [len, vocab] float32 on CPU."""
        ids = self._check_ids(list(token_ids))
        sid = self._new_seq()
        try:
            batch = self.cache.prepare([sid], [ids], all_logits=True)
            return self.model.forward(batch, self.cache).cpu()
        finally:
            self.cache.free(sid)

    # ---- generation -------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._need_tokenizer().encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            tok = self._need_tokenizer()
            return tok.encode(tok.apply_chat_template(list(prompt), add_generation_prompt=True),
                              add_special_tokens=False)
        return list(prompt)

    def generate(self, prompt: Union[Prompt, list[Prompt]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: Optional[int] = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False, on_token: Optional[TokenCallback] = None):
        """Generate for one prompt (str, token ids or chat messages) or a list of them.

        Returns a ``GenerationResult`` (a list of them for a list of prompts). ``on_token``
        is called for every new token with (prompt index, token id, new text)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                                tuple(stop), tuple(stop_token_ids), ignore_eos).validate()
        single = not (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list, tuple)))
        prompts = [prompt] if single else list(prompt)
        results = self._generate([self._check_ids(self.encode_prompt(p)) for p in prompts], params, on_token)
        return results[0] if single else results

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], p: SamplingParams, on_token: Optional[TokenCallback]):
        be, dev = self.model.be, self.model.device
        eos = set() if p.ignore_eos else set(self.spec.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer and self.tokenizer.eos_token_id is not None else set())
        stop_ids = set(p.stop_token_ids) | eos
        for ids in prompts:
            if len(ids) + p.max_new_tokens > self.max_seq_len:
                raise KtError(f"prompt of {len(ids)} tokens + max_new_tokens={p.max_new_tokens} exceeds the "
                              f"context of {self.max_seq_len}; shorten one or raise model.max_seq_len")
        gen = torch.Generator(device=dev)
        gen.manual_seed(p.seed if p.seed is not None else torch.seed())
        n = len(prompts)
        out: list[list[int]] = [[] for _ in range(n)]
        texts, emitted = [""] * n, [0] * n
        finish: list[Optional[str]] = [None] * n
        seqs = [self._new_seq() for _ in range(n)]
        t0 = time.perf_counter()
        ttft = decode_s = 0.0
        try:
            active = list(range(n))
            step_tokens = [prompts[i] for i in active]
            if p.max_new_tokens == 0:
                active = []
            while active:
                batch = self.cache.prepare([seqs[i] for i in active], step_tokens)
                t_step = time.perf_counter()
                logits = self.model.forward(batch, self.cache)
                if not ttft:
                    ttft = time.perf_counter() - t0
                else:
                    decode_s += time.perf_counter() - t_step
                logits = apply_repetition_penalty(logits, [prompts[i] + out[i] for i in active],
                                                  [p.repetition_penalty] * len(active))
                rows = len(active)
                next_ids = be.sample(logits, torch.full((rows,), p.temperature, device=dev),
                                     torch.full((rows,), p.top_k, device=dev, dtype=torch.long),
                                     torch.full((rows,), p.top_p, device=dev), torch.full((rows,), p.min_p, device=dev),
                                     generator=gen).tolist()
                still = []
                for i, tok in zip(active, next_ids):
                    if tok in stop_ids:
                        finish[i] = "stop"
                        continue
                    out[i].append(tok)
                    if self.tokenizer is not None:
                        finish[i] = self._update_text(i, out[i], texts, emitted, p, tok, on_token) or finish[i]
                    elif on_token:
                        on_token(i, tok, "")
                    if finish[i] is None and len(out[i]) >= p.max_new_tokens:
                        finish[i] = "length"
                    if finish[i] is None:
                        still.append(i)
                active = still
                step_tokens = [[out[i][-1]] for i in active]
        finally:
            for s in seqs:
                self.cache.free(s)
        total = time.perf_counter() - t0
        n_decode = sum(max(len(o) - 1, 0) for o in out)
        timing = {"total_s": total, "ttft_s": ttft, "decode_s": decode_s,
                  "prefill_tokens_per_s": sum(map(len, prompts)) / ttft if ttft else 0.0,
                  "decode_tokens_per_s": n_decode / decode_s if decode_s else 0.0}
        return [GenerationResult(texts[i] if self.tokenizer else "", out[i], len(prompts[i]),
                                 finish[i] or "length", dict(timing)) for i in range(n)]

    def _update_text(self, i, ids, texts, emitted, p: SamplingParams, tok, on_token) -> Optional[str]:
        """Detokenize incrementally, apply stop strings, stream the stable new text."""
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = None
        cut = find_stop(full, p.stop, len(texts[i]))
        if cut is not None:
            full, reason = full[:cut], "stop"
        texts[i] = full
        # hold back a trailing partial UTF-8 character and any prefix of a stop string
        stable = len(full) if reason else len(full.rstrip("\ufffd"))
        if not reason:
            for s in p.stop:
                for k in range(min(len(s) - 1, stable), 0, -1):
                    if full[:stable].endswith(s[:k]):
                        stable -= k
                        break
        if on_token and stable > emitted[i]:
            on_token(i, tok, full[emitted[i]:stable])
            emitted[i] = stable
        elif on_token and reason is None:
            on_token(i, tok, "")
        return reason

    # ---- helpers ------------------------------------------------------------------
    def _new_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise KtError(f"{self.cfg.model.path} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise KtError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= int(t) < self.spec.vocab_size]
        if bad:
            raise KtError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
        if len(ids) > self.max_seq_len:
            raise KtError(f"prompt of {len(ids)} tokens is longer than the context of {self.max_seq_len}")
        return [int(t) for t in ids]


def generation_eos(path) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json (what transformers' generate stops on)."""
    from pathlib import Path

    from kt_core.weights.checkpoint import read_json

    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return ()
    eos = read_json(f, "generation_config.json").get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _quote(value: str) -> str:
    """Quote an override value so Hydra takes paths with spaces or special characters literally."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
