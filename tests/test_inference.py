"""The CPU answer path (NF4 weights dequantized, adapter merged) computes what training computed."""

from __future__ import annotations

import torch

from afinar import data, models
from afinar.backends.torch_backend import TorchBackend
from afinar.inference import Predictor
from afinar.train import run_training


def test_merged_cpu_inference_matches_unmerged_4bit_path(tmp_path, make_cfg, qa_files):
    train, val = qa_files
    cfg = make_cfg("model.quantization=nf4", "train.max_steps=3", "train.eval_every=3", train=train, val=val)
    run = run_training(cfg, tmp_path / "run")

    fast = Predictor(run)  # dequantized + merged plain Linear layers
    assert not any("Linear4bit" in type(m).__name__ for m in fast.backend.model.modules())
    assert not any("lora" in name for name, _ in fast.backend.model.named_modules())

    plain = TorchBackend(cfg)  # bitsandbytes 4-bit layers with the adapter on the side, as in training
    plain_tok = plain.load(models.resolve(cfg.model.base), adapter_dir=run, trainable=True)
    assert any("Linear4bit" in type(m).__name__ for m in plain.model.modules())
    plain.model.eval()

    prompts = [data.prompt_ids(plain_tok, q) for q in ("Quando foi fundado o Farense?", "Onde joga o Farense?")]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            a = fast.backend.model(input_ids=ids).logits
            b = plain.model(input_ids=ids).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Greedy answers agree token for token (batched, left-padded).
    assert fast.backend.generate(prompts, 8) == plain.generate(prompts, 8)
