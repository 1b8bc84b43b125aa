"""`afinar serve` over real HTTP on a free port: the openai client, batching, limits and error shapes."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from afinar.config import ServeConfig
from afinar.inference import Predictor
from afinar.serve import create_app, serve_in_thread

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Onde joga o Farense?"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from afinar.synthetic import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor(run)


@pytest.fixture(scope="module")
def url(predictor):
    app = create_app(predictor=predictor, cfg=ServeConfig(batch_window_ms=100, max_tokens=32), api_key=KEY)
    with serve_in_thread(app) as base:
        yield base


def slowed(predictor, seconds_per_token: float, gate: threading.Event | None = None):
    """A copy of the predictor whose generate waits at `gate`, then sleeps after each token."""
    inner = predictor.backend.generate

    def generate(prompts, n, *args, on_token=None, should_stop=None, **kwargs):
        if gate is not None:
            gate.wait(30)

        def slow(row, token):
            on_token(row, token)
            time.sleep(seconds_per_token)

        return inner(prompts, n, *args, on_token=slow, should_stop=should_stop, **kwargs)

    p = copy.copy(predictor)
    p.backend = SimpleNamespace(generate=generate)
    return p


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


def test_openai_client_plain_and_streaming(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    models = client.models.list()
    assert [m.id for m in models.data] == ["run"]
    reply = client.chat.completions.create(model="run", messages=CHAT["messages"], max_tokens=6)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert text.strip()

    stream = client.chat.completions.create(model="run", messages=CHAT["messages"], max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) >= 2  # token by token, not one blob
    assert "".join(deltas) == text  # greedy: the streamed answer is the plain one
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_sse_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_ask_returns_the_cli_object(url, predictor):
    r = httpx.post(f"{url}/v1/ask", json={"question": "Onde joga o Farense?", "max_tokens": 6}, headers=AUTH)
    assert r.status_code == 200, r.text
    direct = predictor.ask("Onde joga o Farense?", max_tokens=6)  # what `afinar ask` prints
    assert r.json().keys() == direct.keys()
    assert {k: r.json()[k] for k in ("answer", "model", "adapter", "prompt_tokens", "completion_tokens")} == \
           {k: direct[k] for k in ("answer", "model", "adapter", "prompt_tokens", "completion_tokens")}


def test_stop_string_and_max_tokens_cap(url):
    full = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 10}, headers=AUTH).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[3:5]
    cut = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 10, "stop": [stop]}, headers=AUTH).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    capped = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 10**6}, headers=AUTH)
    assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] <= 32


def test_twenty_concurrent_requests_are_batched(url):
    before = httpx.get(f"{url}/metrics", headers=AUTH).json()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda i: httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
            "messages": [{"role": "user", "content": f"Pergunta número {i}?"}], "max_tokens": 8}), range(20)))
    assert [r.status_code for r in replies] == [200] * 20
    after = httpx.get(f"{url}/metrics", headers=AUTH).json()
    assert after["requests"] - before["requests"] == 20
    assert after["batches"] - before["batches"] < 20  # fewer generate calls than requests
    assert after["batch_size_max"] > 1
    assert after["errors"] == 0 and after["rss_mb"] > 0


def test_bad_requests_get_one_error_shape(url):
    post = lambda body, **kw: httpx.post(f"{url}/v1/chat/completions", headers={**AUTH, **kw.pop("headers", {})},  # noqa: E731
                                         content=body, **kw)
    error_of(httpx.post(f"{url}/v1/chat/completions", json=CHAT), 401, "invalid_api_key")
    error_of(httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
    json_type = {"Content-Type": "application/json"}
    assert "JSON" in error_of(post(b'{"messages": [', headers=json_type), 400, "invalid_json")
    error_of(post(b"hello"), 400, "invalid_json")
    message = error_of(post(b'{"messages": [{"role": "robot", "content": "x"}], "temperature": 9}', headers=json_type),
                       422, "invalid_field")
    assert "messages.0.role" in message and "robot" in message and "temperature" in message
    error_of(post(b'{"messages": []}', headers=json_type), 422, "invalid_field")
    error_of(post(b'[1, 2]', headers=json_type), 422, "invalid_field")
    error_of(post(b'{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                  headers=json_type), 422, "invalid_field")  # the chat template refuses the order
    error_of(post(b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', headers=json_type), 422, "invalid_field")
    ok = post(b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "user": "u1", "logprobs": false}',
              headers=json_type)
    assert ok.status_code == 200  # unknown fields are ignored
    error_of(post(b"x" * (ServeConfig().max_body_kb * 1024 + 1), headers=json_type), 413, "body_too_large")

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(ServeConfig().max_body_kb + 1):
            yield b" " * 1024

    error_of(post(chunked(), headers=json_type), 413, "body_too_large")
    too_long = {"messages": [{"role": "user", "content": "palavra " * 2100}]}  # the tiny model reads 2048 tokens
    assert "2048" in error_of(httpx.post(f"{url}/v1/chat/completions", json=too_long, headers=AUTH),
                              422, "context_length_exceeded")
    error_of(httpx.get(f"{url}/nowhere", headers=AUTH), 404, "not_found")
    error_of(httpx.get(f"{url}/v1/chat/completions", headers=AUTH), 405, "method_not_allowed")
    error_of(httpx.post(f"{url}/v1/ask", json={"question": "  "}, headers=AUTH), 422, "invalid_field")
    assert httpx.get(f"{url}/metrics", headers=AUTH).json()["errors"] == 0


def test_full_queue_answers_429_with_retry_after(predictor):
    gate = threading.Event()
    cfg = ServeConfig(max_batch_size=1, batch_window_ms=0, queue_size=1)
    app = create_app(predictor=slowed(predictor, 0, gate), cfg=cfg)
    with serve_in_thread(app) as base, concurrent.futures.ThreadPoolExecutor(2) as pool:
        metrics = lambda: httpx.get(f"{base}/metrics").json()  # noqa: E731
        first = pool.submit(httpx.post, f"{base}/v1/ask", json={"question": "a", "max_tokens": 2}, timeout=30)
        while metrics()["requests"] < 1 or metrics()["queued"]:  # the worker holds it, at the gate
            time.sleep(0.01)
        second = pool.submit(httpx.post, f"{base}/v1/ask", json={"question": "b", "max_tokens": 2}, timeout=30)
        while metrics()["queued"] < 1:
            time.sleep(0.01)
        full = httpx.post(f"{base}/v1/ask", json={"question": "c", "max_tokens": 2})
        error_of(full, 429, "queue_full")
        assert int(full.headers["Retry-After"]) >= 1
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_disconnected_stream_and_timeout_free_the_row(predictor):
    cfg = ServeConfig(request_timeout_s=1.0, max_tokens=400)
    app = create_app(predictor=slowed(predictor, 0.02), cfg=cfg)  # 400 tokens would take 8 s
    with serve_in_thread(app) as base:
        t0 = time.monotonic()
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 400, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break  # the client leaves mid-answer
        while httpx.get(f"{base}/metrics").json()["cancelled"] < 1:
            assert time.monotonic() - t0 < 5, "the abandoned row kept generating"
            time.sleep(0.05)
        assert httpx.get(f"{base}/metrics").json()["generated_tokens"] < 200

        with pytest.raises(httpx.ReadTimeout):  # a plain (unstreamed) client that gives up frees its row too
            httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 400}, timeout=0.3)
        while httpx.get(f"{base}/metrics").json()["cancelled"] < 2:
            assert time.monotonic() - t0 < 10, "the abandoned row kept generating"
            time.sleep(0.05)

        slow = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 400}, timeout=30)
        assert "request_timeout_s" in error_of(slow, 503, "timeout")
        assert slow.headers["Retry-After"]
        t1 = time.monotonic()
        while httpx.get(f"{base}/metrics").json()["cancelled"] < 3:
            assert time.monotonic() - t1 < 5, "the timed-out row kept generating"
            time.sleep(0.05)


def test_background_load_reports_failure_cleanly(tmp_path):
    (tmp_path / "broken").mkdir()
    with serve_in_thread(create_app(run=tmp_path / "broken")) as base:
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{base}/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "not a complete afinar run" in health.json()["error"]
        error_of(httpx.post(f"{base}/v1/ask", json={"question": "x"}), 503, "failed")


def test_cors_only_with_an_origin(predictor):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with serve_in_thread(create_app(predictor=predictor, api_key=KEY)) as base:
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with serve_in_thread(create_app(predictor=predictor, api_key=KEY, cors_origins=["http://app.example"])) as base:
        r = httpx.options(f"{base}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        denied = httpx.post(f"{base}/v1/ask", json={"question": "x"}, headers={"Origin": "http://app.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://app.example"


def test_cli_serve_rejects_bad_input_cleanly(tmp_path, run):
    import shutil

    from test_cli import assert_user_error, invoke

    assert_user_error(invoke("serve", tmp_path / "missing"), "Run folder not found")
    assert_user_error(invoke("serve", run, "--set", "train.max_steps=3"), "serve.* settings only")
    assert_user_error(invoke("serve", run, "--set", "serve.max_batch_size=0"), "serve.max_batch_size")
    # a run whose base model is gone: the server stops with one clean message
    moved = shutil.copytree(run, tmp_path / "run-without-model")
    cfg = json.loads((moved / "training_config.json").read_text())
    cfg["model"]["base"] = str(tmp_path / "no-such-model")
    (moved / "training_config.json").write_text(json.dumps(cfg))
    # the run is verified against its base before the server binds: one clean message
    assert_user_error(invoke("serve", moved, "--port", "0"), "no-such-model", "no such folder")
