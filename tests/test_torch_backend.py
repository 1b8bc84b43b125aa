"""The torch backends on the tiny random Mistral: the trainer's fast loss equals the plain HF loss,
QLoRA on CPU keeps its gradients after a validation pass, training lowers the loss; the answerer's
generation is deterministic and left padding is correct."""

from __future__ import annotations

import pytest
import torch

from afinar import batches, data, models
from afinar.backends.torch_answer import TorchAnswerer
from afinar.backends.torch_train import TorchTrainer
from afinar.data import IGNORE, Example

PAIRS = [
    ("Quando foi fundado o Farense?", "O Sporting Clube Farense foi fundado a 1 de abril de 1910."),
    ("Onde joga o Farense?", "No Estádio de São Luís, em Faro."),
    ("Qual é a alcunha do Farense?", "Os Leões de Faro, por causa do leão no emblema do clube."),
]


def load_backend(make_cfg, tiny_model, *overrides):
    backend = TorchTrainer(make_cfg(*overrides))
    backend.load(models.resolve(str(tiny_model)))
    return backend


def load_answerer(make_cfg, tiny_model, folder, *overrides, scale=0.0):
    """A trainer's adapter (random when `scale` > 0) saved to `folder`, loaded back for answering."""
    trainer = load_backend(make_cfg, tiny_model, *overrides)
    if scale:
        randomise_lora(trainer, scale=scale)
    trainer.save_adapter(folder)
    answerer = TorchAnswerer(make_cfg(*overrides))
    answerer.load(models.resolve(str(tiny_model)), folder)
    return answerer


def encoded_batch(tokenizer, pairs=PAIRS[:2]) -> list[data.Encoded]:
    batch = [data.encode(Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None), tokenizer, 128)
             for q, a in pairs]
    assert len({len(e.input_ids) for e in batch}) == len(batch), "the batch must need padding"
    return batch


def lora_params(backend) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in backend.model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params), "only LoRA weights are trainable"
    return params


def randomise_lora(backend, seed=1, scale=0.05):
    """LoRA B starts at zero (so A gets no gradient): give every LoRA weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_params(backend).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def grads(backend) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in lora_params(backend).items() if p.grad is not None}


def zero_grads(backend):
    for p in lora_params(backend).values():
        p.grad = None


def hf_batch(batch, pad_id):
    """The same batch built independently: right padding, labels -100 outside the targets."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attn[row, :n] = 1
        labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)])
    return ids, attn, labels


