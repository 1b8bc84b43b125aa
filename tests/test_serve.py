"""`afinar serve` over real HTTP on a free port: the openai client, the engine, isolation, limits and error shapes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest

import afinar.engine
from afinar.config import ServeConfig
from afinar.engine import RowError
from afinar.inference import Predictor
from afinar.serve import create_app, serve_in_thread

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Onde joga o Farense?"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from afinar.synthetic import make_tiny_run

    return make_tiny_run(tmp_path_factory.getbasetemp() / "serving" / "run")  # built once per session, shared


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor(run)


@pytest.fixture(scope="module")
def url(predictor):
    app = create_app(predictor=predictor, cfg=ServeConfig(max_tokens=32), api_key=KEY)
    with serve_in_thread(app) as base:
        yield base


class Wrapped:
    """A runner that waits at `gate` before each step, sleeps after each step that made tokens,
    and fails the rows whose stop strings include `poison` (as a device error in their forward would)."""

    def __init__(self, inner, seconds: float = 0.0, gate: threading.Event | None = None, poison=None):
        self.inner, self.seconds, self.gate, self.poison = inner, seconds, gate, poison
        self.poisoned = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def add(self, handle, slot, prompt, params):
        self.inner.add(handle, slot, prompt, params)
        if self.poison is not None and self.poison in handle.params.stop:
            self.poisoned.append(handle)

    def step(self):
        if self.gate is not None:
            self.gate.wait(30)
        produced = self.inner.step()
        if produced:
            time.sleep(self.seconds)
        if self.poisoned:
            bad, self.poisoned = self.poisoned, []
            raise RowError(bad, RuntimeError("injected failure"), [(h, t) for h, t in produced if h not in bad])
        return produced


def wrap_runner(monkeypatch, **kwargs) -> None:
    """Apps created from now on run their engine through `Wrapped(**kwargs)`."""
    make = afinar.engine.make_torch_runner
    monkeypatch.setattr(afinar.engine, "make_torch_runner", lambda model, cfg: Wrapped(make(model, cfg), **kwargs))


def error_of(response, status: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]["message"]


def test_openai_client_plain_and_streaming(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    models = client.models.list()
    assert [m.id for m in models.data] == ["run"]
    # 32 tokens: enough engine steps that the stream shows pieces on a busy machine (a reader that falls
    # behind gets the waiting tokens joined, so a handful of fast tokens can arrive as one chunk).
    reply = client.chat.completions.create(model="run", messages=CHAT["messages"], max_tokens=32)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 32 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert text.strip()

    stream = client.chat.completions.create(model="run", messages=CHAT["messages"], max_tokens=32, stream=True,
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


def test_twenty_concurrent_requests_share_the_engine(url):
    before = httpx.get(f"{url}/metrics", headers=AUTH).json()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda i: httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
            "messages": [{"role": "user", "content": f"Pergunta número {i}?"}], "max_tokens": 8}), range(20)))
    assert [r.status_code for r in replies] == [200] * 20
    after = httpx.get(f"{url}/metrics", headers=AUTH).json()
    assert after["requests"] - before["requests"] == 20
    assert after["steps"] - before["steps"] < 20 * 8  # fewer steps than tokens: rows ran together
    assert after["rows_per_step_max"] > 1
    assert after["errors"] == 0 and after["rss_mb"] > 0 and after["running_rows"] == 0
    for key in ("queue_wait_ms", "ttft_ms", "itl_ms"):
        assert after[key]["p50"] is not None and after[key]["p95"] >= after[key]["p50"]
    assert after["kv_slots"] == ServeConfig().max_batch_size and after["kv_tokens_in_use"] == 0


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
                       400, "invalid_field")
    assert "messages[0].role" in message and "robot" in message and "temperature" in message
    error_of(post(b'{"messages": []}', headers=json_type), 400, "invalid_field", "messages")
    error_of(post(b'[1, 2]', headers=json_type), 400, "invalid_field")
    error_of(post(b'{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                  headers=json_type), 400, "invalid_field", "messages")  # the chat template refuses the order
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
                              400, "context_length_exceeded", "messages")
    error_of(httpx.get(f"{url}/nowhere", headers=AUTH), 404, "not_found")
    error_of(httpx.get(f"{url}/v1/chat/completions", headers=AUTH), 405, "method_not_allowed")
    error_of(httpx.post(f"{url}/v1/ask", json={"question": "  "}, headers=AUTH), 400, "invalid_field", "question")
    assert httpx.get(f"{url}/metrics", headers=AUTH).json()["errors"] == 0


def test_full_queue_answers_429_with_retry_after(predictor, monkeypatch):
    gate = threading.Event()
    wrap_runner(monkeypatch, gate=gate)
    cfg = ServeConfig(max_batch_size=1, queue_size=1)
    app = create_app(predictor=predictor, cfg=cfg)
    with serve_in_thread(app) as base, concurrent.futures.ThreadPoolExecutor(2) as pool:
        metrics = lambda: httpx.get(f"{base}/metrics").json()  # noqa: E731
        first = pool.submit(httpx.post, f"{base}/v1/ask", json={"question": "a", "max_tokens": 2}, timeout=30)
        while metrics()["requests"] < 1 or metrics()["queued"]:  # the engine holds it, at the gate
            time.sleep(0.01)
        second = pool.submit(httpx.post, f"{base}/v1/ask", json={"question": "b", "max_tokens": 2}, timeout=30)
        while metrics()["queued"] < 1:
            time.sleep(0.01)
        full = httpx.post(f"{base}/v1/ask", json={"question": "c", "max_tokens": 2})
        error_of(full, 429, "queue_full")
        assert int(full.headers["Retry-After"]) >= 1
        gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_disconnected_stream_and_timeout_free_the_row(predictor, monkeypatch):
    wrap_runner(monkeypatch, seconds=0.02)
    cfg = ServeConfig(request_timeout_s=1.0, max_tokens=400)
    app = create_app(predictor=predictor, cfg=cfg)  # 400 tokens would take 8 s
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
    # a port in use: said before the model loads (a load cut short by the exit used to abort the process)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert_user_error(invoke("serve", run, "--port", str(port)), f"Cannot listen on 127.0.0.1:{port}", "--port 0")
    assert_user_error(invoke("serve", run, "--host", "203.0.113.7", "--port", "0"), "an address of this machine")


# ---------------------------------------------------------------- isolation and limits


def chat(base, body, timeout=60, headers=AUTH, **kw):
    if isinstance(body, bytes):
        return httpx.post(f"{base}/v1/chat/completions", content=body, timeout=timeout,
                          headers={**headers, "Content-Type": "application/json"}, **kw)
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout, headers=headers, **kw)


def normal_requests(n: int) -> list[dict]:
    """Greedy and seeded sampled requests of several lengths (the well-behaved part of a burst)."""
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"Pergunta {i}: " + "onde joga o Farense? " * (1 + i % 5)}],
                "max_tokens": 4 + i % 9}
        if i % 3:
            body.update(temperature=[0.6, 1.0, 1.5][i % 3], top_p=[1.0, 0.8][i % 2], seed=100 + i)
        out.append(body)
    return out


HOSTILE = [  # (body, status, param): each must fail alone, or succeed, and touch no one else
    ({**CHAT, "seed": 2**70}, 400, "seed"),
    ({**CHAT, "seed": -(2**63) - 1}, 400, "seed"),
    ({**CHAT, "temperature": 1e-300}, 200, None),  # below the floor: greedy
    ({**CHAT, "max_tokens": 10**30}, 200, None),  # capped by serve.max_tokens
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', 400, "temperature"),
    (b'{"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "ok"}, '
     b'{"role": "assistant", "content": "a \\ud800 b"}, {"role": "user", "content": "x"}], "max_tokens": 3}',
     400, "messages[2].content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}', 400, "stop"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({**CHAT, "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "palavra " * 2100}]}, 400, "messages"),
    ({**CHAT, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
]


def test_hostile_requests_in_a_burst_leave_the_others_untouched(url):
    normal = normal_requests(16)
    alone = [chat(url, body) for body in normal]
    assert [r.status_code for r in alone] == [200] * 16
    bodies = [*normal, *(h for h, _, _ in HOSTILE)]
    order = list(range(len(bodies)))
    order = order[::2] + order[1::2]  # hostile ones spread through the burst
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        replies = dict(zip(order, pool.map(lambda i: chat(url, bodies[i]), order)))
    for i, body in enumerate(normal):
        assert replies[i].status_code == 200, replies[i].text
        got, want = replies[i].json(), alone[i].json()
        assert got["choices"] == want["choices"] and got["usage"] == want["usage"], f"request {i}"
    for j, (body, status, param) in enumerate(HOSTILE):
        reply = replies[16 + j]
        if status == 200:
            assert reply.status_code == 200, reply.text
        else:
            error_of(reply, status, "context_length_exceeded" if param == "messages" else "invalid_field", param)
    greedy = chat(url, CHAT).json()["choices"][0]["message"]["content"]
    assert replies[16 + 2].json()["choices"][0]["message"]["content"] == greedy
    assert httpx.get(f"{url}/metrics", headers=AUTH).json()["errors"] == 0


def test_unsupported_features_are_refused_by_name(url):
    refused = {"n": 3, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
               "functions": [{"name": "f"}], "logprobs": True, "top_logprobs": 2,
               "response_format": {"type": "json_object"}, "presence_penalty": 0.5, "frequency_penalty": -1,
               "logit_bias": {"50": 10}}
    for field, value in refused.items():
        message = error_of(chat(url, {**CHAT, field: value}), 400, "invalid_field", field)
        assert "not supported" in message or "one choice" in message or "only" in message, message
    harmless = {"n": 1, "logprobs": False, "response_format": {"type": "text"}, "presence_penalty": 0, "tools": None,
                "user": "u-1", "metadata": {"a": "b"}}
    assert chat(url, {**CHAT, **harmless}).status_code == 200


def test_a_failing_row_gets_500_and_the_others_their_answers(predictor, monkeypatch):
    wrap_runner(monkeypatch, poison="POISON")
    with serve_in_thread(create_app(predictor=predictor, cfg=ServeConfig(max_tokens=32))) as base:
        normal = normal_requests(8)
        alone = [chat(base, body, headers={}).json() for body in normal]
        poisoned = {**CHAT, "stop": ["POISON"]}
        bodies = [*normal[:4], poisoned, *normal[4:]]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: chat(base, b, headers={}), bodies))
        assert "injected failure" in error_of(replies[4], 500, "generation_failed")
        others = [r.json() for i, r in enumerate(replies) if i != 4]
        assert [r["choices"] for r in others] == [r["choices"] for r in alone]
        assert chat(base, CHAT, headers={}).status_code == 200  # and it keeps serving
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**poisoned, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "generation_failed"
        assert httpx.get(f"{base}/metrics").json()["errors"] == 2


def read_response(s: socket.socket) -> str:
    """One whole HTTP/1.1 response (headers, then a Content-Length body) from a raw socket."""
    def more() -> bytes:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection before a whole response: {data!r}"
        return chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += more()
    return (head + b"\r\n\r\n" + body).decode()


def test_slow_bodies_and_idle_connections_time_out(predictor):
    cfg = ServeConfig(body_timeout_s=0.5, keep_alive_s=0.5)
    with serve_in_thread(create_app(predictor=predictor, cfg=cfg)) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:  # a body that never finishes
            s.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"question\": ")
            t0 = time.monotonic()
            reply = read_response(s)
            assert reply.startswith("HTTP/1.1 408") and "body_timeout_s" in reply
            assert time.monotonic() - t0 < 5
        with socket.create_connection((host, int(port)), timeout=10) as s:  # a keep-alive client gone quiet
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).startswith("HTTP/1.1 200")
            t0 = time.monotonic()
            assert s.recv(65536) == b""  # closed by the server
            assert time.monotonic() - t0 < 5


def test_trickled_bodies_heads_and_connection_floods_are_cut(predictor):
    cfg = ServeConfig(body_timeout_s=1.0, header_timeout_s=1.0, max_connections=4)
    with serve_in_thread(create_app(predictor=predictor, cfg=cfg)) as base:
        host, port = base.removeprefix("http://").split(":")
        body = json.dumps({"question": "Onde joga o Farense?", "max_tokens": 2}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:  # the body a byte every 0.2 s
            s.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            t0 = time.monotonic()
            for byte in body[:10]:
                try:
                    s.sendall(bytes([byte]))
                except OSError:  # answered and closed already
                    break
                time.sleep(0.2)
            reply = read_response(s)
            assert reply.startswith("HTTP/1.1 408"), reply  # the whole body's deadline, not each byte's
            assert time.monotonic() - t0 < 3
        for head in (b"", b"GET /health HTTP/1.1\r\nHo"):  # silent, and a head that never ends
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(head)
                t0 = time.monotonic()
                assert s.recv(65536) == b""  # closed by the server
                assert 0.5 < time.monotonic() - t0 < 5
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)
            with socket.create_connection((host, int(port)), timeout=10) as s:  # the fifth: closed at once
                with contextlib.suppress(ConnectionResetError):  # closed with the request unread: a reset
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert s.recv(65536) == b""
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(f"{base}/health").status_code == 200  # free again


def test_null_means_the_default_and_types_are_strict(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    plain = chat(url, CHAT).json()["choices"]
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop_token_ids": None, "seed": None,
             "max_tokens": None, "stream_options": None}
    assert chat(url, {**CHAT, **nulls, "max_tokens": 6}).json()["choices"] == plain
    reply = client.chat.completions.create(model="run", messages=CHAT["messages"], max_tokens=6, temperature=None,
                                           top_p=None)
    assert reply.choices[0].message.content == plain[0]["message"]["content"]
    for field, value in [("stream", "yes"), ("stream", 1), ("max_tokens", "4"), ("max_tokens", True),
                         ("temperature", "0.5"), ("n", "1"), ("seed", 1.5)]:
        error_of(chat(url, {**CHAT, field: value}), 400, "invalid_field", field)
    assert chat(url, {**CHAT, "temperature": 1, "max_tokens": 2}).status_code == 200  # an int where a float goes
    assert "n=1 or leave it out" in error_of(chat(url, {**CHAT, "n": 0}), 400, "invalid_field", "n")
    long = httpx.post(f"{url}/v1/ask", headers=AUTH, json={"question": "Farense " * 3000})
    assert "shorter question" in error_of(long, 400, "context_length_exceeded", "question")


def test_tiny_top_p_and_temperature_are_greedy_on_every_engine(url, predictor):
    greedy = chat(url, CHAT).json()["choices"][0]["message"]["content"]
    for extreme in ({"temperature": 1.0, "top_p": 1e-46, "seed": 7}, {"temperature": 1e-300}):
        assert chat(url, {**CHAT, **extreme}).json()["choices"][0]["message"]["content"] == greedy, extreme
    with serve_in_thread(create_app(predictor=predictor, cfg=ServeConfig(engine="static", max_tokens=32))) as base:
        for extreme in ({"temperature": 1e-300}, {"temperature": 1e-45, "top_p": 1e-46}):
            reply = chat(base, {**CHAT, **extreme}, headers={})
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == greedy, reply.text


def test_the_bearer_scheme_is_any_case(url):
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    for wrong in (f"Basic {KEY}", KEY, f"Bearer {KEY}x", f"Bearer{KEY}", ""):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": wrong}).status_code == 401, wrong


def test_health_shows_the_loading_stage_then_ready(run, monkeypatch):
    import afinar.inference

    gate = threading.Event()
    real = afinar.inference.Predictor

    def held(path, **kwargs):
        gate.wait(30)
        return real(path, **kwargs)

    monkeypatch.setattr(afinar.inference, "Predictor", held)
    with serve_in_thread(create_app(run=run, cfg=ServeConfig(max_tokens=8))) as base:
        loading = httpx.get(f"{base}/health")
        assert loading.status_code == 503 and loading.headers["Retry-After"]
        assert loading.json()["status"] == "loading" and "model" in loading.json()["stage"]
        error_of(chat(base, CHAT), 503, "loading")
        gate.set()
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{base}/health")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stages = health.json()["stages_s"]
        assert any(k.startswith("loading model") for k in stages) and any(k.startswith("warm-up") for k in stages)
        assert chat(base, CHAT).status_code == 200


def test_the_static_batcher_stays_selectable(predictor):
    cfg = ServeConfig(engine="static", max_tokens=8)
    with serve_in_thread(create_app(predictor=predictor, cfg=cfg)) as base:
        reply = chat(base, CHAT, headers={})
        assert reply.status_code == 200 and httpx.get(f"{base}/metrics").json()["engine"] == "static"
        error_of(chat(base, {**CHAT, "stop_token_ids": [5]}, headers={}), 400, "invalid_field", "stop_token_ids")
    with serve_in_thread(create_app(predictor=predictor, cfg=ServeConfig(max_tokens=8))) as base:
        assert chat(base, CHAT, headers={}).json()["choices"] == reply.json()["choices"]  # greedy: the same answer


def test_cli_serve_refuses_an_empty_api_key(run, monkeypatch):
    from test_cli import assert_user_error, invoke

    monkeypatch.setenv("AFINAR_API_KEY", "")
    assert_user_error(invoke("serve", run, "--port", "0"), "API key is empty")
    monkeypatch.delenv("AFINAR_API_KEY")
    assert_user_error(invoke("serve", run, "--port", "0", "--api-key", "  "), "API key is empty")
