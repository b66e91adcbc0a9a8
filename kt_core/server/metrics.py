"""/metrics: the scheduler's and the KV cache's numbers in the Prometheus text format (0.0.4)."""
from __future__ import annotations


def prometheus_text(scheduler, engine) -> str:
    s, c = scheduler, engine.cache
    pc = engine.prefix_cache
    rows = [
        ("kt_queue_depth", "gauge", "Requests waiting for a batch slot.", len(s.waiting)),
        ("kt_running_requests", "gauge", "Requests in the running batch.", len(s.running)),
        ("kt_generation_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
         round(s.tokens_per_s(), 3)),
        ("kt_kv_blocks_used", "gauge", "KV blocks referenced by running requests.", c.used_blocks),
        ("kt_kv_blocks_cached", "gauge", "Idle KV blocks holding cached prefixes.", pc.idle_count if pc else 0),
        ("kt_kv_blocks_total", "gauge", "KV blocks in the cache.", c.num_blocks),
        ("kt_prefix_cache_hit_rate", "gauge", "Prompt blocks served from the prefix cache / blocks looked up.",
         round(pc.hit_rate(), 4) if pc else 0.0),
    ]
    for key, help_ in (("requests", "Requests accepted."), ("finished", "Requests finished."),
                       ("rejected", "Requests refused because the queue was full."),
                       ("cancelled", "Requests cancelled by their client."),
                       ("timeouts", "Requests that ran past server.request_timeout_s."),
                       ("errors", "Requests that failed with an internal error."),
                       ("prompt_tokens", "Prompt tokens admitted."),
                       ("generation_tokens", "Tokens generated."), ("steps", "Forward steps run.")):
        rows.append((f"kt_{key}_total", "counter", help_, s.counters[key]))
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    if pc is not None:
        out += ["# HELP kt_prefix_cache_hits_total Prompt blocks served from each prefix-cache tier.",
                "# TYPE kt_prefix_cache_hits_total counter"]
        out += [f'kt_prefix_cache_hits_total{{tier="{t}"}} {pc.stats[t]}' for t in ("device", "host", "disk")]
        out += ["# HELP kt_prefix_cache_queries_total Prompt blocks looked up.",
                "# TYPE kt_prefix_cache_queries_total counter",
                f"kt_prefix_cache_queries_total {pc.stats['queries']}"]
    return "\n".join(out) + "\n"
