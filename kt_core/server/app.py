"""The OpenAI-compatible HTTP server: FastAPI routes over one ``Scheduler``.

The scheduler runs in its own thread (it owns the engine); HTTP handlers submit
requests and receive tokens through asyncio queues fed from that thread. A client
that goes away, streaming or not, queued or running, has its request cancelled
(its KV blocks freed) at the next step. On shutdown (Ctrl+C / SIGTERM, or
``KtServer.handle_exit``) the server keeps listening but answers new requests and
/health with 503, lets queued and running requests finish for
``server.shutdown_grace_s`` seconds, then ends the rest with an error event (every
open stream ends with a final event and ``[DONE]``), stops listening and exits; the
prefix cache is flushed to its disk tier last. A second Ctrl+C ends the requests at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kt_core.errors import KtError
from kt_core.runtime.sampling import SamplingError, SamplingParams
from kt_core.runtime.scheduler import QueueFull, Request, Scheduler
from kt_core.server import openapi
from kt_core.server.asgi import ApiKeyMiddleware, BodyLimitMiddleware, wait_for_disconnect
from kt_core.server.metrics import prometheus_text
from kt_core.server.protocol import (ChatCompletionResponse, ChatRequest, CompletionRequest, CompletionResponse,
                                     ModelCard, ModelList, error_body)

log = logging.getLogger("kt_core.serve")


class ServerState:
    def __init__(self, engine, server_cfg, model_id: str) -> None:
        self.engine, self.cfg, self.model_id = engine, server_cfg, model_id
        self.scheduler = Scheduler(engine, max_batch=int(server_cfg.max_batch), max_queue=int(server_cfg.max_queue),
                                   prefill_chunk=int(engine.cfg.plan.prefill_chunk))
        key = os.environ.get(server_cfg.api_key_env) if server_cfg.api_key_env else None
        self.api_key = key or None
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.created = int(time.time())

    @classmethod
    def for_engine(cls, engine, default_id: Optional[str] = None) -> "ServerState":
        """Serve ``engine`` under its config's ``server`` group (prefix cache tiers included)."""
        from pathlib import Path

        s = engine.cfg.server
        if s.prefix_cache:
            from kt_core.models.synthetic import cache_dir

            disk = Path(s.prefix_disk_dir).expanduser() if s.prefix_disk_dir else cache_dir() / "prefix-cache"
            engine.enable_prefix_cache(host_bytes=int(float(s.prefix_host_gb) * 2**30),
                                       disk_dir=disk if s.prefix_disk_gb > 0 else None,
                                       disk_bytes=int(float(s.prefix_disk_gb) * 2**30))
        # the name clients send: server.model_id, else ``default_id``, else the model folder's name
        return cls(engine, s, s.model_id or default_id or Path(str(engine.cfg.model.path)).name)

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.scheduler.run, args=(self.stop,), name="kt-scheduler",
                                           daemon=True)
            self.thread.start()

    def begin_shutdown(self) -> None:
        """Stop taking requests; running ones get ``shutdown_grace_s`` seconds to finish."""
        s = self.scheduler
        if not s.draining:
            log.info("shutting down: %d running, %d waiting; they get %.0f s to finish",
                     len(s.running), len(s.waiting), self.cfg.shutdown_grace_s)
        s.drain(float(self.cfg.shutdown_grace_s))

    def close(self) -> None:
        self.begin_shutdown()
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        pc = self.engine.prefix_cache
        if pc is not None and pc.disk is not None:
            n = pc.flush()
            log.info("prefix cache: %d blocks written to %s", n, pc.disk.folder)

    def metrics(self) -> str:
        return prometheus_text(self.scheduler, self.engine)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def body_limit(max_seq_len: int) -> int:
    """The largest request body taken: 1 MB plus 32 bytes a token of context (a prompt of that many
    tokens, as text JSON-escaped or as token ids, fits well inside)."""
    return (1 << 20) + 32 * int(max_seq_len)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="kt-core", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, limit=body_limit(state.engine.max_seq_len))
    app.add_middleware(ApiKeyMiddleware, get_key=lambda: state.api_key, env_name=state.cfg.api_key_env or "")
    engine = state.engine
    openapi.install(app, engine.model.spec.vocab_size)

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            msg, loc = f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", []
        else:
            msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid value')}"
        return JSONResponse(error_body(msg, param=".".join(loc) or None, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):  # 404 unknown path, 405 (with its Allow header) ...
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500
                                       else "server_error"), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_req, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.get("/health", responses=openapi.health_responses(state.model_id))
    async def health():
        if state.scheduler.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": state.model_id}

    @app.get("/metrics", response_class=PlainTextResponse, responses=openapi.METRICS_RESPONSES)
    async def metrics():
        return PlainTextResponse(state.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **openapi.errors(401)})
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", response_model=None,
             responses={200: {"model": ModelCard}, **openapi.errors(401, 404)})
    async def model(model_id: str):
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/completions", response_model=None, responses=openapi.generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: HttpRequest):
        _check_model(state, body.model)
        if body.logprobs is not None or body.echo or body.suffix:
            raise ApiError(400, "logprobs, echo and suffix are not supported by kt-core", param="logprobs")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (batched prompts are not supported)", param="prompt")
            prompt = prompt[0]
        ids = await asyncio.to_thread(_encode, engine, prompt, "prompt")  # off the event loop: other streams go on
        return await _respond(state, request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", response_model=None,
              responses=openapi.generation_responses(ChatCompletionResponse))
    async def chat(body: ChatRequest, request: HttpRequest):
        _check_model(state, body.model)
        if body.logprobs or body.tools:
            raise ApiError(400, "logprobs and tools are not supported by kt-core", param="logprobs")
        if engine.tokenizer is None or not engine.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        ids = await asyncio.to_thread(_encode, engine, [m.plain() for m in body.messages], "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _respond(state, request, body, ids, max_tokens, chat=True)

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "kt-core",
            "max_model_len": state.engine.max_seq_len}


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_id:
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate, escaped
        raise ApiError(404, f"the model '{shown}' does not exist on this server; it serves '{state.model_id}'",
                       param="model", code="model_not_found")


