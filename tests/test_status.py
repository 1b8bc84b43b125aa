"""Signs of life: a slow step shows its text and elapsed time (terminal), or one line with its duration (pipe)."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from afinar import events, status
from afinar.progress import TrainingDisplay

from conftest import QA, qa_rows, write_jsonl


@pytest.fixture(autouse=True)
def _own_console(monkeypatch):
    """TrainingDisplay makes its console the stages' default: give it back after each test."""
    monkeypatch.setattr(status, "_console", status._console)


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120, color_system=None), out


def test_slow_step_prints_one_line_with_its_time_when_not_a_terminal():
    con, out = console(terminal=False)
    with status.status("Dequantizing the embedded GGUF model", con, slow_s=0.2):
        time.sleep(0.35)
    with status.status("A fast step", con, slow_s=0.2):
        pass
    (line,) = out.getvalue().splitlines()
    match = re.fullmatch(r"Dequantizing the embedded GGUF model: (\d+\.\d) s", line)
    assert match and 0.35 <= float(match.group(1)) < 5


def test_terminal_shows_a_live_status_with_the_elapsed_time():
    con, out = console(terminal=True)
    with status.status("Loading the base model", con, slow_s=0.5) as stage:
        time.sleep(1.3)
        stage.update(3, 8)
        time.sleep(0.3)
    screen = out.getvalue()
    # The live line, redrawn while the step ran: its text, the count, and the elapsed time ticking past 1 s.
    assert "Loading the base model" in screen and "3/8" in screen and "0:00:01" in screen
    assert re.search(r"Loading the base model: 1\.\d s", screen)  # then the line that stays
    assert status._board is None  # the live display is gone


def test_nested_stages_share_one_live_display_and_a_failure_prints_no_time():
    con, out = console(terminal=True)
    with status.status("outer", con, slow_s=0.0):
        with status.status("inner", con, slow_s=0.0):
            assert status._board is not None and len(status._board.tasks) == 2
    with pytest.raises(RuntimeError):
        with status.status("doomed", con, slow_s=0.0):
            raise RuntimeError("boom")
    screen = out.getvalue()
    assert re.search(r"inner: \d\.\d s", screen) and re.search(r"outer: \d\.\d s", screen)
    assert not re.search(r"doomed: \d", screen) and status._board is None


def test_duration_text():
    assert [status.duration(s) for s in (4.24, 125, 3725)] == ["4.2 s", "2 min 05 s", "1 h 02 min"]


def test_training_display_shows_every_stage_of_a_real_run(tiny_model, tmp_path, monkeypatch):
    """Loading, tokenizing, validation, checkpoints, writing: each stage the trainer announces reaches the screen."""
    from afinar.train import run_training

    from conftest import tiny_config

    monkeypatch.setattr(status, "SLOW_S", -1.0)  # every stage counts as slow, so each prints its line
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(tmp_path / "val.jsonl", qa_rows(QA[6:]))
    cfg = tiny_config(tiny_model, "train.max_steps=2", "train.eval_every=2", "train.save_every=1", train=train, val=val)
    con, out = console(terminal=False)
    seen = []
    display = TrainingDisplay(con, log_every=1)
    run_training(cfg, tmp_path / "run", on_event=lambda e: (seen.append(e), display(e)))
    lines = out.getvalue().splitlines()
    for text in (f"Loading the base model {tiny_model}", "Tokenizing 6 training and 2 validation examples",
                 "saving a checkpoint", "validation", "saving the best adapter", "Writing the run folder"):
        assert any(re.fullmatch(rf"\s*{re.escape(text)}: \d+\.\d s", line) for line in lines), (text, lines)
    # announced before the first step, in order; each announced stage ends
    stages = [e.stage for e in seen if isinstance(e, events.Status) and not e.done]
    assert stages[:2] == [f"Loading the base model {tiny_model}", "Tokenizing 6 training and 2 validation examples"]
    assert sorted(stages) == sorted(e.stage for e in seen if isinstance(e, events.Status) and e.done)


def test_training_display_puts_a_stage_in_the_bar_while_it_runs():
    con, out = console(terminal=True)
    display = TrainingDisplay(con)
    device = {"device": "cpu", "compute_dtype": "float32"}
    memory = dict.fromkeys(("total", "weights", "lora", "framework", "optimizer", "activations", "available"), 1.0)
    display(events.Start(total_steps=4, train_examples=8, val_examples=2, truncated=0, dropped=0, warmup_steps=1,
                         device=device, memory_estimate_mb=memory))
    display(events.Status("validation"))
    time.sleep(0.3)  # the bar refreshes 10 times a second
    display(events.Status("validation", done=True, seconds=2.5))
    display(events.Done(output="runs/x", train_time_s=1.0, tokens_per_s=10.0, final_val_loss=0.5))
    screen = out.getvalue()
    assert "validation..." in screen and "validation: 2.5 s" in screen
