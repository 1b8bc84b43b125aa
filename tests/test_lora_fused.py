"""Fused LoRA layers (torch_lora_fused.py) compute plain PEFT's function, on CPU in fp32.

Tiny random Mistral, Llama and Qwen2 (q/k/v biases) models, dense and bitsandbytes NF4 bases,
LoRA on q/k/v, on every linear layer, and on a subset (so q/k/v and MLP groups hold layers
without LoRA): the loss and every LoRA A/B gradient of the fused model equal the plain PEFT
model's on the same batch, and (all-linear targets) after 3 AdamW steps; `unfuse_lora` gives back bit-identical
outputs; a model with LoRA dropout is left alone and still trains; a PEFT model built directly
(rank-stabilised scaling, the model's own HF loss) matches too; generation with a KV cache goes
through the fused attention and gives the same tokens.

Measured over all cases (CPU, fp32): the loss identical; every gradient within 4.8e-7 of its
tensor's largest entry; after 3 steps, losses within 1.6e-7 (relative) and the weights' difference
within 4.2e-5 of how far they moved (norms). The tolerances below leave a margin of 10x or more.
"""

from __future__ import annotations

import pytest
import torch

from afinar import models
from afinar.backends.torch_train import TorchTrainer
from afinar.backends.torch_lora_fused import fuse_lora, unfuse_lora
from tests.conftest import tiny_config
from tests.test_torch_backend import encoded_batch, grads, lora_params, randomise_lora, zero_grads

ALL = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
TARGETS = {"qkv": "[q_proj,k_proj,v_proj]", "all": ALL, "subset": "[q_proj,v_proj,up_proj,down_proj]"}
GRAD_TOL = 1e-5  # of the largest entry of each gradient
# AdamW's first steps move every weight by about lr * sign(gradient): entries whose gradient is
# near zero turn rounding into a visible difference. Norm of the difference / norm of the move:
STEP_TOL = 1e-3
LOSS_TOL = 2e-6  # relative


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory, tiny_model) -> dict:
    """{'mistral', 'llama', 'qwen2'}: folders of 2-layer random models (hidden 64) with Mistral's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # +1: for a qwen2 folder AutoTokenizer picks Qwen2's tokenizer class, which adds a pad token
    shape = dict(vocab_size=len(tok) + 1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, tie_word_embeddings=False)
    folders = {"mistral": tiny_model}
    for name, config, cls in (("llama", LlamaConfig, LlamaForCausalLM), ("qwen2", Qwen2Config, Qwen2ForCausalLM)):
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        cls(config(**shape)).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[name] = folder
    return folders


def _backend(folder, quantization: str, targets: str, dropout: str = "0") -> TorchTrainer:
    backend = TorchTrainer(tiny_config(folder, f"model.quantization={quantization}", f"lora.dropout={dropout}",
                                       f"lora.target_modules={targets}"))
    backend.load(models.resolve(str(folder)))
    return backend


def _loss_and_grads(backend, batch):
    zero_grads(backend)
    loss, n = backend.forward_backward(batch, scale=1.0)
    return loss, grads(backend)


def _train(backend, batch, start: dict, steps: int = 3):
    """Losses of `steps` AdamW steps from the LoRA weights `start`, and the weights at the end."""
    params = lora_params(backend)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(start[name])
    backend.optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, weight_decay=0.0)
    zero_grads(backend)
    n = sum(e.n_targets for e in batch)
    losses = []
    for _ in range(steps):
        losses.append(backend.forward_backward(batch, scale=1.0 / n)[0])
        backend.optimizer_step(1e-3)
    return losses, {k: p.detach().clone() for k, p in params.items()}


def _assert_grads_close(fused: dict, plain: dict):
    assert fused.keys() == plain.keys() and plain
    for name, g in plain.items():
        scale = g.abs().max()
        assert scale > 0, f"{name}: no gradient, nothing compared"
        assert (fused[name] - g).abs().max() <= GRAD_TOL * scale, name


CASES = [(a, q, t) for a in ("mistral", "llama", "qwen2") for q in ("none", "nf4") for t in ("qkv", "all")]
CASES.append(("mistral", "nf4", "subset"))


@pytest.mark.parametrize("arch, quantization, targets", CASES, ids=["-".join(c) for c in CASES])
def test_fused_equals_plain_peft(arch_models, arch, quantization, targets):
    backend = _backend(arch_models[arch], quantization, TARGETS[targets])
    base = backend.model.get_base_model()
    if arch == "qwen2":
        assert base.model.layers[0].self_attn.q_proj.get_base_layer().bias is not None, "Qwen2 projects q/k/v with a bias"
    randomise_lora(backend)
    start = {k: p.detach().clone() for k, p in lora_params(backend).items()}
    batch = encoded_batch(backend.tokenizer)
    plain = _loss_and_grads(backend, batch)

    counts = fuse_lora(backend.model, compile=False)
    wanted = TARGETS[targets].strip("[]").split(",")
    layers = len(base.model.layers)
    assert counts["linear"] == layers * len(wanted)
    assert counts["attention"] == counts["rotary"] == layers
    assert counts["mlp"] == (layers if {"gate_proj", "up_proj", "down_proj"} & set(wanted) else 0)
    assert all(reason == "mlp: no LoRA layer in it" for reason in counts["skipped"]), counts
    fused = _loss_and_grads(backend, batch)
    assert fused[0] == pytest.approx(plain[0], rel=LOSS_TOL)
    _assert_grads_close(fused[1], plain[1])

    if targets == "all":  # and through 3 AdamW steps
        fused_steps = _train(backend, batch, start)
        unfuse_lora(backend.model)
        plain_steps = _train(backend, batch, start)
        assert fused_steps[0] == pytest.approx(plain_steps[0], rel=LOSS_TOL)
        for name, p in plain_steps[1].items():
            moved = (p - start[name]).norm()
            assert moved > 0 and (fused_steps[1][name] - p).norm() <= STEP_TOL * moved, name
    unfuse_lora(backend.model)

    # Unfused, the model is PEFT's again, bit for bit.
    with torch.no_grad():
        for name, p in lora_params(backend).items():
            p.copy_(start[name])
    again = _loss_and_grads(backend, batch)
    assert again[0] == plain[0]
    assert all(torch.equal(again[1][k], g) for k, g in plain[1].items())
    assert not any("_afinar_group" in m.__dict__ or "forward" in m.__dict__ for m in backend.model.modules())


def test_generation_through_fused_attention(arch_models):
    """With a KV cache (generation) the fused q/k/v feed transformers' own attention forward too."""
    from afinar import data

    backend = _backend(arch_models["mistral"], "none", ALL)
    randomise_lora(backend, scale=0.2)
    model, tok = backend.model.eval(), backend.tokenizer

    def generate(ids):  # transformers' own generate, with its KV cache, on the unmerged PEFT model
        with torch.no_grad():
            return model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()

    prompts = [data.prompt_ids(tok, q) for q in ("Onde joga o Farense?", "Olá")]
    plain = [generate(p) for p in prompts]
    fuse_lora(model, compile=False)
    assert [generate(p) for p in prompts] == plain