def _encode(engine, prompt, param: str) -> list[int]:
    try:
        return engine.encode_prompt(prompt)
    except KtError as exc:  # no tokenizer for a text prompt, a chat template that refuses the messages
        raise ApiError(400, str(exc), param=param) from None
    except (TypeError, ValueError, UnicodeError) as exc:  # what a tokenizer says of text it cannot take
        bad = _not_unicode(prompt)
        raise ApiError(400, f"the {param} {bad or f'could not be tokenized ({type(exc).__name__}: {exc})'}",
                       param=param) from None


def _not_unicode(value) -> str:
    """Why value's text is not valid Unicode (JSON's \\ud800 escapes parse to lone surrogates), or ''."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):  # chat messages (dicts of strings) or one text in a list
        texts = [v for m in value for v in (m.values() if isinstance(m, dict) else [m]) if isinstance(v, str)]
    else:
        texts = []
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds text that is not valid Unicode (a lone surrogate at character {exc.start}); send UTF-8 text"
    return ""


async def _respond(state: ServerState, http, body, ids: list[int], max_tokens: Optional[int], chat: bool):
    engine = state.engine
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(ids) >= engine.max_seq_len:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {engine.max_seq_len} "
                       "tokens and leaves no room to generate", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = engine.max_seq_len - len(ids)
    if len(ids) + max_tokens > engine.max_seq_len:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                       f"context of {engine.max_seq_len} tokens; lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    params = SamplingParams(max_tokens, body.temperature, body.top_k, body.top_p, body.min_p, body.repetition_penalty,
                            body.seed, tuple(body.stop_list()), (), body.ignore_eos)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(r: Request, tok: Optional[int], text: str) -> None:  # scheduler thread
        loop.call_soon_threadsafe(queue.put_nowait, (tok, text))

    req = Request(ids, params, sink, timeout_s=float(state.cfg.request_timeout_s), cache_salt=body.cache_salt)
    try:
        state.scheduler.submit(req)
    except QueueFull as exc:
        status = 503 if state.scheduler.draining else 429
        raise ApiError(status, str(exc), "server_error" if status == 503 else "rate_limit_error",
                       code="server_shutting_down" if status == 503 else "rate_limit_exceeded") from None
    except SamplingError as exc:  # pydantic checks the same ranges first; this is the engine's own check
        param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
        raise ApiError(400, str(exc), param=param, code="invalid_value") from None
    except KtError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:  # Starlette's StreamingResponse watches for the disconnect; _stream cancels on it
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(state, req, queue, rid, created, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    # not streaming: a watcher cancels the request as soon as the client hangs up, queued or running
    watcher = asyncio.create_task(wait_for_disconnect(http.receive, lambda: state.scheduler.cancel(req)))
    text = []
    try:
        while True:
            tok, piece = await queue.get()
            text.append(piece)
            if tok is None:
                break
    finally:
        watcher.cancel()
        if not req.finished:  # this handler was cancelled: the request must not run on for nobody
            state.scheduler.cancel(req)
    _raise_if_failed(req)
    choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
               "finish_reason": req.finish_reason, "logprobs": None} if chat
              else {"index": 0, "text": "".join(text), "finish_reason": req.finish_reason, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": state.model_id, "choices": [choice], "usage": _usage(req)}


# how a request that did not end with "stop" / "length" is reported: (HTTP status, error type, code)
FAILURES = {
    "timeout": (408, "timeout_error", "timeout"),
    "error": (500, "server_error", "internal_error"),  # failed alone, or its batch's forward pass failed
    "abort": (503, "server_error", "server_shutting_down"),  # only shutdown aborts requests in the server
    "cancelled": (499, "invalid_request_error", "cancelled"),  # the client hung up: nobody reads this
}


def _raise_if_failed(req: Request) -> None:
    if req.finish_reason in FAILURES:
        status, type_, code = FAILURES[req.finish_reason]
        raise ApiError(status, req.error or req.finish_reason, type_, code=code)


def _usage(req: Request) -> dict:
    n_prompt, n_out = len(req.prompt), len(req.output)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, req: Request, queue: asyncio.Queue, rid: str, created: int, chat: bool,
                  include_usage: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            c = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            c = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": [c]}

    try:
        if chat:
            yield _sse(chunk(None, role=True))
        while True:
            tok, piece = await queue.get()
            if piece:
                yield _sse(chunk(piece))
            if tok is None:
                break
        if req.finish_reason in ("stop", "length"):
            yield _sse(chunk(None if chat else "", req.finish_reason))
        else:  # timed out, failed or ended by shutdown: an error event, then the stream ends normally
            _, type_, code = FAILURES.get(req.finish_reason, FAILURES["error"])
            yield _sse(error_body(req.error or req.finish_reason, type_, code=code))
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": state.model_id, "choices": [],
                        "usage": _usage(req)})
        yield "data: [DONE]\n\n"
    finally:
        if not req.finished:  # the client went away mid-stream: free its KV blocks
            state.scheduler.cancel(req)


def make_server(state: ServerState, host: str, port: int, log_level: str = "info"):
    """A uvicorn server whose exit signal first drains the scheduler (see module doc)."""
    import uvicorn

    class KtServer(uvicorn.Server):
        """uvicorn stops listening the moment ``should_exit`` is set, so the first exit signal only
        starts the drain; ``should_exit`` follows once no request is queued or running (they
        finished, or the grace ran out and the scheduler ended them). Until then new requests and
        /health get 503. A second signal ends the requests at once and exits; a third Ctrl+C is
        uvicorn's force quit."""

        def handle_exit(self, sig, frame) -> None:  # from a signal handler, or any thread
            if self.should_exit:
                super().handle_exit(sig, frame)
            elif state.scheduler.draining:
                state.scheduler.drain(0)
                super().handle_exit(sig, frame)
            else:
                state.begin_shutdown()
                threading.Thread(target=self._exit_when_drained, args=(sig, frame), name="kt-drain",
                                 daemon=True).start()

        def _exit_when_drained(self, sig, frame) -> None:
            # the scheduler ends what is left at the grace deadline; the margin covers a step in flight
            give_up = time.monotonic() + float(state.cfg.shutdown_grace_s) + 30
            while state.scheduler.has_work() and not self.should_exit and time.monotonic() < give_up:
                time.sleep(0.05)
            if not self.should_exit:
                super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=float(state.cfg.shutdown_grace_s) + 15, access_log=False)
    return KtServer(config)
