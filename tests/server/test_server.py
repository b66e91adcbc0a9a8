"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official ``openai`` client."""
import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.live import CONTEXT, Live, free_port, slow_steps

openai = pytest.importorskip("openai")


def test_models_and_greedy_completion_match_the_engine(live, model_path):
    assert [m.id for m in live.client.models.list().data] == ["tiny"]
    r = live.client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    want = live.state.engine.tokenizer.encode("The quick brown fox")
    assert r.usage.prompt_tokens == len(want) and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same greedy generation by the engine (its own instance: the live one belongs to the
    # server's scheduler thread) gives the same text, token count and finish reason
    import kt_core

    engine = kt_core.Engine.from_pretrained(model_path, overrides=["model.dtype=float32", f"model.max_seq_len={CONTEXT}"])
    ref = engine.generate("The quick brown fox", max_new_tokens=10, ignore_eos=True)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    # the prompt sent as token ids gives the same generation
    r2 = live.client.completions.create(model="tiny", prompt=want, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r2.choices[0].text == ref.text


def test_chat_streaming_equals_non_streaming(live):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    full = live.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
    pieces, finish, usage = [], None, None
    for chunk in live.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason == "length"
    assert usage.completion_tokens == full.usage.completion_tokens == 12


def test_stop_and_seed(live):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=3,
              extra_body={"ignore_eos": True})
    a, b = live.client.completions.create(**kw), live.client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    text = a.choices[0].text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    if needle.strip():
        c = live.client.completions.create(**kw, stop=[needle])
        assert c.choices[0].finish_reason == "stop" and c.choices[0].text == text[: text.index(needle)]


def test_prefix_cache_reuse_keeps_outputs(live):
    shared = " ".join(f"word{i}" for i in range(60))
    kw = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    cold = live.client.completions.create(prompt=shared + " alpha", **kw)
    warm = live.client.completions.create(prompt=shared + " alpha", **kw)
    assert warm.choices[0].text == cold.choices[0].text
    assert warm.usage.prompt_tokens_details.cached_tokens >= 16
    assert live.metrics()["kt_prefix_cache_hit_rate"] > 0


def test_cache_salt_keeps_tenants_prefixes_apart(live):
    shared = " ".join(f"salted{i}" for i in range(60))
    kw = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})

    def cached(salt=None, prompt=shared + " beta"):
        body = dict(kw["extra_body"], **({"cache_salt": salt} if salt else {}))
        r = live.client.completions.create(prompt=prompt, **dict(kw, extra_body=body))
        return r.usage.prompt_tokens_details.cached_tokens, r.choices[0].text

    n0, text = cached()  # unsalted: cached for unsalted requests only
    assert cached("tenant-a") == (0, text), "a salted request must not reuse (or reveal) an unsalted prefix"
    n_a, text_a = cached("tenant-a")
    assert n_a >= 16 and text_a == text, "the same salt shares its own prefix, with the same output"
    assert cached("tenant-b")[0] == 0
    assert cached()[0] >= 16
    bad = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "cache_salt": ""},
                     headers=live.headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 12}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": list(range(5, 5 + CONTEXT + 10))}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT * 2}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [10 ** 9]}, 400, "prompt"),
    ({"prompt": "hi"}, 400, "model"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(live.url + "/v1/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and (param is None or err["param"].startswith(param))
    assert live.client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens <= 2


def test_chat_errors(live):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot"}]})
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError):
        live.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_many_concurrent_streaming_clients(live):
    """32 streaming clients at once: no errors, every stream complete, no KV block leaked."""
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(i):
        n, finish = 0, None
        stream = await client.completions.create(model="tiny", prompt=f"client {i} says", max_tokens=8,
                                                 temperature=0.7, seed=i, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            n += 1
            finish = chunk.choices[0].finish_reason or finish
        return n, finish

    async def all_():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32)), return_exceptions=True), 240)

    results = asyncio.run(all_())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(f == "length" for _, f in results)
    m = live.metrics()
    assert m["kt_kv_blocks_used"] == 0 and m["kt_running_requests"] == 0 and m["kt_queue_depth"] == 0


