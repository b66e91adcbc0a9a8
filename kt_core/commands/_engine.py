"""Shared by the verbs that load a model: build the Engine from overrides, sampling kwargs."""
from __future__ import annotations

from omegaconf import OmegaConf


def load_engine(overrides):
    from kt_core.runtime.engine import Engine

    return Engine.from_pretrained(None, overrides=overrides)


def sampling_kwargs(cfg) -> dict:
    g = cfg.generate
    return dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                min_p=g.min_p, repetition_penalty=g.repetition_penalty, seed=g.seed,
                stop=list(OmegaConf.to_container(g.stop)))


def stats_line(result) -> str:
    t = result.timing
    return (f"[{result.prompt_tokens} prompt + {len(result.token_ids)} new tokens, "
            f"prefill {t['prefill_tokens_per_s']:.1f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s, "
            f"finish: {result.finish_reason}]")