def test_dropout_model_left_alone_and_trains(arch_models):
    backend = _backend(arch_models["llama"], "nf4", TARGETS["qkv"], dropout="0.1")
    counts = fuse_lora(backend.model, compile=False)
    assert counts["linear"] == counts["attention"] == counts["mlp"] == counts["rotary"] == 0
    assert counts["skipped"]["linear: lora dropout 0.1"] == 6  # q, k, v of 2 layers
    assert counts["skipped"]["attention: q_proj: lora dropout 0.1"] == 2
    assert not any("forward" in m.__dict__ for m in backend.model.modules())
    batch = encoded_batch(backend.tokenizer)
    before = {k: p.detach().clone() for k, p in lora_params(backend).items()}
    backend.forward_backward(batch, scale=1.0)
    backend.optimizer_step(1e-3)
    assert all(not torch.equal(before[k], p) for k, p in lora_params(backend).items() if "lora_B" in k)  # B starts at 0


def test_plain_peft_model_with_rslora(tiny_model):
    """Outside TorchTrainer: a PEFT model built directly, its own HF loss, rank-stabilised scaling (alpha / sqrt(r))."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_torch_backend import hf_batch

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, target_modules="all-linear"))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.05)
    ids, attn, labels = hf_batch(encoded_batch(tok), tok.eos_token_id)

    def loss_and_grads():
        for p in params.values():
            p.grad = None
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in params.items()}

    plain = loss_and_grads()
    counts = fuse_lora(model, compile=False)
    assert counts["linear"] == 14 and counts["attention"] == counts["mlp"] == 2
    fused = loss_and_grads()
    assert fused[0] == pytest.approx(plain[0], rel=LOSS_TOL)
    _assert_grads_close(fused[1], plain[1])
