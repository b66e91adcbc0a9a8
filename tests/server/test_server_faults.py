"""Faults against a live server: extreme parameters, a request that fails mid-batch, clients that hang
up on non-streaming requests, shutdown while requests run, and what /openapi.json promises."""
import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.faults import fault_on_temperature
from tests.server.live import Live, slow_steps

pytest.importorskip("openai")

NAN, INF = float("nan"), float("inf")


def _post(srv, body, path="/v1/completions", **kw):
    return httpx.post(srv.url + path, content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json", **srv.headers()}, **kw)


@pytest.mark.parametrize("extra,param", [
    ({"repetition_penalty": 1.3e-87, "temperature": 1.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e3}, "repetition_penalty"),
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"temperature": NAN}, "temperature"),
    ({"top_p": NAN}, "top_p"),
    ({"min_p": INF}, "min_p"),
    ({"presence_penalty": NAN}, "presence_penalty"),
    # fields kt-core does not honour: refused when set, not served as if they had acted
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"top_k": True}, "top_k"),  # integers are strict too: a boolean is not 1
    ({"seed": True}, "seed"),
    ({"max_tokens": True}, "max_tokens"),
    ({"stop": ["x" * 1025]}, "stop"),
])
def test_parameters_the_sampler_cannot_take_get_400_naming_the_field(live, extra, param):
    for path, base in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = _post(live, {"model": "tiny", "max_tokens": 4, **base, **extra}, path)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == "invalid_value"


@pytest.mark.parametrize("extra", [{"temperature": 1e-45}, {"seed": 2**64 - 1}, {"seed": -(2**63)},
                                   {"top_k": 2**31 - 1, "temperature": 0.7}, {"repetition_penalty": 0.01},
                                   {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                                    "response_format": {"type": "text"}, "tool_choice": "none",
                                    "stop": ["y" * 1024]}])
def test_extreme_values_inside_the_ranges_are_served(live, extra):
    r = _post(live, {"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_a_request_that_fails_fails_alone_and_its_neighbour_streams_on(live, monkeypatch):
    """A per-request failure in the shared decode step (injected at temperature 1.25) and an extreme
    parameter sent beside a running stream: the stream completes normally; the failing requests get
    500 / an error event with code internal_error, never server_shutting_down."""
    fault_on_temperature(monkeypatch, live.state.engine, 1.25)
    before = live.metrics()
    with slow_steps(live, 0.03):
        with httpx.stream("POST", live.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "neighbour", "max_tokens": 80, "stream": True, "ignore_eos": True}) as nb:
            lines = nb.iter_lines()
            assert next(lines).startswith("data:")  # the neighbour is decoding
            bad = _post(live, {"model": "tiny", "prompt": "bad", "max_tokens": 5, "temperature": 1.25})
            with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60, json={
                    "model": "tiny", "messages": [{"role": "user", "content": "bad"}], "max_tokens": 5,
                    "temperature": 1.25, "stream": True}) as bs:
                bad_lines = [line for line in bs.iter_lines() if line.startswith("data:")]
            extreme = _post(live, {"model": "tiny", "prompt": "x", "max_tokens": 5, "temperature": 1.0,
                                   "repetition_penalty": 1.3e-87})
            assert live.metrics()["kt_running_requests"] == 1, "the neighbour should still be running"
            tail = [line for line in lines if line.startswith("data:")]
    assert bad.status_code == 500, bad.text
    assert bad.json()["error"]["code"] == "internal_error" and "injected" in bad.json()["error"]["message"]
    assert bad_lines[-1] == "data: [DONE]" and '"code": "internal_error"' in bad_lines[-2]
    assert extreme.status_code == 400 and extreme.json()["error"]["param"] == "repetition_penalty"
    assert tail[-1] == "data: [DONE]" and json.loads(tail[-2][5:])["choices"][0]["finish_reason"] == "length"
    # no error event in the neighbour's stream (its sampled text may itself contain the word "error")
    assert not any("error" in json.loads(line[5:]) for line in tail[:-1])
    assert live.metrics()["kt_errors_total"] == before["kt_errors_total"] + 2
    # the scheduler frees a finished sequence's blocks just after its last event is sent
    _wait(lambda: (lambda m: m["kt_kv_blocks_used"] == 0 and m["kt_running_requests"] == 0)(live.metrics()), 10,
          "KV blocks back to idle and no request running")


