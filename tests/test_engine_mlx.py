"""The engine on MLX (CPU build): mlx-lm's BatchGenerator behind it, a sampler per request."""

from __future__ import annotations

import itertools

import pytest

mx = pytest.importorskip("mlx.core")

from afinar import data  # noqa: E402
from afinar.config import ServeConfig  # noqa: E402
from afinar.engine import Request, SamplingParams, build  # noqa: E402
from afinar.engine.mlx_runner import MLXRunner  # noqa: E402


@pytest.fixture(scope="module")
def net(tiny_model):
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny_model)
    model.set_dtype(mx.float32)
    return model


def run(engine, requests):
    for r in requests:
        engine.submit(r, limit_queue=False)
    while not all(r.done for r in requests):
        engine._iterate(block=False)
    return requests


def test_mlx_engine_greedy_is_mlx_lm_and_sampling_is_per_request(net, tiny_tokenizer):
    from mlx_lm.generate import generate_step

    tok = tiny_tokenizer
    engine = build(net, tok, ServeConfig(max_batch_size=4, prefill_chunk=16), framework="mlx")
    assert isinstance(engine.runner, MLXRunner)
    prompts = [data.prompt_ids(tok, q) for q in ("Onde joga o Farense?", "Olá?", "Quem treinou o Farense nos anos 90?")]
    greedy = run(engine, [Request(p, SamplingParams(max_tokens=5)) for p in prompts])
    for p, r in zip(prompts, greedy):  # plain mlx-lm, one prompt at a time
        expected = [int(t) for t, _ in itertools.islice(generate_step(mx.array(p), net), 5)]
        eos = tok.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert r.tokens == expected

    def sampled(seed):
        return Request(prompts[0], SamplingParams(max_tokens=5, temperature=1.5, top_p=0.9, seed=seed))

    alone = run(engine, [sampled(7)])[0].tokens
    mixed = run(engine, [sampled(7), sampled(8), Request(prompts[1], SamplingParams(max_tokens=5))])
    assert mixed[0].tokens == alone  # the same draws beside other requests
    assert mixed[1].tokens != alone  # another seed, another stream
    assert mixed[2].tokens == greedy[1].tokens
