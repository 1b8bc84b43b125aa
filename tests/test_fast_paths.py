"""The speed paths compute what the plain paths compute, on the tiny random Mistral (CPU).

- token-budget batches: every example once per epoch, within the budget, deterministic;
- fused RMSNorm/SwiGLU (torch_fast.py, compiled on CUDA): same loss and LoRA gradients;
- the static-cache decoder (fast_decode.py, CUDA graphs on CUDA): the same greedy tokens as
  `generate` on the base with the adapter kept apart, streaming hooks included.
"""

from __future__ import annotations

import pytest
import torch

from afinar import batches, data, models
from afinar import events as E
from afinar.backends import fast_decode, torch_fast
from afinar.backends.torch_answer import TorchAnswerer
from afinar.backends.torch_train import TorchTrainer
from tests.test_torch_backend import PAIRS, encoded_batch, grads, randomise_lora, zero_grads


def test_token_budget_batches():
    lengths = [(i * 37) % 300 + 20 for i in range(500)]
    a = batches.batch_order(lengths, 64, seed=3, epoch=0, group_by_length=False, max_tokens=1024)
    assert a == batches.batch_order(lengths, 64, seed=3, epoch=0, group_by_length=False, max_tokens=1024)
    assert sorted(i for b in a for i in b) == list(range(500))  # every example once
    assert all(len(b) <= 64 and len(b) * max(lengths[i] for i in b) <= 1024 for b in a)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    assert padded < 1.1 * sum(lengths)  # grouped by length: under 10% padding
    assert len(a) < 500 / 4  # short examples share batches: far fewer than one per example
    assert batches.batch_order(lengths, 64, seed=3, epoch=1, group_by_length=False, max_tokens=1024) != a
    # An example longer than the budget still trains, alone.
    assert batches.batch_order([5, 2000, 5], 8, 0, 0, False, max_tokens=100).count([1]) == 1


def test_token_budget_training_run(make_cfg, qa_files, tmp_path):
    from afinar.train import run_training

    train, _ = qa_files
    events = []
    run_training(make_cfg("train.batch_tokens=64", "train.epochs=1", "train.save_every=0", "lora.dropout=0",
                          train=train), tmp_path / "run", on_event=events.append)
    steps = [e for e in events if isinstance(e, E.Step)]
    # 6 examples of 25-45 tokens, 64 padded tokens a batch: one or two a batch, so more steps than
    # the 3 of batch_size=2, and the step count planned from the token batches is the one run.
    assert next(e for e in events if isinstance(e, E.Start)).total_steps == len(steps) > 3
    assert (tmp_path / "run" / "metadata.json").is_file()


def _loss_and_grads(backend, batch):
    zero_grads(backend)
    loss, n = backend.forward_backward(batch, scale=1.0)
    return loss, n, grads(backend)


def test_fused_pointwise_same_loss_and_grads(make_cfg, tiny_model):
    backend = TorchTrainer(make_cfg("lora.dropout=0", "lora.target_modules=[q_proj,v_proj,up_proj]"))
    backend.load(models.resolve(str(tiny_model)))
    randomise_lora(backend)
    batch = encoded_batch(backend.tokenizer)
    plain = _loss_and_grads(backend, batch)
    patched = torch_fast.fuse_pointwise(backend.model, compile=False)
    assert patched == 2 * 2 + 1 + 2  # two norms and an MLP per layer, the final norm
    fused = _loss_and_grads(backend, batch)
    assert fused[1] == plain[1]
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    assert fused[2].keys() == plain[2].keys()
    for name, g in plain[2].items():
        torch.testing.assert_close(fused[2][name], g, rtol=1e-5, atol=1e-7, msg=name)
    torch_fast.unfuse(backend.model)
    assert "forward" not in backend.model.get_base_model().model.norm.__dict__


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    """A saved adapter with random (non-zero) LoRA weights on every linear layer."""
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_model, "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
    backend = TorchTrainer(cfg)
    backend.load(models.resolve(str(tiny_model)))
    randomise_lora(backend, scale=0.2)
    folder = tmp_path_factory.mktemp("adapter")
    backend.save_adapter(folder)
    return cfg, folder


def _prompts(tokenizer):
    return [data.prompt_ids(tokenizer, q) for q, _ in PAIRS] + [data.prompt_ids(tokenizer, "Olá")]


def test_static_decoder_greedy_equals_adapter_generate(adapter, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, folder = adapter
    served = TorchAnswerer(cfg)
    tok = served.load(models.resolve(str(tiny_model)), folder)
    assert fast_decode.supported(served.model)  # merged at load: plain Linear layers
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the padding"

    # The plain path: the base with the adapter kept apart, transformers' generate, left padding.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    assert not fast_decode.supported(plain)
    reference = TorchAnswerer(cfg)
    reference.model, reference.tokenizer = plain, tok
    expected = reference.generate(prompts, 16)
    assert any(len(row) > 4 for row in expected), "the adapter must produce tokens to compare"

    decoder = fast_decode.StaticDecoder(served.model, use_graphs=False)
    assert decoder.generate(prompts, 16, tok.eos_token_id) == expected
    assert decoder.generate(prompts[:1], 16, tok.eos_token_id) == expected[:1]  # batch of one

    # Streaming hooks: the tokens arrive in order; a row told to stop ends there.
    seen = {}
    stopped = decoder.generate(prompts, 16, tok.eos_token_id, on_token=lambda r, t: seen.setdefault(r, []).append(t),
                               should_stop=lambda r: r == 0 and len(seen.get(0, [])) >= 2)
    assert stopped[0] == expected[0][:2] and stopped[1:] == expected[1:]
    assert all(seen.get(r, []) == row for r, row in enumerate(stopped))

    sampled = decoder.generate(prompts, 8, tok.eos_token_id, temperature=0.8, top_p=0.9, seed=5)
    assert sampled == decoder.generate(prompts, 8, tok.eos_token_id, temperature=0.8, top_p=0.9, seed=5)

    # q/k/v weights became views of one fused tensor; before saving they get their own storage
    # back (a state dict of views is deduplicated as if tied), and decoding is unchanged.
    attn = served.model.model.layers[0].self_attn
    storage = lambda name: getattr(attn, name).weight.untyped_storage().data_ptr()  # noqa: E731
    assert storage("q_proj") == storage("k_proj") == storage("v_proj")
    decoder.unfuse()
    assert len({storage("q_proj"), storage("k_proj"), storage("v_proj")}) == 3
    assert fast_decode.StaticDecoder(served.model, use_graphs=False).generate(prompts, 16, tok.eos_token_id) == expected