def _raw_post(srv, body: dict) -> socket.socket:
    """A non-streaming request on a raw socket, so the test can hang up whenever it likes."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def _wait(cond, seconds, what):
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.05)


def test_non_streaming_clients_that_hang_up_are_cancelled_running_or_queued(model_path, tmp_path):
    srv = Live(model_path, tmp_path, "server.max_batch=2", "server.max_queue=4")
    try:
        before = srv.metrics()
        with slow_steps(srv, 0.05):  # 200 tokens would take 10 s or more
            socks = [_raw_post(srv, {"model": "tiny", "prompt": f"long {i}", "max_tokens": 200, "ignore_eos": True})
                     for i in range(3)]
            _wait(lambda: (lambda m: (m["kt_running_requests"], m["kt_queue_depth"]) == (2, 1))(srv.metrics()), 20,
                  "two requests should run and one wait")
            time.sleep(0.3)  # tokens are flowing for the running ones
            for s in socks:
                s.close()
            t0 = time.time()
            _wait(lambda: srv.metrics()["kt_cancelled_total"] == before["kt_cancelled_total"] + 3, 5,
                  "requests whose client hung up were not cancelled")
            cancelled_in = time.time() - t0
            m = srv.metrics()
            assert m["kt_running_requests"] == 0 and m["kt_queue_depth"] == 0 and m["kt_kv_blocks_used"] == 0
            assert m["kt_generation_tokens_total"] - before["kt_generation_tokens_total"] < 100
            t0 = time.time()
            r = srv.client.completions.create(model="tiny", prompt="next", max_tokens=2)
            assert r.usage.completion_tokens <= 2 and time.time() - t0 < 5
        assert cancelled_in < 2
    finally:
        srv.stop()


def test_shutdown_keeps_listening_with_503_until_requests_finish(model_path, tmp_path):
    """README: Ctrl+C stops taking requests (503) and gives running ones server.shutdown_grace_s.
    A request that finishes within the grace ends normally, the server answers 503 (not connection
    refused) meanwhile, a second Ctrl+C ends what is left at once, then the server stops listening."""
    srv = Live(model_path, tmp_path, "server.shutdown_grace_s=60")
    results = {}

    def stream(name, max_tokens):
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": name, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
            results[name] = [line for line in r.iter_lines() if line.startswith("data:")]

    threads = [threading.Thread(target=stream, args=a) for a in (("short", 30), ("long", 240))]
    try:
        with slow_steps(srv, 0.03):
            for t in threads:
                t.start()
            _wait(lambda: srv.metrics()["kt_running_requests"] == 2, 20, "the streams did not start")
            srv.server.handle_exit(signal.SIGINT, None)  # Ctrl+C
            time.sleep(0.5)
            health = httpx.get(srv.url + "/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "shutting_down"
            r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2},
                           timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
            threads[0].join(30)
            short = results["short"]
            assert short[-1] == "data: [DONE]" and json.loads(short[-2][5:])["choices"][0]["finish_reason"] == "length"
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 503  # "long" still runs: still listening
            assert threads[1].is_alive() and srv.thread.is_alive()
            t0 = time.time()
            srv.server.handle_exit(signal.SIGINT, None)  # a second Ctrl+C: end it now
            threads[1].join(30)
            srv.thread.join(30)
            assert not srv.thread.is_alive() and time.time() - t0 < 15
        long = results["long"]
        assert long[-1] == "data: [DONE]" and '"code": "server_shutting_down"' in long[-2]
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        if srv.thread.is_alive():
            srv.stop()


def test_openapi_describes_the_real_answers_and_405_names_allowed_methods(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    ops = [op for item in doc["paths"].values() for op in item.values()]
    assert ops and not any("422" in op.get("responses", {}) for op in ops)
    assert "HTTPValidationError" not in doc.get("components", {}).get("schemas", {})
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        for code in ("400", "404", "408", "429", "500", "503"):
            assert responses[code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        ok = responses["200"]["content"]
        assert "text/event-stream" in ok and ok["application/json"]["schema"]["$ref"].endswith("Response")
    error_schema = doc["components"]["schemas"]["ErrorDetail"]["properties"]
    assert {"message", "type", "param", "code"} <= set(error_schema)
    metrics = doc["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"] and list(metrics["401"]["content"]) == ["application/json"]
    assert "503" in doc["paths"]["/health"]["get"]["responses"]
    assert "404" in doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    r = httpx.get(live.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]
    r = httpx.post(live.url + "/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


def test_openapi_request_schemas_take_what_the_server_takes(live):
    """Requests the document allows are requests the server serves (schemathesis found 26 that it
    refused): one non-empty prompt with token ids inside the vocabulary, at most 4 stops, an exact
    seed bound, and the unsupported fields only as null / false."""
    doc = httpx.get(live.url + "/openapi.json", headers=live.headers()).json()
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    vocab = live.state.engine.model.spec.vocab_size
    forms = props["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in forms
    ids = [f for f in forms if f.get("items", {}).get("type") == "integer"][0]
    assert ids["minItems"] == 1 and ids["items"] == {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    assert all(f.get("maxItems") == 1 for f in forms if f.get("type") == "array" and f is not ids)
    assert {"type": "array", "items": {"type": "string"}, "maxItems": 4} in props["stop"]["anyOf"]
    assert props["seed"]["anyOf"][0]["maximum"] == 2**64 - 1  # an integer, not a float that rounds up
    assert props["logprobs"]["type"] == "null" and props["suffix"]["type"] == "null"
    # and the server does take the edges the document names
    r = httpx.post(live.url + "/v1/completions", headers=live.headers(), timeout=60,
                   json={"model": "tiny", "prompt": [vocab - 1], "max_tokens": 1, "seed": 2**64 - 1,
                         "temperature": 0.5, "stop": ["a", "b", "c", "d"], "echo": None, "logprobs": None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"])
def test_sampling_numbers_are_numbers_not_booleans(live, field):
    r = httpx.post(live.url + "/v1/completions", headers=live.headers(), timeout=60,
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 1, field: True})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_text_that_is_not_unicode_gets_400_and_a_huge_body_413_before_parsing(live):
    """JSON's \\ud800 parses to a lone surrogate, which no tokenizer takes: a 400 naming the field, not a
    500; a body past the server's limit is answered 413 without being parsed or tokenized (a 20 MB
    prompt held the event loop, and every stream, for 23 s), and the server serves on."""
    for path, body, param in (("/v1/completions", '{"model": "tiny", "prompt": "hi \\ud800", "max_tokens": 2}',
                               "prompt"),
                              ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 2, "messages": '
                               '[{"role": "user", "content": "\\udfff"}]}', "messages")):
        r = httpx.post(live.url + path, content=body, timeout=60,
                       headers={"content-type": "application/json", **live.headers()})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/completions", content='{"model": "tiny\\ud800", "prompt": "hi"}', timeout=60,
                   headers={"content-type": "application/json", **live.headers()})
    assert r.status_code == 404 and "\\ud800" in r.json()["error"]["message"], r.text
    t = time.perf_counter()
    r = _post(live, {"model": "tiny", "prompt": "word " * 4_000_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert time.perf_counter() - t < 10
    r = _post(live, {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
