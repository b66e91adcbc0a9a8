"""kt serve: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import sys

HELP = "OpenAI-compatible HTTP server (continuous batching, prefix cache across KV / RAM / disk)"
USAGE = """kt serve [model.path=DIR] [server.port=8000] [server.host=127.0.0.1] [server.max_batch=16]
         [server.prefix_disk_gb=10] [topology=... quant=... other overrides]

  kt serve                                    # the embedded default model on 127.0.0.1:8000
  kt serve model.path=/models/Qwen3-30B-A3B topology=hybrid_1gpu server.port=9000
  KT_API_KEY=secret kt serve                  # then clients send 'Authorization: Bearer secret'

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream or not), /health,
/metrics (Prometheus). Point any OpenAI client at http://HOST:PORT/v1. Ctrl+C drains:
running requests get server.shutdown_grace_s seconds, then every open stream is ended."""


def build_state(overrides):
    """Load the engine for serving: KV cache sized for server.max_batch sequences, prefix cache on."""
    from kt_core.commands._engine import check_config
    from kt_core.runtime.engine import Engine
    from kt_core.server.app import ServerState

    overrides = list(overrides)
    cfg = check_config(overrides, "serve", generate=False)  # requests carry their own sampling values
    if not any(o.lstrip("+").startswith("plan.batch=") for o in overrides):
        overrides.append(f"plan.batch={int(cfg.server.max_batch)}")  # the plan checks the KV the server will use
    engine = Engine.from_pretrained(None, overrides=overrides, max_batch=int(cfg.server.max_batch))
    return ServerState.for_engine(engine, default_id=None if cfg.model.path else "default")


def run(overrides, flags) -> int:
    from kt_core.server.app import make_server

    state = build_state(overrides)
    s = state.cfg
    server = make_server(state, s.host, int(s.port), log_level="info" if "-v" in flags else "warning")
    key = "on (Bearer key from $%s)" % s.api_key_env if state.api_key else "off"
    print(f"kt serve: '{state.model_id}' on http://{s.host}:{s.port}/v1 (context {state.engine.max_seq_len}, "
          f"batch {s.max_batch}, KV {state.engine.cache.num_blocks} blocks, API key {key}); Ctrl+C stops",
          file=sys.stderr)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it drained on; the drain is done
        pass
    print("kt serve: stopped", file=sys.stderr)
    return 0
