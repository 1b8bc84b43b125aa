"""End to end on the real embedded model: QLoRA-train SmolLM2-135M-Instruct for a few steps,
reload the adapter with plain PEFT, and ask through the installed CLI (CPU, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import DATA_DIR, REPO

from test_train import EVAL_KEYS, STEP_KEYS  # noqa: E402

from afinar import runs  # noqa: E402

RUN_FILES = {name.split("/")[0] for name in runs.RUN_FILES} | {"qlora_config.json", runs.LOSS_PLOT, runs.MANIFEST, "checkpoints"}
ANSWER_KEYS = {"answer", "model", "adapter", "prompt_tokens", "completion_tokens", "latency_ms", "tokens_per_s"}
QUESTION = "Quando foi fundado o Farense?"


def ask(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "afinar.cli", "ask", *args], input=input, capture_output=True, text=True,
        cwd=REPO, env={**os.environ}, timeout=300,
    )


@pytest.mark.slow
def test_qlora_smollm2_train_reload_and_ask(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from afinar import data, models
    from afinar.config import load_config
    from afinar.inference import Predictor
    from afinar.runs import load_run
    from afinar.train import run_training

    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text("".join((DATA_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines(True)[:16]), encoding="utf-8")
    val.write_text("".join((DATA_DIR / "val.jsonl").read_text(encoding="utf-8").splitlines(True)[:4]), encoding="utf-8")
    cfg = load_config(None, [
        "model.base=smollm2-135m-instruct", "model.quantization=nf4", "model.double_quant=true",
        "model.compute_dtype=float32", f"data.train={train}", f"data.val={val}",
        "train.batch_size=2", "train.grad_accumulation=1", "train.max_steps=3", "train.eval_every=3",
        "train.warmup_steps=1", "train.max_seq_length=256", "train.learning_rate=1e-3",
    ])
    assert cfg.method == "qlora"

    # ---- train
    run = run_training(cfg, tmp_path / "run").output
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert not (tmp_path / "run.partial").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    evals = [r for r in lines if r["event"] == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [3]
    assert all(set(r) == STEP_KEYS for r in steps) and all(set(r) == EVAL_KEYS for r in evals)
    assert all(0 < r["loss"] < 20 and r["grad_norm"] > 0 for r in steps)
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["method"] == "qlora" and meta["base_model"]["source"] == "embedded"
    assert "bitsandbytes" in meta["device"]["versions"]
    qlora = json.loads((run / "qlora_config.json").read_text())
    assert qlora["quantization"] == "nf4" and qlora["double_quant"] is True
    assert load_run(run)[0] == cfg

    # ---- the adapter reloads with plain PEFT and gives the same logits as afinar's Predictor
    resolved = models.resolve("smollm2-135m-instruct")
    predictor = Predictor(run)
    ours = predictor.backend.model
    base = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    )
    plain = PeftModel.from_pretrained(base, str(run)).eval()
    quantized = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized
    for m in quantized:
        # On CPUs with AVX512-BF16, bitsandbytes answers no-grad eval calls with a bf16 kernel
        # that differs from the training computation by up to ~1 logit; compare like with like.
        m.support_avx512bf16_for_cpu = False
    ids = torch.tensor([data.prompt_ids(predictor.tokenizer, QUESTION)])
    with torch.no_grad():
        ours_logits = ours(input_ids=ids).logits
        plain_logits = plain(input_ids=ids).logits
        with plain.disable_adapter():
            base_logits = plain(input_ids=ids).logits
    # afinar may fold the adapter into dequantized weights for CPU inference: equal up to
    # fp32 rounding (logits here are ~40 in magnitude; the adapter moves them by ~0.1-2).
    torch.testing.assert_close(ours_logits, plain_logits, atol=1e-3, rtol=0)
    assert (plain_logits - base_logits).abs().max() > 0.05, "the trained adapter changes nothing"
    assert (ours_logits - base_logits).abs().max() > 0.05

    # the Python API answers in the documented shape
    answer = predictor.ask(QUESTION, max_tokens=8)
    assert set(answer) == ANSWER_KEYS and isinstance(answer["answer"], str)
    del predictor, ours, plain, base

    # ---- the CLI: one question, then two on stdin
    result = ask(str(run), QUESTION, "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip().splitlines()
    assert len(out) == 1
    reply = json.loads(out[0])
    assert set(reply) == ANSWER_KEYS
    assert reply["model"] == "smollm2-135m-instruct" and reply["adapter"] == str(run)
    assert reply["prompt_tokens"] > 0 and 0 <= reply["completion_tokens"] <= 8
    assert reply["answer"] == answer["answer"]  # greedy: the CLI and the API agree

    questions = json.dumps({"question": QUESTION}) + "\n" + json.dumps("Onde joga o Farense?") + "\n"
    result = ask(str(run), "--stdin", "--max-tokens", "8", input=questions)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(replies) == 2
    assert all(set(r) == ANSWER_KEYS for r in replies)
    assert replies[0]["answer"] == answer["answer"]
