"""Shared by the verbs that load a model: check the config, build the Engine, sampling kwargs."""
from __future__ import annotations

import sys
from typing import Optional

from omegaconf import OmegaConf

REAL_MODEL = "/path/to/Qwen3-30B-A3B"


def default_model_notice(verb: str) -> str:
    return (f"kt {verb}: the default model is a synthetic Qwen3-MoE-shaped checkpoint with random weights; "
            f"its text is gibberish. Run a real model with: kt {verb} model.path={REAL_MODEL}")


def check_config(overrides, verb: Optional[str], generate: bool = True):
    """Compose and check every value that needs no weights (model.path, generate.*, the topology
    and its devices) before anything loads or the default model is built; say first when the
    default (random-weight) model will answer."""
    from kt_core.config import compose
    from kt_core.config.validate import check_generate, check_values, resolve_topology

    cfg = compose(overrides)
    if verb and cfg.model.path is None and cfg.model.hf_config is None:
        print(default_model_notice(verb), file=sys.stderr, flush=True)
    check_values(cfg)
    if generate:
        check_generate(cfg)
    resolve_topology(cfg, check_devices=True)
    return cfg


def load_engine(overrides, verb: str = "run", generate: bool = True, notice: bool = True):
    check_config(overrides, verb if notice else None, generate)  # before torch loads: a bad value fails fast
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
