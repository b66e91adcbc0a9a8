"""The OpenAPI document: the error answers the server really gives (OpenAI error body, 400 for
any invalid request, never FastAPI's 422), SSE for streaming answers, text/plain for /metrics."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from kt_core.runtime.sampling import SEED_MAX, SEED_MIN
from kt_core.server.protocol import ErrorResponse

_WHY = {
    400: "Invalid request: bad JSON, a field out of range (``param`` names it), a prompt too long for the context",
    401: "Missing or wrong API key (only when the server has one)",
    404: "Unknown model",
    408: "The request ran past server.request_timeout_s",
    429: "The waiting queue is full (server.max_queue); retry later",
    500: "Internal error while generating for this request",
    503: "The server is shutting down",
}


def errors(*codes: int) -> dict:
    """``responses=`` entries for these status codes, each with the OpenAI error body."""
    return {c: {"model": ErrorResponse, "description": _WHY[c]} for c in codes}


def generation_responses(model) -> dict:
    """``responses=`` of /v1/completions and /v1/chat/completions: JSON, or SSE with ``stream: true``."""
    # one server-sent event: its `data` line is a JSON chunk, an error object, or `[DONE]` last
    sse = {"schema": {"type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                      "description": "Server-sent events: one `data: {json chunk}` per piece of text, an error "
                                     "event `data: {\"error\": ...}` if the request fails after it started, then "
                                     "`data: [DONE]`"}}
    return {200: {"model": model, "description": "The completion (JSON), or with `stream: true` a stream of events",
                  "content": {"text/event-stream": sse}},
            **errors(400, 401, 404, 408, 429, 500, 503)}


def health_responses(model_id: str) -> dict:
    def json_example(example: dict) -> dict:
        return {"application/json": {"example": example}}

    return {200: {"description": "Serving", "content": json_example({"status": "ok", "model": model_id})},
            503: {"description": "Shutting down: new requests get 503 until the running ones end",
                  "content": json_example({"status": "shutting_down"})}}


METRICS_RESPONSES = {200: {"description": "Prometheus text format 0.0.4",
                           "content": {"text/plain": {"schema": {"type": "string"}}}},
                     **errors(401)}


def install(app: FastAPI, vocab_size: Optional[int] = None) -> None:
    """Replace ``app.openapi`` with one that drops FastAPI's validation answers (422 and its schemas):
    kt-core answers every invalid request with 400 and the OpenAI error body. With ``vocab_size``,
    token-id prompts are bounded by the served model's vocabulary."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    responses = op.get("responses", {})
                    responses.pop("422", None)
                    for code, resp in responses.items():  # errors are JSON, even from text/plain routes
                        content = resp.get("content", {})
                        if code.isdigit() and int(code) >= 400 and "application/json" not in content:
                            resp["content"] = {"application/json": next(iter(content.values()))} if content else {}
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for req in ("CompletionRequest", "ChatRequest"):  # FastAPI's document model makes bounds floats
                seed = schemas.get(req, {}).get("properties", {}).get("seed", {}).get("anyOf", [{}])[0]
                if seed.get("type") == "integer":
                    seed.update(minimum=SEED_MIN, maximum=SEED_MAX)
            if vocab_size:
                _bound_token_ids(schemas.get("CompletionRequest", {}).get("properties", {}).get("prompt"), vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _bound_token_ids(node, vocab_size: int) -> None:
    """Every integer item schema under ``node`` (the token-id forms of a prompt) gets maximum vocab - 1."""
    if isinstance(node, dict):
        if node.get("type") == "integer" and node.get("minimum") == 0:
            node["maximum"] = vocab_size - 1
        for v in node.values():
            _bound_token_ids(v, vocab_size)
    elif isinstance(node, list):
        for v in node:
            _bound_token_ids(v, vocab_size)
