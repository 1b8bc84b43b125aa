"""The CPU answer path (NF4 weights dequantized, adapter merged) computes what training computed."""

from __future__ import annotations

import torch

from afinar import data
from afinar.backends import torch_weights
from afinar.inference import Predictor
from afinar.train import run_training


def test_merged_cpu_inference_matches_unmerged_4bit_path(tmp_path, make_cfg, qa_files):
    train, val = qa_files
    cfg = make_cfg("model.quantization=nf4", "train.max_steps=3", "train.eval_every=3", train=train, val=val)
    run = run_training(cfg, tmp_path / "run").output

    fast = Predictor(run)  # dequantized + merged plain Linear layers
    assert not any("Linear4bit" in type(m).__name__ for m in fast.backend.model.modules())
    assert not any("lora" in name for name, _ in fast.backend.model.named_modules())

    # The independent reader: plain transformers + bitsandbytes 4-bit layers with plain PEFT's adapter on the side.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.base, quantization_config=quant, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(run)).eval()
    assert any("Linear4bit" in type(m).__name__ for m in plain.modules())
    # What training computes: without this, bitsandbytes' CPU inference repacks the weights for a bf16
    # kernel on the first no-grad call (torch_weights.keep_cpu_4bit_differentiable says more).
    torch_weights.keep_cpu_4bit_differentiable(plain)

    tok = fast.tokenizer
    prompts = [data.prompt_ids(tok, q) for q in ("Quando foi fundado o Farense?", "Onde joga o Farense?")]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            a = fast.backend.model(input_ids=ids).logits
            b = plain(input_ids=ids).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # Greedy answers agree token for token.
        expected = plain.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = expected[0, len(prompt):].tolist()
        expected = expected[: expected.index(tok.eos_token_id)] if tok.eos_token_id in expected else expected
        assert fast.backend.generate([prompt], 8) == [expected]
