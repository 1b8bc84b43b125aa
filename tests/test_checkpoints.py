"""Checkpoints, best adapter, exact resume (in-process and after SIGKILL), early stopping,
divergence guard and Ctrl-C, on the tiny model in fp32 on CPU."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from afinar import checkpoints, events as E, rng
from afinar.backends.torch_train import TorchTrainer
from afinar.errors import AfinarError
from afinar.train import TrainingInterrupted, run_training
from conftest import QA, REPO, Boom, crash_on_step, qa_rows, write_jsonl

# Dropout on, so an exact resume also needs the RNG state restored.
BASE = ("train.max_steps=8", "train.save_every=2", "train.eval_every=2", "train.keep_checkpoints=2",
        "lora.dropout=0.1", "train.divergence_factor=0")
DETERMINISTIC = ("event", "step", "loss", "lr", "grad_norm", "tokens", "val_loss", "best_val_loss", "best")


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics(run, after: int = 0) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in DETERMINISTIC if k in r} for r in rows if r.get("step", 0) > after]




def test_checkpoint_folders_best_and_final_adapter(make_cfg, qa_files, tmp_path):
    train, val = qa_files
    run = run_training(make_cfg(*BASE, train=train, val=val), tmp_path / "run").output
    saved = checkpoints.step_checkpoints(run)
    assert [s for s, _ in saved] == [4, 6]  # every 2 steps, the newest 2 kept; none at the last step (the run itself)
    for _, folder in saved:
        assert {p.name for p in folder.iterdir()} == {
            "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", rng.FILE, "trainer_state.json",
            "manifest.json"}
    best_info, best_dir = checkpoints.best(run)
    evals = [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    lowest = min(evals, key=lambda r: r["val_loss"])
    assert best_info["step"] == lowest["step"]
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["adapter_source"] == "best" and meta["adapter_step"] == lowest["step"]
    assert max_diff(adapter(run), load_file(str(best_dir / "adapter_model.safetensors"))) == 0


def test_final_adapter_last(make_cfg, qa_files, tmp_path):
    train, val = qa_files
    run = run_training(make_cfg(*BASE, "train.final_adapter=last", train=train, val=val), tmp_path / "run").output
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["adapter_source"] == "last" and meta["adapter_step"] == 8


def test_resume_after_crash_equals_uninterrupted_run(make_cfg, qa_files, tmp_path, monkeypatch):
    train, val = qa_files
    cfg = make_cfg(*BASE, train=train, val=val)
    straight = run_training(cfg, tmp_path / "straight").output

    out = tmp_path / "crashed"
    crash_on_step(monkeypatch, 7)
    with pytest.raises(Boom):
        run_training(cfg, out)
    monkeypatch.undo()
    partial = out.with_name("crashed.partial")
    assert [s for s, _ in checkpoints.step_checkpoints(partial)] == [4, 6]  # kept for resume
    with pytest.raises(AfinarError, match="--resume"):
        run_training(cfg, out)  # a fresh start would destroy the checkpoints

    resumed = run_training(cfg, out, resume=True).output
    assert max_diff(adapter(resumed), adapter(straight)) <= 1e-6
    assert metrics(resumed) == metrics(straight)
    assert json.loads((resumed / "metadata.json").read_text())["resumed_from_step"] == 6


def test_resume_refuses_a_different_config_unless_forced(make_cfg, qa_files, tmp_path, monkeypatch):
    train, val = qa_files
    out = tmp_path / "run"
    crash_on_step(monkeypatch, 5)
    with pytest.raises(Boom):
        run_training(make_cfg(*BASE, train=train, val=val), out)
    monkeypatch.undo()
    other = make_cfg(*BASE, "train.learning_rate=5e-4", train=train, val=val)
    with pytest.raises(AfinarError, match=r"train\.learning_rate: 0\.001 -> 0\.0005"):
        run_training(other, out, resume=True)
    assert run_training(other, out, resume=True, force=True).output.is_dir()


def test_nothing_to_resume(make_cfg, qa_files, tmp_path):
    train, _ = qa_files
    with pytest.raises(AfinarError, match="Nothing to resume"):
        run_training(make_cfg(train=train), tmp_path / "none", resume=True)


def test_early_stopping_keeps_the_best(make_cfg, qa_files, tmp_path):
    train, val = qa_files
    # A learning rate too small to change fp32 weights: validation never improves after the first check.
    cfg = make_cfg("train.max_steps=20", "train.eval_every=1", "train.warmup_steps=0", "train.learning_rate=1e-20",
                   "train.early_stopping_patience=2", train=train, val=val)
    run = run_training(cfg, tmp_path / "run").output
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["stopped"]["reason"] == "early_stopping"
    assert meta["steps"] == 3 and meta["planned_steps"] == 20
    assert meta["adapter_step"] == 1 and meta["adapter_source"] == "best"


def test_divergence_stops_keeps_best_and_advises(make_cfg, qa_files, tmp_path, monkeypatch):
    train, val = qa_files
    original = TorchTrainer.forward_backward
    calls = {"n": 0}

    def forward_backward(self, batch, scale):
        calls["n"] += 1
        loss, n = original(self, batch, scale)
        return (loss * 100 if calls["n"] >= 5 else loss), n  # the loss explodes at step 5

    monkeypatch.setattr(TorchTrainer, "forward_backward", forward_backward)
    cfg = make_cfg("train.max_steps=10", "train.eval_every=2", train=train, val=val)
    events = []
    run = run_training(cfg, tmp_path / "run", on_event=events.append).output
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["stopped"]["reason"] == "diverged" and meta["stopped"]["step"] == 5
    assert "train.learning_rate=0.0005" in meta["stopped"]["message"] and "train.warmup_steps=10" in meta["stopped"]["message"]
    assert meta["adapter_source"] == "best" and meta["adapter_step"] == 4
    assert any(isinstance(e, E.Stopped) for e in events)


def test_sigint_saves_a_checkpoint_and_resumes_exactly(make_cfg, qa_files, tmp_path, monkeypatch):
    train, val = qa_files
    cfg = make_cfg(*BASE, "train.save_every=0", train=train, val=val)
    straight = run_training(cfg, tmp_path / "straight").output

    original = TorchTrainer.optimizer_step
    calls = {"n": 0}

    def optimizer_step(self, lr):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        return original(self, lr)

    monkeypatch.setattr(TorchTrainer, "optimizer_step", optimizer_step)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=f"--resume {out}"):
        run_training(cfg, out)
    monkeypatch.undo()
    assert [s for s, _ in checkpoints.step_checkpoints(out.with_name("run.partial"))] == [3]
    resumed = run_training(cfg, out, resume=True).output
    assert max_diff(adapter(resumed), adapter(straight)) <= 1e-6


def _cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "afinar.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(QA * 2))
    val = write_jsonl(tmp_path / "val.jsonl", qa_rows(QA[:3]))
    args = ["--set", f"model.base={tiny_model}", "--set", "model.quantization=none", "--set", "train.batch_size=2",
            "--set", "train.max_steps=12", "--set", "train.save_every=1", "--set", "train.eval_every=3",
            "--set", "train.warmup_steps=1", "--set", "lora.dropout=0.1", "--set", "train.divergence_factor=0",
            "--set", f"data.train={train}", "--set", f"data.val={val}"]
    straight = tmp_path / "straight"
    done = _cli("train", "--output", str(straight), *args)
    assert done.wait(timeout=300) == 0, done.stderr.read()

    kill_after = random.Random().randint(2, 10)
    out = tmp_path / "killed"
    proc = _cli("train", "--output", str(out), *args)
    metrics_file = out.with_name("killed.partial") / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.is_file() and sum(1 for line in metrics_file.read_text().splitlines() if '"loss"' in line) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill at step {kill_after}"
    assert not out.exists()

    resumed = _cli("train", "--resume", str(out))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert max_diff(adapter(out), adapter(straight)) <= 1e-6, f"killed after step {kill_after}"
    assert metrics(out) == metrics(straight)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(make_cfg, qa_files, tmp_path, monkeypatch):
    train, val = qa_files
    cfg = make_cfg("train.batch_size=4", "train.max_steps=4", "train.eval_every=4", "lora.dropout=0", train=train, val=val)
    straight = run_training(cfg, tmp_path / "straight").output

    original = TorchTrainer.forward_backward

    def forward_backward(self, batch, scale):
        if len(batch) > 1:  # this "device" only fits one example at a time
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(self, batch, scale)

    monkeypatch.setattr(TorchTrainer, "forward_backward", forward_backward)
    events = []
    run = run_training(cfg, tmp_path / "small", on_event=events.append).output
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["micro_batch_size"] == 1
    assert [(e["micro_batch"], e["grad_accumulation"]) for e in meta["out_of_memory_events"]] == [(2, 2), (1, 4)]
    assert [(e.micro_batch, e.grad_accumulation) for e in events if isinstance(e, E.OutOfMemory)] == [(2, 2), (1, 4)]
    # Same examples, same loss scale: the same adapter up to float summation order.
    assert max_diff(adapter(run), adapter(straight)) < 1e-5


def test_out_of_memory_at_one_example_gives_up_clearly(make_cfg, qa_files, tmp_path, monkeypatch):
    train, _ = qa_files
    monkeypatch.setattr(TorchTrainer, "forward_backward",
                        lambda self, batch, scale: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    out = tmp_path / "run"
    with pytest.raises(AfinarError, match="micro-batch of 1 example.*max_seq_length"):
        run_training(make_cfg("train.max_steps=2", train=train), out)
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_memory_estimate_is_reported(make_cfg, qa_files, tmp_path):
    train, _ = qa_files
    events = []
    run = run_training(make_cfg("train.max_steps=1", train=train), tmp_path / "run", on_event=events.append).output
    plan = next(e for e in events if isinstance(e, E.Start)).memory_estimate_mb  # after the loading stages
    assert set(plan) == {"weights", "lora", "framework", "optimizer", "activations", "total", "available"}
    assert plan["weights"] > plan["lora"] > 0 and plan["available"] > plan["total"] > 0
    parts = ("weights", "lora", "framework", "optimizer", "activations")
    assert plan["total"] == pytest.approx(sum(plan[k] for k in parts), abs=0.5)  # tests/test_memory.py: against a real peak
    assert json.loads((run / "metadata.json").read_text())["memory_estimate_mb"] == plan