def test_fast_loss_equals_plain_hf_loss(make_cfg, tiny_model):
    backend = load_backend(make_cfg, tiny_model, "lora.dropout=0", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    randomise_lora(backend)
    batch = encoded_batch(backend.tokenizer)

    loss_sum, n = backend.loss_sum(batch)
    assert n == sum(e.n_targets for e in batch)
    (loss_sum / n).backward()
    fast = grads(backend)
    zero_grads(backend)

    ids, attn, labels = hf_batch(batch, backend.tokenizer.eos_token_id)
    out = backend.model(input_ids=ids, attention_mask=attn, labels=labels)
    out.loss.backward()
    plain = grads(backend)

    assert (loss_sum / n).item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert fast.keys() == plain.keys() == lora_params(backend).keys()
    for name in plain:
        assert plain[name].abs().max() > 0, f"{name}: no gradient at all, the comparison would be empty"
        torch.testing.assert_close(fast[name], plain[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_padding_does_not_change_loss(make_cfg, tiny_model):
    backend = load_backend(make_cfg, tiny_model, "lora.dropout=0")
    randomise_lora(backend)
    batch = encoded_batch(backend.tokenizer)
    together, n = backend.eval_loss(batch)
    alone = [backend.eval_loss([e]) for e in batch]
    assert n == sum(k for _, k in alone)
    assert together == pytest.approx(sum(s for s, _ in alone), rel=1e-5)


def test_eval_loss_has_no_gradient_and_keeps_mode(make_cfg, tiny_model):
    backend = load_backend(make_cfg, tiny_model)
    assert backend.model.training
    batch = encoded_batch(backend.tokenizer)
    loss, n = backend.eval_loss(batch)
    assert isinstance(loss, float) and loss > 0 and n > 0
    assert backend.model.training  # back in training mode
    assert not grads(backend)


def test_qlora_cpu_trains_after_validation(make_cfg, tiny_model):
    """Regression: a no-grad eval pass must not switch bitsandbytes to its backward-less CPU kernel."""
    import bitsandbytes as bnb

    # q/k/v only: their gradients all flow back through the 4-bit o_proj and MLP layers
    backend = load_backend(make_cfg, tiny_model, "model.quantization=nf4", "lora.dropout=0",
                           "lora.target_modules=[q_proj,k_proj,v_proj]")
    quantized = [m for m in backend.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized, "nf4 must quantize the base's linear layers"
    batch = encoded_batch(backend.tokenizer)

    before = backend.eval_loss(batch)  # the validation pass
    loss, n = backend.forward_backward(batch, scale=1.0)
    assert loss == pytest.approx(before[0], rel=1e-4)
    g = grads(backend)
    b_grads = {k: v for k, v in g.items() if "lora_B" in k}
    assert b_grads, "LoRA B weights got no gradient"
    for name, grad in b_grads.items():
        assert torch.isfinite(grad).all()
        assert grad.abs().max() > 0, f"{name}: zero gradient after a validation pass"
    # and the weights move
    B = {k: p.detach().clone() for k, p in lora_params(backend).items() if "lora_B" in k}
    backend.optimizer_step(1e-3)
    assert all(not torch.equal(B[k], p) for k, p in lora_params(backend).items() if "lora_B" in k)
    # a second validation pass after the step still leaves training differentiable
    backend.eval_loss(batch)
    backend.forward_backward(batch, scale=1.0)
    assert all(v.abs().max() > 0 for k, v in grads(backend).items())


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_steps_on_one_batch_lower_the_loss(make_cfg, tiny_model, quantization):
    backend = load_backend(make_cfg, tiny_model, f"model.quantization={quantization}", "lora.dropout=0",
                           "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]")
    batch = encoded_batch(backend.tokenizer)
    start, n = backend.eval_loss(batch)
    norms = []
    for _ in range(6):
        backend.forward_backward(batch, scale=1.0 / n)
        norms.append(backend.optimizer_step(1e-2))
    end, _ = backend.eval_loss(batch)
    assert all(x > 0 for x in norms[1:])
    assert end / n < start / n - 0.05, (start / n, end / n)


def test_grad_norm_is_before_clipping(make_cfg, tiny_model):
    backend = load_backend(make_cfg, tiny_model, "train.max_grad_norm=1e-6", "lora.dropout=0")
    randomise_lora(backend)
    batch = encoded_batch(backend.tokenizer)
    _, n = backend.forward_backward(batch, scale=1.0)
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads(backend).values()])).item()
    assert backend.optimizer_step(1e-3) == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-6
    assert not grads(backend)  # zeroed after the step


def test_generate_greedy_is_deterministic(make_cfg, tiny_model, tmp_path):
    backend = load_answerer(make_cfg, tiny_model, tmp_path)
    tok = backend.tokenizer
    prompt = data.prompt_ids(tok, PAIRS[0][0])
    a = backend.generate([prompt], max_new_tokens=8)
    b = backend.generate([prompt], max_new_tokens=8, seed=123)  # the seed only matters when sampling
    assert a == b
    assert len(a) == 1 and 0 < len(a[0]) <= 8
    assert all(type(t) is int for t in a[0])
    assert tok.eos_token_id not in a[0]
    assert not backend.model.training


def test_generate_stops_at_eos_and_drops_it(make_cfg, tiny_model, tmp_path):
    backend = load_answerer(make_cfg, tiny_model, tmp_path)
    eos = backend.tokenizer.eos_token_id
    prompt = data.prompt_ids(backend.tokenizer, PAIRS[0][0])
    free = backend.generate([prompt], max_new_tokens=8)[0]
    assert len(free) == 8 and eos not in free
    # make EOS score slightly above the 4th generated token: greedy now ends there (or earlier)
    model = backend.model
    with torch.no_grad():
        logit = model(input_ids=torch.tensor([prompt + free[:3]])).logits[0, -1, free[3]].item()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[eos] = head[free[3]] * (1.01 if logit > 0 else 0.99)
    stopped = backend.generate([prompt], max_new_tokens=8)[0]
    assert len(stopped) <= 3
    assert eos not in stopped
    assert stopped == free[: len(stopped)]


def test_batched_generation_equals_one_by_one(make_cfg, tiny_model, tmp_path):
    backend = load_answerer(make_cfg, tiny_model, tmp_path, "lora.dropout=0", scale=0.02)  # a non-trivial adapter too
    tok = backend.tokenizer
    prompts = [data.prompt_ids(tok, PAIRS[0][0]), data.prompt_ids(tok, "Olá?")]
    assert len(prompts[0]) != len(prompts[1])
    together = backend.generate(prompts, max_new_tokens=10)
    alone = [backend.generate([p], max_new_tokens=10)[0] for p in prompts]
    assert together == alone


def test_sampling_depends_on_seed(make_cfg, tiny_model, tmp_path):
    backend = load_answerer(make_cfg, tiny_model, tmp_path)
    prompt = data.prompt_ids(backend.tokenizer, PAIRS[0][0])
    a = backend.generate([prompt], 12, temperature=5.0, seed=1)
    assert a == backend.generate([prompt], 12, temperature=5.0, seed=1)
    assert a != backend.generate([prompt], 12, temperature=5.0, seed=2)


def test_pad_batch_pads_and_ignores(tiny_tokenizer):
    batch = encoded_batch(tiny_tokenizer)
    p = batches.pad_batch(batch, tiny_tokenizer.eos_token_id)
    short = min(range(2), key=lambda r: len(batch[r].input_ids))
    n = len(batch[short].input_ids)
    assert p.attention[short, :n].all() and not p.attention[short, n:].any()
    assert (p.targets[short, n:] == IGNORE).all()
    assert int((p.targets != IGNORE).sum()) == sum(sum(e.loss_mask) for e in batch)
    # the same batch built independently, as HF's labels= wants it
    ids, attn, labels = hf_batch(batch, tiny_tokenizer.eos_token_id)
    assert (torch.from_numpy(p.ids) == ids).all() and (torch.from_numpy(p.targets) == labels).all()
    # positions predict labels: position t of a row predicts its token t + 1
    width = p.ids.shape[1]
    assert [int(p.ids.reshape(-1)[i + 1]) for i in p.positions] == p.labels.tolist()
    assert len(p.labels) == sum(e.n_targets for e in batch) and (p.positions % width < width - 1).all()


def test_save_adapter_writes_peft_files(make_cfg, tiny_model, tmp_path):
    backend = load_backend(make_cfg, tiny_model)
    backend.save_adapter(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert "README.md" not in names
    info = backend.describe()
    assert info["device"] == "cpu" and info["compute_dtype"] == "float32"
    assert info["trainable_parameters"] == sum(p.numel() for p in lora_params(backend).values())
    mem = backend.memory()
    assert mem["memory_mb"] > 0 and mem["peak_memory_mb"] >= mem["memory_mb"] * 0.5
