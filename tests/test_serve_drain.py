"""SIGTERM on a real `afinar serve` process: it drains, answers or cleanly ends every request, and exits 0."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

SHORT, LONG = 40, 2000  # tokens: a short answer ends within the drain, a long one cannot


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from afinar.synthetic import make_tiny_run

    return make_tiny_run(tmp_path_factory.getbasetemp() / "serving" / "run")  # built once per session, shared


def start(run: Path, *settings: str) -> tuple[subprocess.Popen, str, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("AFINAR_API_KEY", None)
    args = [str(Path(sys.executable).with_name("afinar")), "serve", str(run), "--port", "0"]
    for s in settings:
        args += ["--set", s]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            log.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(120), "".join(log)
        url = re.search(r"listening on (http://\S+)", "".join(log)).group(1)
        deadline = time.monotonic() + 120
        while True:
            try:  # while the model loads (imports hold the GIL) /health may answer late on a busy machine
                if httpx.get(f"{url}/health", timeout=30).status_code == 200:
                    break
            except httpx.TimeoutException:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
            time.sleep(0.1)
    except BaseException:
        proc.kill()  # a server that never got ready must not outlive the test
        raise
    return proc, url, log


def plain(url: str, n: int, i: int):
    body = {"messages": [{"role": "user", "content": f"Pergunta {i}?"}], "max_tokens": n}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def streamed(url: str, n: int, i: int) -> list[str]:
    body = {"messages": [{"role": "user", "content": f"Pergunta {i}?"}], "max_tokens": n, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def running_together(pool, url: str, jobs) -> list:
    """Send every (request function, max_tokens) job; return their futures once all are running rows."""
    futures = [pool.submit(fn, url, n, i) for i, (fn, n) in enumerate(jobs)]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/metrics").json()["running_rows"] < len(jobs):
        assert time.monotonic() < deadline, f"the {len(jobs)} requests never ran together"
        time.sleep(0.01)
    return futures


def test_sigterm_drains_in_flight_requests_then_exits_0(run):
    proc, url, log = start(run, "serve.drain_seconds=1", f"serve.max_tokens={LONG}")
    try:
        jobs = [(plain, SHORT), (plain, LONG), (streamed, SHORT), (streamed, LONG)] * 3  # 6 plain, 6 streamed
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = running_together(pool, url, jobs)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            while httpx.get(f"{url}/health").json()["status"] != "draining":
                assert time.monotonic() - t0 < 5
                time.sleep(0.01)
            late = plain(url, 4, 99)  # arrives during the drain
            assert late.status_code == 503 and late.headers["Retry-After"]
            assert late.json()["error"]["code"] == "draining"
            results = [f.result(timeout=30) for f in futures]  # none hangs
        assert proc.wait(timeout=30) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    outcomes = []
    for (fn, n), result in zip(jobs, results):
        if fn is plain:
            if result.status_code == 200:
                choice = result.json()["choices"][0]
                assert choice["finish_reason"] in ("length", "stop")
                assert choice["finish_reason"] == "stop" or result.json()["usage"]["completion_tokens"] == n
                outcomes.append((n, "full"))
            else:
                assert result.status_code == 503 and result.json()["error"]["code"] == "shutting_down", result.text
                outcomes.append((n, "ended"))
        else:
            assert result[-1] == "data: [DONE]"
            last = json.loads(result[-2][len("data: "):])
            if "error" in last:
                assert last["error"]["code"] == "shutting_down"
                outcomes.append((n, "ended"))
            else:
                assert last["choices"][0]["finish_reason"] in ("length", "stop")
                outcomes.append((n, "full"))
    assert all(o == "full" for n, o in outcomes if n == SHORT), outcomes  # finished within the drain
    assert any(o == "ended" for n, o in outcomes if n == LONG), outcomes  # cut at its end, cleanly
    assert "draining" in "".join(log)


def test_a_second_signal_ends_the_requests_in_flight_cleanly_at_once(run):
    proc, url, log = start(run, "serve.drain_seconds=60", f"serve.max_tokens={LONG}")
    try:
        jobs = [(plain, LONG), (streamed, LONG)] * 2
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = running_together(pool, url, jobs)
            proc.send_signal(signal.SIGTERM)
            while httpx.get(f"{url}/health").json()["status"] != "draining":
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)  # a second signal: do not wait the 60 s
            t0 = time.monotonic()
            results = [f.result(timeout=30) for f in futures]
            assert time.monotonic() - t0 < 10
        assert proc.wait(timeout=30) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    for (fn, _), result in zip(jobs, results):
        if fn is plain:
            assert result.status_code == 503 and result.json()["error"]["code"] == "shutting_down", result.text
        else:
            assert result[-1] == "data: [DONE]" and json.loads(result[-2][6:])["error"]["code"] == "shutting_down"
    assert "again: ending the requests in flight now" in "".join(log)
    assert "Traceback" not in "".join(log) and "terminate called" not in "".join(log), "".join(log)
