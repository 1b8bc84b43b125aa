"""The generate hooks serving relies on (on_token, should_stop), and the batcher's text and queue logic."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from afinar import data
from afinar.batching import Batcher, Job, QueueFull
from afinar.config import ServeConfig

from test_torch_backend import PAIRS, load_answerer


@pytest.fixture(scope="module")
def backend(tiny_model, tmp_path_factory):
    from conftest import tiny_config

    return load_answerer(lambda *o: tiny_config(tiny_model, *o), tiny_model, tmp_path_factory.mktemp("adapter"))


def prompts(backend):
    tok = backend.tokenizer
    return [data.prompt_ids(tok, PAIRS[0][0]), data.prompt_ids(tok, "Olá?"), data.prompt_ids(tok, PAIRS[2][0])]


def test_hooks_leave_greedy_tokens_identical(backend):
    ps = prompts(backend)
    plain = backend.generate(ps, 12)
    seen = [[] for _ in ps]
    hooked = backend.generate(ps, 12, on_token=lambda row, t: seen[row].append(t), should_stop=lambda row: False)
    assert hooked == plain == seen
    # ... and what plain transformers generates, row by row, unpadded
    for p, out in zip(ps, plain):
        ref = backend.model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=backend.tokenizer.eos_token_id)[0, len(p):].tolist()
        assert out == ref


def test_should_stop_ends_one_row_only(backend):
    ps = prompts(backend)
    plain = backend.generate(ps, 10)
    seen = [[] for _ in ps]
    calls = []

    def should_stop(row):
        calls.append((row, row == 1 and len(seen[1]) >= 3))
        return calls[-1][1]

    out = backend.generate(ps, 10, on_token=lambda row, t: seen[row].append(t), should_stop=should_stop)
    assert out[1] == plain[1][:3] == seen[1]
    assert out[0] == plain[0] and out[2] == plain[2]
    assert calls.count((1, True)) == 1  # not asked again once it said stop


def test_on_token_skips_eos(backend):
    eos = backend.tokenizer.eos_token_id
    ps = prompts(backend)[:1]
    free = backend.generate(ps, 6)[0]
    head = backend.model.get_output_embeddings().weight
    saved = head[eos].clone()
    with torch.no_grad():
        head[eos] = head[free[2]] * 1.5  # EOS now wins where free[2] did, or earlier
    try:
        seen = []
        out = backend.generate(ps, 6, on_token=lambda row, t: seen.append(t))[0]
    finally:
        with torch.no_grad():
            head[eos] = saved
    assert eos not in seen and seen == out and len(out) < 6


# ---------------------------------------------------------------- batcher


def fake_decode(ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def run_jobs(batcher, jobs, timeout=10):
    async def main():
        for j in jobs:
            batcher.submit(j)
        streams = []
        for j in jobs:
            streams.append([d async for d in j.deltas(asyncio.get_running_loop().time() + timeout)])
        return streams

    return asyncio.run(main())


def counting_generate(log):
    """A fake backend: row r produces tokens r, r+1, ... until should_stop or max_new_tokens."""
    def generate(prompts, max_new_tokens, temperature, top_p, seed, on_token=None, should_stop=None):
        log.append(len(prompts))
        out = [[] for _ in prompts]
        live = set(range(len(prompts)))
        for _ in range(max_new_tokens):
            for row in sorted(live):
                out[row].append(prompts[row][0] + len(out[row]))
                on_token(row, out[row][-1])
            live = {r for r in live if not should_stop(r)}
            if not live:
                break
        return out
    return generate


def test_batcher_groups_requests_and_streams_exact_text():
    log = []
    batcher = Batcher(counting_generate(log), fake_decode, ServeConfig(max_batch_size=4, batch_window_ms=200))
    batcher.start()
    try:
        jobs = [Job([0], 5), Job([2], 3), Job([4], 6, stops=("gh",)), Job([1], 2, temperature=0.7)]
        streams = run_jobs(batcher, jobs)
    finally:
        batcher.stop()
    assert sorted(log) == [1, 3]  # the sampling request does not share the greedy batch
    assert [j.text for j in jobs] == ["abcde", "cde", "ef", "bc"]
    assert ["".join(s) for s in streams] == [j.text for j in jobs]
    assert [j.finish_reason for j in jobs] == ["length", "length", "stop", "length"]
    assert len(jobs[2].tokens) == 4  # e f g h: stopped at the token completing "gh"
    assert batcher.metrics()["batch_size_max"] == 3


def test_queue_full_and_cancelled_jobs_free_their_slot():
    gate = threading.Event()
    inner = counting_generate([])

    def gated(*args, **kwargs):
        gate.wait(10)
        return inner(*args, **kwargs)

    batcher = Batcher(gated, fake_decode, ServeConfig(max_batch_size=1, batch_window_ms=0, queue_size=1))
    batcher.start()

    async def main():
        first = batcher.submit(Job([0], 2))
        while batcher.metrics()["queued"]:  # the worker holds it, waiting at the gate
            await asyncio.sleep(0.01)
        second = batcher.submit(Job([1], 2))
        with pytest.raises(QueueFull) as full:
            batcher.submit(Job([2], 2))
        assert full.value.retry_after >= 1
        second.cancel()  # its client left while it waited
        gate.set()
        done = [[d async for d in j.deltas(asyncio.get_running_loop().time() + 10)] for j in (first, second)]
        return first, second, done

    try:
        first, second, done = asyncio.run(main())
    finally:
        batcher.stop()
    assert first.text == "ab" and done[1] == [] and second.finish_reason == "cancelled"
    assert batcher.metrics()["cancelled"] == 1 and batcher.metrics()["rejected_queue_full"] == 1


def test_incomplete_utf8_is_held_back():
    # "é" arrives as two byte tokens: the half character (U+FFFD when decoded) is never streamed
    texts = {(1,): "ol", (1, 2): "ol\ufffd", (1, 2, 3): "olé"}

    def generate(prompts, n, *args, on_token=None, should_stop=None):
        for t in (1, 2, 3):
            on_token(0, t)
        return [[1, 2, 3]]

    batcher = Batcher(generate, lambda ids: texts[tuple(ids)], ServeConfig(batch_window_ms=0))
    batcher.start()
    try:
        streams = run_jobs(batcher, [Job([0], 5)])
    finally:
        batcher.stop()
    assert streams == [["ol", "é"]]


def test_a_short_request_is_answered_before_its_batch_ends():
    inner = counting_generate([])

    def slow(prompts, n, *args, on_token=None, should_stop=None):
        def tick(row, token):
            time.sleep(0.005)
            on_token(row, token)
        return inner(prompts, n, *args, on_token=tick, should_stop=should_stop)

    batcher = Batcher(slow, fake_decode, ServeConfig(max_batch_size=2, batch_window_ms=200))
    batcher.start()
    try:
        short, long = Job([0], 2), Job([0], 60)
        run_jobs(batcher, [short, long])
    finally:
        batcher.stop()
    assert (short.text, len(long.tokens)) == ("ab", 60)
    assert short.batch_size == long.batch_size == 2
    assert short.seconds < long.seconds / 5
