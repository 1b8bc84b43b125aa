"""`afinar compare`: LoRA vs QLoRA trained by `--train` on the tiny model, each step in its own process."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from afinar import evaluate, report
from afinar.cli import app

from conftest import QA, qa_rows, write_jsonl

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="afinar")


def tiny_yaml(root, tiny_model) -> tuple:
    train = write_jsonl(root / "data" / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(root / "data" / "val.jsonl", qa_rows(QA[5:]))
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base": str(tiny_model), "quantization": "nf4", "compute_dtype": "float32"},
        "train": {"batch_size": 2, "grad_accumulation": 1, "max_seq_length": 128, "warmup_steps": 1,
                  "learning_rate": 1e-3, "eval_every": 1, "max_steps": 50, "log_every": 1},
        "data": {"train": str(train), "val": str(val)},
    }))
    return config, val


@pytest.fixture(scope="module")
def compared(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    config, val = tiny_yaml(root, tiny_model)
    out = root / "report"
    result = invoke("compare", "--train", config, "--set", "train.max_steps=2", "--output", out,
                    "--runs-dir", root / "runs", "--max-tokens", "4", "--latency-samples", "2")
    return root, out, result


def test_compare_train_writes_the_report(compared):
    root, out, result = compared
    assert result.exit_code == 0, result.output
    # The terminal names the real output folder, never the scratch files the evaluations went through.
    assert f"Written: {out}/ (comparison.md, comparison_results.json" in " ".join(result.stdout.split())
    assert "afinar-compare-" not in result.output and "warning" not in result.output.lower()
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "comparison_results.json", "loss.png",
                                                     "memory.png", "speed.png"]
    for png in ("loss.png", "memory.png", "speed.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "comparison_results.json").read_text())
    lora, qlora = results["runs"]
    assert (lora["name"], lora["method"], lora["quantization"]) == ("lora", "lora", "none")
    assert (qlora["name"], qlora["method"], qlora["quantization"]) == ("qlora", "qlora", "nf4")
    # --set reaches training; both variants share seed, data and LoRA settings.
    assert lora["training"]["steps"] == qlora["training"]["steps"] == 2
    assert lora["seed"] == qlora["seed"] and lora["data"] == qlora["data"] and lora["lora"] == qlora["lora"]
    for e in (lora, qlora):
        assert e["adapter_bytes"] == (root / "runs" / e["name"] / "adapter_model.safetensors").stat().st_size
        assert e["validation"]["loss"] == pytest.approx(e["training"]["best_val_loss"], rel=2e-3)
        assert e["memory"]["training_peak_mb"] > 0 and e["memory"]["eval_peak_mb"] > 0
        assert e["speed"]["questions"] == 2 and e["training"]["tokens_per_s"] > 0
    # 4-bit storage of the quantized layers: the QLoRA base is smaller in memory.
    assert qlora["memory"]["base_weights_mb"] < lora["memory"]["base_weights_mb"]


def test_compare_ratios_and_agreement_follow_the_figures(compared):
    _, out, _ = compared
    results = json.loads((out / "comparison_results.json").read_text())
    lora, qlora = results["runs"]
    ratios = {m["key"]: m for m in results["ratios"]["metrics"]}
    for key in ("memory.training_peak_mb", "memory.base_weights_mb", "training.tokens_per_s", "validation.loss"):
        assert ratios[key]["ratio"] == pytest.approx(report.get(qlora, key) / report.get(lora, key), rel=1e-3)
    assert len(results["questions"]) == 3
    for q in results["questions"]:
        a, b = q["answers"]["lora"], q["answers"]["qlora"]
        (pair,) = q["agreement"]
        assert pair["exact"] == (a == b) and pair["chrf"] == pytest.approx(evaluate.chrf(b, a), abs=0.01)
    (summary,) = results["agreement"]
    assert summary["exact_share"] == sum(q["agreement"][0]["exact"] for q in results["questions"]) / 3
    md = (out / "comparison.md").read_text()
    assert "QLoRA / LoRA" in md and "![loss curves](loss.png)" in md
    assert all(q["question"] in md for q in results["questions"])
    assert results["command"].startswith("afinar compare --train") and "train.max_steps=2" in results["command"]
    assert results["warnings"] == [] and "Warning" not in md  # same base, data, validation file and steps


def test_compare_warns_when_runs_differ(compared, tmp_path, monkeypatch):
    """Another base, validation file and step count: each is named in the terminal and in comparison.md."""
    from afinar import compare
    from afinar.synthetic import make_random_model
    from afinar.train import run_training

    from conftest import tiny_config

    # Evaluate in this process (the sub-process path is the fixture's): the warnings are what is tested here.
    monkeypatch.setattr(compare, "evaluate_in_process", lambda run, data_file, out_json, max_tokens, latency_samples,
                        batch_size, echo=None, verify=True: evaluate.evaluate_run(run, data_file, max_tokens, batch_size,
                                                                                  latency_samples, verify=verify))

    root, _, _ = compared
    lora = root / "runs" / "lora"
    other_base = make_random_model(tmp_path / "other-base", "tiny", seed=1)
    other_val = write_jsonl(tmp_path / "val.jsonl", qa_rows(QA[:2]))
    cfg = tiny_config(other_base, "train.max_steps=3", train=root / "data" / "train.jsonl", val=other_val)
    other = run_training(cfg, tmp_path / "other").output
    out = tmp_path / "cmp"
    result = invoke("compare", lora, other, "--output", out, "--max-tokens", "3", "--latency-samples", "0")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "comparison_results.json").read_text())
    said = " ".join(result.stderr.split())
    md = (out / "comparison.md").read_text()
    expected = {"base models": str(other_base), "validation files": "", "step counts": "lora: 2, other: 3"}
    assert len(results["warnings"]) == len(expected)
    for what, detail in expected.items():
        (line,) = [w for w in results["warnings"] if f"different {what}" in w]
        assert detail in line and f"warning: {line}" in said and f"> **Warning:** {line}" in md
    assert not any("training data" in w for w in results["warnings"])  # both trained on the same file


def test_compare_refuses_bad_requests_cleanly(compared, tiny_model, tmp_path):
    root, out, _ = compared
    before = (out / "comparison_results.json").read_bytes()
    cases = [
        (("compare", root / "runs" / "lora", "--output", out), "already exists"),
        (("compare", root / "runs" / "lora", "--output", tmp_path / "one"), "at least two runs"),
        (("compare", root / "runs" / "lora", "--train", "cpu", "--output", tmp_path / "x"), "not both"),
        (("compare", "--train", root / "tiny.yaml", "--set", "train.lerning_rate=1", "--output", tmp_path / "y",
          "--runs-dir", tmp_path / "runs"), "train.learning_rate"),
        (("compare", root / "runs" / "lora", tmp_path / "missing", "--output", tmp_path / "z"), "Run folder not found"),
    ]
    for args, needle in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
    assert (out / "comparison_results.json").read_bytes() == before
    assert not any((tmp_path / name).exists() for name in ("one", "x", "y", "z", "runs"))


def test_compare_existing_runs_on_bare_questions(compared, tmp_path):
    root, _, _ = compared
    questions = tmp_path / "q.txt"
    questions.write_text("Onde joga o Farense?\n", encoding="utf-8")
    out = tmp_path / "cmp"
    result = invoke("compare", root / "runs" / "lora", root / "runs" / "lora", "--output", out, "--prompts", questions,
                    "--max-tokens", "3", "--latency-samples", "0")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "comparison_results.json").read_text())
    assert [e["name"] for e in results["runs"]] == ["lora", "lora-2"] and results["ratios"] is None
    (q,) = results["questions"]
    # One adapter, greedy decoding, asked twice: the same answer.
    assert q["answers"]["lora"] == q["answers"]["lora-2"] and q["agreement"][0]["exact"]


def test_lora_vs_qlora_doc_section_is_read_from_the_results(compared):
    from test_docs import load_docs_script

    _, out, _ = compared
    results = json.loads((out / "comparison_results.json").read_text())
    text = load_docs_script().lora_vs_qlora(out / "comparison_results.json")
    assert results["command"] in text and "QLoRA / LoRA in short:" in text
    for m in results["ratios"]["metrics"]:
        if m["ratio"] is not None:
            assert f"{m['ratio']:.2f}x" in text
