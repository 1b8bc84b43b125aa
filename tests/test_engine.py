"""The continuous-batching engine on CPU (fp32, tiny random Mistral): isolation, joining, chunked prefill, failures.

The central check: a request's tokens are the same alone or in a batch of 32 with other
lengths and settings (greedy, sampled with other seeds / temperatures / top-p, stop strings,
stop tokens, other max_tokens), and its greedy tokens are those of plain transformers generate.
"""

from __future__ import annotations

import random

import pytest
import torch

from afinar import data
from afinar.config import ServeConfig
from afinar.engine import Draining, Request, RowError, SamplingParams, TEMPERATURE_FLOOR, build
from afinar.engine.request import TextStream
from afinar.engine.torch_flat import FlatRunner
from afinar.engine.torch_generic import GenericRunner
from afinar.engine.torch_runner import TorchRunner
from afinar.engine.torch_sampling import choose, vocab_hashes


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def words(tiny_tokenizer):
    return sorted(w[1:] for w in tiny_tokenizer.get_vocab() if w.startswith("▁") and w[1:].isalpha() and len(w) > 3)


def prompt(tok, words, n_words: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return data.prompt_ids(tok, " ".join(rng.choices(words, k=n_words)) + "?")


def run(engine, requests: list[Request]) -> list[Request]:
    """Submit all, then drive the engine in this thread until every request ends."""
    for r in requests:
        engine.submit(r, limit_queue=False)
    while not all(r.done for r in requests):
        engine._iterate(block=False)
    return requests


def fresh(r: Request) -> Request:
    return Request(r.prompt, r.params)


def hf_greedy(model, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=eos)[0, len(prompt_ids):].tolist()
    return out[: out.index(eos)] if eos in out else out


def mixed_requests(tok, words, n: int) -> list[Request]:
    """n requests of 5 to ~700 prompt tokens and every kind of setting."""
    reqs = []
    for i in range(n):
        length = [1, 3, 8, 20, 60, 150, 250][i % 7]
        kind = i % 4
        params = SamplingParams(
            max_tokens=[1, 5, 12, 20][i % 4],
            temperature=0.0 if kind == 0 else [0.7, 1.0, 1.3][i % 3],
            top_p=[1.0, 0.9, 0.5][i % 3],
            seed=1000 + i if i % 5 else 2**64 - 1 - i,  # a seed that needs all 64 bits
            stop=("e",) if i % 6 == 5 else (),
            stop_token_ids=(28705,) if i % 7 == 3 else (),
        )
        reqs.append(Request(prompt(tok, words, length, seed=i), params))
    return reqs


def test_a_request_answers_the_same_alone_or_in_a_batch_of_32(model, tiny_tokenizer, words):
    tok = tiny_tokenizer
    engine = build(model, tok, ServeConfig(max_batch_size=32, prefill_chunk=64, max_context=1024))
    assert isinstance(engine.runner, TorchRunner)
    batch = mixed_requests(tok, words, 32)
    assert max(len(r.prompt) for r in batch) > 3 * 64, "some prompts must be prefilled in several chunks"
    run(engine, batch)
    assert engine.metrics()["rows_per_step_max"] >= 8, "the requests ran together"
    alone = [run(engine, [fresh(r)])[0] for r in batch]
    for i, (b, a) in enumerate(zip(batch, alone)):
        assert b.finish_reason in ("stop", "length"), b.error
        assert (b.tokens, b.text, b.finish_reason) == (a.tokens, a.text, a.finish_reason), f"request {i}"
    assert len({tuple(r.tokens) for r in batch if len(r.tokens) > 5}) > 5, "the answers differ from each other"
    # greedy rows are plain transformers' greedy answer (independent reader)
    eos = tok.eos_token_id
    for r in [r for r in batch if r.params.greedy][:4]:
        expected = hf_greedy(model, r.prompt, r.params.max_tokens, eos)
        assert r.tokens == expected[: len(r.tokens)] and (r.finish_reason == "stop" or r.tokens == expected)


def test_pipelined_and_generic_runners_give_the_same_tokens(model, tiny_tokenizer, words, monkeypatch):
    tok = tiny_tokenizer
    reference = build(model, tok, ServeConfig(max_batch_size=8, prefill_chunk=32, max_context=512))
    reqs = mixed_requests(tok, words, 8)
    run(reference, reqs)
    decode = reference.decode
    from afinar.engine.scheduler import Engine

    pipelined = Engine(TorchRunner(model, 8, 512, 32, pipeline=True), decode, reference.stop_ids)
    generic = Engine(GenericRunner(model, 8, 512, 32), decode, reference.stop_ids)
    # one forward a step: decode rows and prompt chunks together (reference attention on CPU)
    flat = Engine(FlatRunner(model, 8, 512, 32, pipeline=True), decode, reference.stop_ids)
    # and with split-key decode steps (pieces of 16 keys once a row holds more than 64)
    split = Engine(FlatRunner(model, 8, 512, 32, split_keys=16), decode, reference.stop_ids)
    from afinar.engine import torch_varlen

    pieces = []
    whole = torch_varlen.split_decode
    monkeypatch.setattr(torch_varlen, "split_decode", lambda *a, **k: pieces.append(1) or whole(*a, **k))
    for engine in (pipelined, generic, flat, split):
        again = run(engine, [fresh(r) for r in reqs])
        assert [r.tokens for r in again] == [r.tokens for r in reqs], type(engine.runner).__name__
    assert pieces, "the split runner's long rows ran split-key decode steps"


def test_rows_join_and_leave_the_running_batch(model, tiny_tokenizer, words):
    tok = tiny_tokenizer
    engine = build(model, tok, ServeConfig(max_batch_size=2, max_context=512)).start()
    try:
        late = []

        def join(token):  # at A's 5th token, B and C arrive: B joins at once, C waits for a free row
            if len(a.tokens) == 4:
                for r in late:
                    engine.submit(r)

        a = Request(prompt(tok, words, 10, 1), SamplingParams(max_tokens=40, stop_token_ids=()), on_token=join)
        late += [Request(prompt(tok, words, 5, 2), SamplingParams(max_tokens=3)),
                 Request(prompt(tok, words, 5, 3), SamplingParams(max_tokens=3))]
        engine.submit(a)
        for r in (a, *late):
            assert r.wait(60)
    finally:
        engine.stop()
    b, c = late
    if a.finish_reason == "length":
        assert b.timing.finished < a.timing.finished and c.timing.finished < a.timing.finished
    assert c.slot == b.slot, "C took the row B freed"
    assert c.timing.admitted >= b.timing.finished
    assert engine.metrics()["queue_wait_ms"]["p95"] is not None


@pytest.mark.parametrize("step", ["split", "flat"])
def test_a_long_prompt_does_not_stall_short_ones(model, tiny_tokenizer, words, step):
    tok = tiny_tokenizer
    engine = build(model, tok, ServeConfig(max_batch_size=8, prefill_chunk=128, max_context=2048, step=step))
    assert type(engine.runner) is {"split": TorchRunner, "flat": FlatRunner}[step]
    first_step, last_step = {}, {}

    def note(i):
        def hook(token):
            first_step.setdefault(i, engine.counts["steps"])
            last_step[i] = engine.counts["steps"]
        return hook

    long = Request(prompt(tok, words, 1500, 7), SamplingParams(max_tokens=4), on_token=note("long"))
    assert len(long.prompt) >= 1500
    shorts = [Request(prompt(tok, words, 5, i), SamplingParams(max_tokens=8), on_token=note(i)) for i in range(7)]
    run(engine, [long, *shorts])  # the long prompt first in the queue
    assert all(r.finish_reason == "length" for r in (long, *shorts))
    # It needs 12+ prefill steps of 128 tokens; the short ones share those steps with it and
    # are answered in full (8 tokens) before it has its first token.
    assert first_step["long"] >= len(long.prompt) // 128
    assert max(last_step[i] for i in range(7)) < first_step["long"]
    alone = [run(engine, [fresh(r)])[0] for r in shorts]
    assert [r.tokens for r in alone] == [r.tokens for r in shorts]


def test_a_failing_row_fails_alone_and_the_engine_keeps_serving(model, tiny_tokenizer, words, monkeypatch):
    tok = tiny_tokenizer
    engine = build(model, tok, ServeConfig(max_batch_size=4, max_context=512))
    runner = engine.runner
    good = [Request(prompt(tok, words, 6, i), SamplingParams(max_tokens=12)) for i in range(3)]
    bad = Request(prompt(tok, words, 9, 99), SamplingParams(max_tokens=12))
    prefill = runner._prefill

    def poisoned(chunks):  # the bad row's prefill raises, as a device error in its forward would
        if any(runner.handles[c.slot] is bad for c in chunks):
            raise RuntimeError("injected failure")
        return prefill(chunks)

    monkeypatch.setattr(runner, "_prefill", poisoned)
    for r in good:
        engine.submit(r)
    engine._iterate(block=False)  # the good rows are decoding when the bad one arrives
    run(engine, [bad])
    run(engine, [])
    while not all(r.done for r in good):
        engine._iterate(block=False)
    assert bad.finish_reason == "error" and "injected failure" in bad.error and bad.error_status == 500
    alone = [run(engine, [fresh(r)])[0] for r in good]
    assert [r.tokens for r in good] == [r.tokens for r in alone] and all(len(r.tokens) == 12 for r in good)

    # A failure no row can be blamed for ends the rows of that step; the next requests are served.
    step = runner.step
    monkeypatch.setattr(runner, "step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    doomed = run(engine, [Request(prompt(tok, words, 4, 5), SamplingParams(max_tokens=5))])[0]
    assert doomed.finish_reason == "error" and "device lost" in doomed.error
    monkeypatch.setattr(runner, "step", step)
    after = run(engine, [fresh(good[0])])[0]
    assert after.tokens == good[0].tokens
    assert engine.metrics()["errors"] == 2


def test_row_errors_keep_the_other_rows_tokens(model, tiny_tokenizer, words):
    """GenericRunner: a row whose forward raises fails; the step's tokens for the others are delivered."""
    tok = tiny_tokenizer
    from afinar.engine.scheduler import Engine

    runner = GenericRunner(model, 4, 512, 64)
    engine = Engine(runner, lambda ids: tok.decode(ids, skip_special_tokens=True), {tok.eos_token_id})
    good = Request(prompt(tok, words, 6, 1), SamplingParams(max_tokens=10))
    bad = Request(prompt(tok, words, 6, 2), SamplingParams(max_tokens=10))
    forward = runner._forward
    runner._forward = lambda row, tokens: (_ for _ in ()).throw(ValueError("bad row")) if row.handle is bad \
        else forward(row, tokens)
    run(engine, [good, bad])
    assert bad.finish_reason == "error" and good.finish_reason == "length"
    runner._forward = forward
    assert run(engine, [fresh(good)])[0].tokens == good.tokens
    with pytest.raises(RowError):
        raise RowError([bad], ValueError("x"))


def test_drain_ends_what_does_not_finish_in_time(model, tiny_tokenizer, words):
    tok = tiny_tokenizer
    engine = build(model, tok, ServeConfig(max_batch_size=2, max_context=2048)).start()
    try:
        short = engine.submit(Request(prompt(tok, words, 3, 1), SamplingParams(max_tokens=2)))
        long = engine.submit(Request(prompt(tok, words, 3, 2), SamplingParams(max_tokens=2000)))
        assert short.wait(30)
        assert engine.drain(0.3) == 1
        with pytest.raises(Draining):
            engine.submit(Request([1, 2, 3], SamplingParams()))
    finally:
        engine.stop()
    assert short.finish_reason == "length"
    assert long.finish_reason == "error" and long.error_status == 503 and "shutting down" in long.error
    assert 0 < len(long.tokens) < 2000


def test_sampler_draws_from_the_softmax_and_respects_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = logits.softmax(-1)[0]
    n = 20000
    vh = vocab_hashes(6, "cpu")
    many = logits.expand(n, -1)
    seeds = torch.arange(n, dtype=torch.long) * 7919
    draws = choose(many, torch.ones(n), torch.ones(n), seeds, torch.full((n,), 5), vh)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert (freq - probs).abs().max() < 0.015, (freq, probs)
    # top_p: only the smallest set of likeliest tokens holding >= 0.8 of the mass
    nucleus = choose(many, torch.ones(n), torch.full((n,), 0.8), seeds, torch.full((n,), 5), vh)
    keep = int((probs.cumsum(0) < 0.8).sum()) + 1
    assert set(nucleus.unique().tolist()) == set(range(keep))
    # the eager path (sampled rows named on the host, top-k cut) draws exactly what the graph path draws
    eager = choose(many, torch.ones(n), torch.full((n,), 0.8), seeds, torch.full((n,), 5), vh, rows=list(range(n)))
    assert torch.equal(eager, nucleus)
    # a row's draw depends on its seed and position only: not on the rows beside it
    one = choose(logits, torch.ones(1), torch.ones(1), seeds[:1], torch.full((1,), 5), vh)
    assert one.item() == draws[0].item()
    other_position = choose(many, torch.ones(n), torch.ones(n), seeds, torch.full((n,), 6), vh)
    assert (other_position != draws).float().mean() > 0.3
    # greedy rows take the argmax whatever their seed; temperature 0 never divides by zero
    greedy = choose(many[:3], torch.zeros(3), torch.full((3,), 0.5), seeds[:3], torch.zeros(3, dtype=torch.long), vh)
    assert greedy.tolist() == [0, 0, 0]
    # a top_p that float32 rounds to 0 (1e-46) still keeps the likeliest token, on both paths
    tiny = torch.tensor([1e-46] * 3, dtype=torch.float32)
    assert tiny.eq(0).all()
    flipped = many[:3].flip(-1)  # the likeliest last: "nothing kept" would come out as token 0
    for rows in (None, [0, 1, 2]):
        assert choose(flipped, torch.ones(3), tiny, seeds[:3], torch.zeros(3, dtype=torch.long), vh, rows).tolist() == [5] * 3


def test_sampling_params_ranges():
    assert SamplingParams(temperature=1e-300).greedy and SamplingParams(temperature=TEMPERATURE_FLOOR / 2).greedy
    assert not SamplingParams(temperature=TEMPERATURE_FLOOR).greedy
    assert SamplingParams(top_p=1e-300).top_p == 1e-30  # within float32 on the device: the likeliest token alone
    assert SamplingParams(seed=-1).seed == 2**64 - 1 and SamplingParams(seed=2**70 + 3).seed == 3
    assert SamplingParams(seed=None).seed != SamplingParams(seed=None).seed  # fresh seeds
    for bad in (dict(max_tokens=0), dict(top_p=0), dict(top_p=1.5), dict(temperature=-1), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_incremental_text_equals_the_full_decode(tiny_tokenizer):
    tok = tiny_tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = "Olá! O Farense jogou na Taça UEFA em 1995/96 — no Estádio de São Luís, em Faro. ção ñ 😀 fim"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for sample in [ids, [rng.randrange(3, 32000) for _ in range(300)]]:
        stream = TextStream(decode)
        pieces = "".join(stream.push(t) for t in sample)
        assert decode(sample).startswith(pieces) and len(decode(sample)) - len(pieces) <= 4
        r = Request([1], SamplingParams())
        r._start(decode, 0)
        outbox = []
        for t in sample:
            r._push_token(t, outbox)
        r._finish("length", outbox)  # the end flushes what the window held back
        assert "".join(item for _, item in outbox if isinstance(item, str)) == r.text == decode(sample)
    cut = Request([1], SamplingParams(stop=("Faro", "UEFA x")))
    cut._start(decode, 0)
    outbox = []
    assert any(cut._push_token(t, outbox) for t in ids)
    cut._finish("stop", outbox)
    assert "".join(item for _, item in outbox if isinstance(item, str)) == cut.text == text[: text.index("Faro")]


def test_a_request_may_fill_its_kv_slot_exactly(model, tiny_tokenizer, words):
    tok = tiny_tokenizer
    from afinar.engine.scheduler import Engine

    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    p = prompt(tok, words, 30, 3)
    expected = hf_greedy(model, p, 300 - len(p), tok.eos_token_id)
    for runner, pipeline in [(r, p) for r in (TorchRunner, FlatRunner) for p in (False, True)]:
        engine = Engine(runner(model, 4, 300, 64, pipeline=pipeline), decode, {tok.eos_token_id})
        assert engine.max_len == 300
        full = run(engine, [Request(p, SamplingParams(max_tokens=300 - len(p))),
                            Request(p[:10], SamplingParams(max_tokens=7))])[0]
        assert full.finish_reason in ("length", "stop") and full.tokens == expected[: len(full.tokens)]
        assert len(full.prompt) + len(full.tokens) <= 300
        with pytest.raises(ValueError):
            engine.submit(Request(list(range(1, 301)), SamplingParams()))


def test_flat_steps_pack_prompt_tokens_without_padding_and_use_few_shapes():
    from afinar.engine.plan import PrefillQueue
    from afinar.engine.torch_flat import prompt_sizes

    q = PrefillQueue(64)
    for slot, n in enumerate([40, 20, 30, 200]):
        q.add(slot, list(range(1, n + 1)))
    first = q.next(flat=True, max_rows=8)
    # the budget is the sum of the chunks' tokens (20 + 30 = 50 <= 64; 40 more would not fit)
    assert [(c.slot, len(c.tokens)) for c in first] == [(1, 20), (2, 30)]
    assert sum(len(c.tokens) for c in first) <= 64
    assert [(c.slot, len(c.tokens)) for c in q.next(flat=True, max_rows=1)] == [(0, 40)]
    assert prompt_sizes(512) == (0, 16, 32, 64, 128, 256, 512)
    assert prompt_sizes(100) == (0, 16, 32, 64, 100)


def test_varlen_reference_attention_is_per_row_causal_attention(model):
    """torch_varlen.reference (the CPU stand-in for the FlashAttention kernel) against SDPA on each row alone."""
    import torch.nn.functional as F

    from afinar.engine import torch_varlen

    g = torch.Generator().manual_seed(0)
    heads, kv, d, stride = 4, 2, 16, 50
    k, v = (torch.randn((3 * stride, kv, d), generator=g) for _ in range(2))
    q = torch.randn((1 + 6 + 1, heads, d), generator=g)
    # row 0 decodes at key 17; slot 2 prefills 6 tokens at positions 10..15; slot 1 decodes at key 40
    cu_q, cu_k = torch.tensor([0, 1, 7, 8]), torch.tensor([0, 2 * stride, stride, 0])
    used = torch.tensor([18, 16, 41])
    out = torch_varlen.reference(q, k, v, cu_q, cu_k, used, 6, stride, d**-0.5)

    def alone(qs, start, n_keys):
        keys = k[start:start + n_keys].transpose(0, 1).repeat_interleave(heads // kv, 0)[None]
        values = v[start:start + n_keys].transpose(0, 1).repeat_interleave(heads // kv, 0)[None]
        n_q = qs.shape[0]
        mask = torch.ones(n_q, n_keys, dtype=torch.bool).tril(n_keys - n_q)
        return F.scaled_dot_product_attention(qs.transpose(0, 1)[None], keys, values, attn_mask=mask)[0].transpose(0, 1)

    torch.testing.assert_close(out[0:1], alone(q[0:1], 0, 18))
    torch.testing.assert_close(out[1:7], alone(q[1:7], 2 * stride, 16))
    torch.testing.assert_close(out[7:8], alone(q[7:8], stride, 41))


def test_serve_step_picks_the_runner(model, tiny_tokenizer):
    assert type(build(model, tiny_tokenizer, ServeConfig()).runner) is TorchRunner  # CPU: auto is split
    assert type(build(model, tiny_tokenizer, ServeConfig(step="flat")).runner) is FlatRunner
    assert build(model, tiny_tokenizer, ServeConfig(step="flat")).runner.attention.__name__ == "reference"


def test_split_key_decode_attention_merges_to_the_whole(model):
    """torch_varlen.split_decode (pieces of keys merged by log-sum-exp) against attention over all keys."""
    from afinar.engine import torch_varlen

    g = torch.Generator().manual_seed(1)
    heads, kv, d, stride, piece = 4, 2, 16, 70, 16
    k, v = (torch.randn((4 * stride, kv, d), generator=g) for _ in range(2))
    q = torch.randn((4, heads, d), generator=g)
    cu_k = torch.arange(5) * stride
    used = torch.tensor([69, 1, 0, 33])  # several pieces, one key, no key, a piece and a part
    whole = torch_varlen.reference(q, k, v, torch.arange(5), cu_k, used, 1, stride, d**-0.5)
    out, lse = torch_varlen.reference_lse(q, k, v, torch.arange(5), cu_k, used, 1, stride, d**-0.5)
    torch.testing.assert_close(out, whole)
    assert torch.isinf(lse[:, 2]).all() and torch.isfinite(lse[:, [0, 1, 3]]).all()
    split = torch_varlen.split_decode(torch_varlen.reference_lse, q, k, v, cu_k, used, stride, d**-0.5, piece)
    torch.testing.assert_close(split, whole)
    assert split[2].abs().max() == 0


class ReplayByRerun:
    """CPU stand-in for a captured CUDA graph: `replay()` runs the captured closure again.

    It cannot show what a real capture bakes in, but it runs every line of the graph path that
    CUDA alone reaches otherwise: which graph a step picks, the sampling graph (`sampled=None`:
    every row computes both ways) against the greedy one, and the claim that capture's warm-up
    runs change no row (the real capture executes `run` twice before recording it): here every
    step captures anew, so those runs happen with other rows mid-answer."""

    def __init__(self, run):
        self.run = run

    def replay(self):
        self.run()


@pytest.mark.parametrize("runner", ["split", "flat", "flat_split"])
def test_the_graph_step_path_gives_the_eager_tokens(model, tiny_tokenizer, words, monkeypatch, runner):
    from afinar.backends import fast_decode
    from afinar.engine import torch_rows
    from afinar.engine.scheduler import Engine

    captured = []

    def capture(self, key, run):
        run(), run()  # as the real warm-up on its side stream: must leave every row as it was
        captured.append(key)
        return ReplayByRerun(run)  # kept nowhere: every step captures again, with other rows live

    monkeypatch.setattr(torch_rows.SlotRows, "_capture", capture)
    monkeypatch.setattr(fast_decode, "compiled", lambda fn, *probe, backward=True: fn)  # no inductor on CI
    tok = tiny_tokenizer
    reference = build(model, tok, ServeConfig(max_batch_size=8, prefill_chunk=32, max_context=512))
    reqs = mixed_requests(tok, words, 12)  # more requests than rows: slots are reused
    run(reference, reqs)

    def make(use_graphs):
        if runner == "split":
            return TorchRunner(model, 8, 512, 32, use_graphs=use_graphs, pipeline=True)
        return FlatRunner(model, 8, 512, 32, use_graphs=use_graphs, pipeline=True,
                          split_keys=16 if runner == "flat_split" else 0)

    graphed = make(True)
    engine = Engine(graphed, reference.decode, reference.stop_ids)
    again = run(engine, [fresh(r) for r in reqs])
    assert [r.tokens for r in again] == [r.tokens for r in reqs]
    keys = set(captured)
    assert len(keys) >= 3, keys
    if runner != "split":
        assert {k[2] for k in keys} == {True, False}, "both the sampling and the greedy graphs ran"
        assert any(k[1] for k in keys), "steps with prompt tokens ran as graphs"
    if runner == "flat_split":
        assert any(k[3] for k in keys), "split-key decode steps ran as graphs"
