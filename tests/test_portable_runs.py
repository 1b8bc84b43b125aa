"""Self-contained runs: the adapter names its base as the user did, and a moved run still evaluates."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from afinar.cli import app

from conftest import QA, qa_rows, tiny_config, write_jsonl


def test_adapter_config_names_the_base_as_given_not_the_cache(tmp_path):
    """The embedded model loads from afinar's cache folder; adapter_config.json still says 'smollm2-135m-instruct'."""
    from afinar import models
    from afinar.train import run_training

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(QA[:2]))
    cfg = tiny_config("smollm2-135m-instruct", "train.max_steps=1", "train.batch_size=1", "train.max_seq_length=64",
                      train=train)
    run = run_training(cfg, tmp_path / "run").output
    adapter = json.loads((run / "adapter_config.json").read_text())
    meta = json.loads((run / "metadata.json").read_text())
    assert adapter["base_model_name_or_path"] == "smollm2-135m-instruct"
    # where it was loaded from stays recorded in metadata.json
    assert meta["base_model"]["path"] == models.resolve("smollm2-135m-instruct").path != "smollm2-135m-instruct"


def test_moved_run_evaluates_from_anywhere(tiny_model, tmp_path, monkeypatch):
    """Data given as relative paths, run moved, command run from another folder: metadata's absolute paths find the data."""
    from afinar.train import run_training

    work = tmp_path / "work"
    write_jsonl(work / "data" / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(work / "data" / "val.jsonl", qa_rows(QA[6:]))
    monkeypatch.chdir(work)
    cfg = tiny_config(tiny_model, "train.max_steps=1", "data.train=data/train.jsonl", "data.val=data/val.jsonl")
    run = run_training(cfg, "run").output
    moved = tmp_path / "elsewhere" / "moved-run"
    moved.parent.mkdir()
    shutil.move(str(work / run), moved)
    elsewhere = tmp_path / "another"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not (elsewhere / "data" / "val.jsonl").exists()  # the setting as written no longer resolves here
    result = CliRunner().invoke(app, ["eval", str(moved), "--max-tokens", "3", "--latency-samples", "0"], prog_name="afinar")
    assert result.exit_code == 0, result.output
    saved = json.loads((moved / "eval.json").read_text())
    assert saved["data"] == str(val.resolve()) and len(saved["answers"]) == len(QA[6:])
    assert saved["validation"]["loss"] > 0
