"""`afinar eval`: loss through the training encoding, answer quality, speed and memory, on the tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from afinar import evaluate
from afinar.cli import app
from afinar.data import Example
from afinar.stats import percentile

from conftest import QA, qa_rows, tiny_config, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """A 3-step LoRA run on the tiny model, validated every step (so its best adapter is known)."""
    from afinar.train import run_training

    root = tmp_path_factory.mktemp("eval_run")
    train = write_jsonl(root / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(root / "val.jsonl", qa_rows(QA[4:]))
    test = write_jsonl(root / "test.jsonl", qa_rows(QA[:3]))
    cfg = tiny_config(tiny_model, "train.max_steps=3", "train.eval_every=1", f"data.test={test}", train=train, val=val)
    return run_training(cfg, root / "run").output


def qa(question: str, answer: str, keywords=()) -> Example:
    return Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], None, list(keywords))


def test_quality_measures_on_known_answers():
    examples = [qa("Q1", "Fundado em 1910.", ["1910"]), qa("Q2", "Branco e preto.", ["branco", "preto"]), qa("Q3", "Faro.")]
    answers = [{"answer": "Fundado em 1910.", "completion_tokens": 5},   # exact, recalls
               {"answer": "", "completion_tokens": 0},                   # empty, misses
               {"answer": "Faro, Faro, Faro", "completion_tokens": 8}]   # hit the limit: truncated
    q = evaluate.answer_quality(examples, answers, max_tokens=8)
    assert (q["hits"], q["scored"], q["fact_recall"]) == (1, 2, 0.5)  # Q3 has no keywords: not scored
    assert q["empty_share"] == pytest.approx(1 / 3) and q["truncated_share"] == pytest.approx(1 / 3)
    from sacrebleu.metrics import CHRF

    expected = CHRF().corpus_score([a["answer"] for a in answers], [[e.answer for e in examples]]).score
    assert q["chrf"] == pytest.approx(expected, abs=0.01)
    assert evaluate.chrf("Fundado em 1910.", "Fundado em 1910.") == pytest.approx(100)


def test_percentile_matches_numpy():
    import numpy as np

    values = [120.0, 80.5, 300.0, 95.0, 101.0, 99.9, 250.0]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_eval_loss_equals_the_training_validation_loss(run):
    """Same encoding, same loss: the run's adapter is its best step, so eval reproduces that val_loss."""
    result = evaluate.evaluate_run(run, max_tokens=6, batch_size=4, latency_samples=2)
    meta = json.loads((run / "metadata.json").read_text())
    assert result["validation"]["loss"] == pytest.approx(meta["best_val_loss"], rel=1e-3)
    assert result["validation"]["examples"] == 4 and result["validation"]["target_tokens"] > 0
    assert result["validation"]["perplexity"] == pytest.approx(2.718281828 ** result["validation"]["loss"], rel=1e-3)
    assert [a["question"] for a in result["answers"]] == [q for q, _, _ in QA[4:]]
    for a in result["answers"]:
        assert 0 <= a["completion_tokens"] <= 6 and a["chrf"] is not None
    q = result["quality"]
    assert q["scored"] == 4 and 0 <= q["empty_share"] <= 1 and 0 <= q["truncated_share"] <= 1
    assert q["truncated_share"] == sum(a["completion_tokens"] == 6 for a in result["answers"]) / 4
    s = result["speed"]
    assert s["questions"] == 2 and 0 < s["latency_ms_p50"] <= s["latency_ms_p95"]
    m = result["memory"]
    # Process RSS can shrink while loading (freed pages go back): only the peak is ordered.
    assert m["before_load_mb"] > 0 and m["peak_mb"] >= m["loaded_mb"] > 0
    # The held-out test file is scored apart, through the same encoding and measures.
    t = result["test"]
    assert t["data"].endswith("test.jsonl") and [a["question"] for a in t["answers"]] == [q for q, _, _ in QA[:3]]
    assert t["quality"]["scored"] == 3 and t["validation"]["examples"] == 3 and t["validation"]["loss"] > 0


def test_eval_cli_writes_eval_json_and_prints_a_table(run):
    result = runner.invoke(app, ["eval", str(run), "--max-tokens", "4", "--latency-samples", "1"], prog_name="afinar")
    assert result.exit_code == 0, result.output
    for label in ("Validation loss", "Fact recall", "chrF", "Latency p50 / p95", "Truncated answers",
                  "Test fact recall (held out)"):
        assert label in result.stdout
    saved = json.loads((run / "eval.json").read_text())
    assert saved["run"] == str(run) and saved["max_tokens"] == 4 and len(saved["answers"]) == 4
    assert {"validation", "quality", "speed", "memory", "device", "training"} <= set(saved)


def test_eval_on_other_data_and_bare_questions(run, tmp_path):
    questions = tmp_path / "questions.txt"
    questions.write_text("Onde joga o Farense?\n\nQual é a cor do Farense?\n", encoding="utf-8")
    out = tmp_path / "e.json"
    result = runner.invoke(app, ["eval", str(run), "--data", str(questions), "--output", str(out), "--max-tokens", "3",
                                 "--latency-samples", "0", "--json"], prog_name="afinar")
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert json.loads(result.stdout) == saved
    assert [a["question"] for a in saved["answers"]] == ["Onde joga o Farense?", "Qual é a cor do Farense?"]
    assert saved["validation"] is None and saved["quality"]["chrf"] is None  # no reference answers to score against
    assert saved["test"] is None  # --data names the one file to score
    assert not (run / "eval.json").exists() or json.loads((run / "eval.json").read_text())["data"] != str(questions)


def test_eval_errors_are_clean(run, tiny_model, tmp_path):
    from afinar.train import run_training

    missing = runner.invoke(app, ["eval", str(run), "--data", str(tmp_path / "nope.jsonl")], prog_name="afinar")
    assert missing.exit_code == 2 and "nope.jsonl" in missing.output and "Traceback" not in missing.output
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(QA[:4]))
    no_val = run_training(tiny_config(tiny_model, "train.max_steps=1", train=train), tmp_path / "noval").output
    result = runner.invoke(app, ["eval", str(no_val)], prog_name="afinar")
    assert result.exit_code == 2 and "--data FILE" in result.output
    assert not (no_val / "eval.json").exists()
    # a broken data file is said before the model loads
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Onde?", "answer": "Faro"}\n{"question": \n')
    import afinar.inference

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(afinar.inference, "Predictor", lambda *a, **k: pytest.fail("loaded the model before reading the data"))
        bad = runner.invoke(app, ["eval", str(run), "--data", str(broken)], prog_name="afinar")
    assert bad.exit_code == 2 and "broken.jsonl:2" in bad.output and "Traceback" not in bad.output, bad.output


@pytest.mark.parametrize("command, options", [
    ("eval", ["--data", "--output", "--max-tokens", "--batch-size", "--latency-samples", "--json"]),
    ("compare", ["--output", "--prompts", "--train", "--set", "--runs-dir", "--overwrite"]),
])
def test_help(command, options):
    result = runner.invoke(app, [command, "--help"], prog_name="afinar")
    assert result.exit_code == 0 and all(o in result.stdout for o in options), result.stdout
