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
from kt_core.runtime.sampling import SamplingParams
from kt_core.weights.checkpoint import Checkpoint, open_checkpoint
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
                 max_batch: int = 4, fingerprint: str = "") -> None:
        self.cfg, self.spec, self.model, self.tokenizer = cfg, spec, model, tokenizer
        self.max_seq_len = min(int(cfg.model.max_seq_len), spec.max_positions)
        self.block_size = 16
        self.max_batch = max(int(max_batch), 1)
        # the plan's KV budget: plan.kv_tokens, or the context times the batch it is sized for
        kv_tokens = cfg.plan.kv_tokens or self.max_seq_len * max(int(cfg.plan.batch), self.max_batch)
        blocks = max(math.ceil(int(kv_tokens) / self.block_size), 1)
        self.cache: PagedKVCache = model.new_cache(blocks, self.block_size)
        self.fingerprint = fingerprint
        eos = set(spec.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.prefix_cache = None
        self._next_seq = 0

    def enable_prefix_cache(self, host_bytes: int = 0, disk_dir=None, disk_bytes: int = 0):
        """Share the KV of common prompt prefixes (device blocks, then host RAM, then a disk folder)."""
        from kt_core.kvcache.prefix import PrefixCache

        if self.prefix_cache is None:
            q = self.cfg.quant
            fp = f"{self.fingerprint}|{self.cfg.model.dtype}|{q.experts}|{q.dense}|{q.get('head')}|" \
                 f"{q.group_size}|{q.symmetric}|{q.get('int8_group_size')}|{q.get('embed')}"
            self.prefix_cache = PrefixCache(self.cache, fp, host_bytes, disk_dir, disk_bytes)
        return self.prefix_cache

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
        ck = open_checkpoint(cfg.model.path, allow_bin=bool(cfg.model.allow_bin_weights))
        if cfg.get("lora") is not None and cfg.lora.path:  # a PEFT LoRA adapter, merged as weights are read
            from kt_core.weights.lora import Adapted, Adapter

            ck = Adapted(ck, Adapter(cfg.lora.path))
        spec = parse_config(ck.config)
        from kt_core.models.shapes import model_tensors
        from kt_core.placement.plan import make_plan

        tensors = (ck.plan_tensors(model_tensors(spec), ck.kept_groups(cfg.quant))  # a GGUF's kept sizes
                   if hasattr(ck, "plan_tensors") else None)
        plan = make_plan(spec, cfg, topo, check_devices=True, tensors=tensors)  # a plan that cannot fit fails before any read
        spec.eos_token_ids = tuple(dict.fromkeys(spec.eos_token_ids + ck.eos_ids()))
        qp = QuantPlan.from_config(cfg.quant)
        qp.prequant = open_prequant(cfg, ck, spec, qp)
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
        try:
            model = CausalLM.load(ck, spec, backend, dtype, qp, max_positions=n_pos, placer=placer,
                                  deferred_experts=deferred, homes=homes)
        finally:
            ck.close()
        model.plan = plan
        model.prequant = qp.prequant  # the kt quantize file the experts came from, if any
        tokenizer = ck.tokenizer()
        return cls(cfg, spec, model, tokenizer, max_batch=max_batch, fingerprint=ck.fingerprint())

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

    def _generate(self, prompts: list[list[int]], p: SamplingParams, on_token: Optional[TokenCallback]):
        from kt_core.runtime.scheduler import Request, Scheduler

        sched = Scheduler(self, max_batch=self.max_batch, max_queue=len(prompts),
                          prefill_chunk=int(self.cfg.plan.prefill_chunk))
        index: dict[int, int] = {}

        def sink(r: Request, tok: Optional[int], text: str) -> None:
            if on_token is not None and tok is not None:
                on_token(index[r.id], tok, text)

        t0 = time.perf_counter()
        reqs = []
        try:
            for i, ids in enumerate(prompts):
                reqs.append(sched.submit(Request(ids, p, sink)))
                index[reqs[-1].id] = i
            while sched.has_work():
                sched.step()
        finally:
            sched.abort_all("generation was interrupted")
        failed = [r for r in reqs if r.finish_reason == "error"]
        if failed:  # the scheduler fails one sequence alone; a direct caller still gets the error
            raise RuntimeError(f"generation failed: {failed[0].error}")
        firsts = [r.first_token_at for r in reqs if r.first_token_at is not None]
        ends = [r.finished_at for r in reqs if r.finished_at is not None]
        ttft = min(firsts) - t0 if firsts else 0.0
        decode_s = max(ends) - min(firsts) if firsts and ends else 0.0
        n_decode = sum(max(len(r.output) - 1, 0) for r in reqs)
        timing = {"total_s": time.perf_counter() - t0, "ttft_s": ttft, "decode_s": decode_s,
                  "prefill_tokens_per_s": sum(map(len, prompts)) / ttft if ttft else 0.0,
                  "decode_tokens_per_s": n_decode / decode_s if decode_s else 0.0}
        return [GenerationResult(r.text.text if r.text is not None else "", r.output, len(r.prompt),
                                 r.finish_reason if r.finish_reason in ("stop", "length") else "length", dict(timing))
                for r in reqs]

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


def open_prequant(cfg, ck: Checkpoint, spec: ModelSpec, qp: QuantPlan):
    """The `kt quantize` file for these quant settings: quant.prepacked, else the default file in
    the model folder when it exists. A stale or damaged one is refused (KtError), not misread."""
    from pathlib import Path

    from kt_core.weights.prequant import PrequantFile, default_path

    if qp.down_format is not qp.experts:  # kt quantize files hold one format for all three
        if cfg.quant.prepacked:
            raise KtError("quant.prepacked holds experts in one format; drop quant.experts_down to load it")
        return None
    if qp.experts is Quant.NONE or spec.moe is None:
        if cfg.quant.prepacked:
            raise KtError("quant.prepacked is set but quant.experts=none; pick the quant it was made with")
        return None
    given = cfg.quant.prepacked
    path = Path(given).expanduser() if given else default_path(ck.path, qp.experts.value, qp.group_of(qp.experts), qp.symmetric)
    if not path.is_file():
        if given:
            raise KtError(f"quant.prepacked={given} does not exist; create it with `kt quantize out={given}`")
        return None
    return PrequantFile(path, ck.fingerprint(), spec.arch, qp.experts.value, qp.group_of(qp.experts), qp.symmetric,
                        spec=spec)


def _quote(value: str) -> str:
    """Quote an override value so Hydra takes paths with spaces or special characters literally."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
