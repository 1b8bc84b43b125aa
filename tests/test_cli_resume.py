"""`afinar train --resume RUN` from the command line: the run's own config, --set on top of it, and
nothing to resume said as such (it used to build the config from defaults and fail on data.train)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from afinar.cli import app
from afinar.train import run_training

from conftest import crash, tiny_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="afinar")


@pytest.fixture(scope="module")
def cfg(tiny_model, data_files):
    train, val = data_files
    return tiny_config(tiny_model, "train.max_steps=4", "train.save_every=2", "train.eval_every=2", train=train, val=val)


def test_resume_takes_the_runs_config_and_set_changes_need_force(cfg, tmp_path):
    out = tmp_path / "run"
    crash(cfg, out, 3)
    refused = invoke("train", "--resume", out, "--set", "train.max_steps=6")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "train.max_steps" in said and "4 -> 6" in said and "--force" in said, said
    done = invoke("train", "--resume", out, "--set", "train.max_steps=6", "--force")
    assert done.exit_code == 0, done.output
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["resumed_from_step"] == 2 and json.loads((out / "training_config.json").read_text())["train"]["max_steps"] == 6


def test_nothing_to_resume_is_said_as_such(cfg, tmp_path):
    missing = invoke("train", "--resume", tmp_path / "nothere")
    assert missing.exit_code == 2 and "Nothing to resume" in " ".join(missing.output.split()), missing.output
    finished = run_training(cfg, tmp_path / "done").output
    again = invoke("train", "--resume", finished)
    said = " ".join(again.output.split())
    assert again.exit_code == 2 and "is a finished run" in said and "--overwrite" in said, said
    shutil.rmtree(finished)