def test_client_disconnect_cancels_and_frees_blocks(live):
    before = live.metrics()["kt_cancelled_total"]
    with slow_steps(live):
        with httpx.stream("POST", live.url + "/v1/completions", json={
                "model": "tiny", "prompt": "go", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        deadline = time.time() + 20  # the client has hung up mid-stream
        while live.metrics()["kt_cancelled_total"] == before:
            assert time.time() < deadline, "the request was not cancelled"
            time.sleep(0.1)
    assert live.metrics()["kt_kv_blocks_used"] == 0


def test_queue_full_429_timeout_408_and_api_key(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("KT_TEST_KEY", "sesame")
    srv = Live(model_path, tmp_path, "server.max_batch=1", "server.max_queue=1", "server.request_timeout_s=1.5",
               "server.api_key_env=KT_TEST_KEY", env_key="sesame")
    slow_steps(srv).__enter__()  # this server is thrown away at the end
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        late = {}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=srv.headers(), timeout=30) as first:
            lines = first.iter_lines()  # one iterator: dropping one would close the connection
            next(lines)  # running: the single batch slot is taken
            waiting = threading.Thread(target=lambda: late.setdefault("r", httpx.post(
                srv.url + "/v1/completions", json=dict(body, stream=False), headers=srv.headers(), timeout=30)))
            waiting.start()
            deadline = time.time() + 10
            while srv.metrics()["kt_queue_depth"] < 1:
                assert time.time() < deadline
                time.sleep(0.05)
            with pytest.raises(openai.RateLimitError):
                srv.client.completions.create(model="tiny", prompt="y", max_tokens=1)
            tail = [line for line in lines if line.startswith("data:")]
        assert '"code": "timeout"' in tail[-2] and tail[-1] == "data: [DONE]"
        waiting.join(30)
        assert late["r"].status_code == 408 and late["r"].json()["error"]["code"] == "timeout"
        assert srv.metrics()["kt_kv_blocks_used"] == 0
    finally:
        srv.stop()


def test_graceful_shutdown_ends_streams_and_disk_tier_survives_restart(model_path, tmp_path):
    prompt = " ".join(f"tok{i}" for i in range(80))
    kw = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    a = Live(model_path, tmp_path, "server.shutdown_grace_s=0.5")
    first = a.client.completions.create(**kw)
    result = {}

    def long_stream():
        with httpx.stream("POST", a.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "go", "max_tokens": 240, "stream": True, "ignore_eos": True}) as r:
            result["lines"] = [line for line in r.iter_lines() if line.startswith("data:")]

    t = threading.Thread(target=long_stream)
    with slow_steps(a):
        t.start()
        time.sleep(0.5)
        a.stop()  # drains: the open stream gets an error event and [DONE], the prefix cache goes to disk
    t.join(30)
    assert result["lines"][-1] == "data: [DONE]" and "server_shutting_down" in result["lines"][-2]
    assert list(tmp_path.glob("*.ktkv")), "the prefix cache was not flushed to disk"

    b = Live(model_path, tmp_path)
    try:
        again = b.client.completions.create(**kw)
        assert again.choices[0].text == first.choices[0].text
        assert again.usage.prompt_tokens_details.cached_tokens >= 16
        assert b.metrics()['kt_prefix_cache_hits_total{tier="disk"}'] >= 1
    finally:
        b.stop()


def test_kt_serve_command_serves_and_stops_on_ctrl_c(model_path, tmp_path):
    import os
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "kt_core.cli", "serve", f"model.path={model_path}", f"server.port={port}",
           f"server.prefix_disk_dir={tmp_path}", "model.dtype=float32", f"model.max_seq_len={CONTEXT}"]
    win = sys.platform == "win32"
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, KT_API_KEY=""),
                            creationflags=subprocess.CREATE_NEW_PROCESS_GROUP if win else 0)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "kt serve did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [model_path.name]
        assert client.completions.create(model=model_path.name, prompt="hi", max_tokens=3).usage.completion_tokens <= 3
        proc.send_signal(signal.CTRL_BREAK_EVENT if win else signal.SIGINT)
        assert proc.wait(60) == 0
        assert "kt serve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
