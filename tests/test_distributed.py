"""Several processes (torchrun, gloo on CPU) train exactly what one process trains with the same global batch.

The real `afinar train` command runs under `torchrun --standalone --nproc-per-node 2` on the
tiny model in fp32 (LoRA dropout 0, so the step is deterministic): the adapter must equal a
single-process run's, only rank 0 may write (an audit hook records every file write of each
rank), and a run interrupted in one process resumes in two, under FSDP. 7 examples in
micro-batches of 2 leave one micro-batch of a single example per epoch, so the zero-weight
pass of a process without a share is exercised too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import QA, crash_on_step, qa_rows, tiny_config, write_jsonl

from afinar import distributed
from afinar.distributed import World
from afinar.errors import AfinarError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the `torchrun` script runs

# Runs `afinar train` in each process; records the file writes each rank makes under WATCH.
LAUNCHER = """
import atexit, json, os, sys
rank, watch, writes = os.environ["RANK"], os.environ["AFINAR_TEST_WATCH"], []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move"):
        path, writing = args[0], True
    else:
        return
    if writing and isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(watch):
        writes.append([event, os.fspath(path)])

sys.addaudithook(audit)
atexit.register(lambda: open(os.path.join(os.environ["AFINAR_TEST_LOG"], f"writes-{rank}.json"), "w").write(json.dumps(writes)))
from afinar.cli import app
sys.argv[0] = "afinar"
app()
"""

SETTINGS = ["lora.dropout=0", "train.max_steps=6", "train.eval_every=2", "train.save_every=2",
            "train.final_adapter=last", "train.batch_size=2", "train.grad_accumulation=1"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """Data, config and the single-process reference run, shared by the tests below."""
    from afinar.train import run_training

    root = tmp_path_factory.mktemp("dist")
    train = write_jsonl(root / "data" / "train.jsonl", qa_rows(QA[:7]))
    val = write_jsonl(root / "data" / "val.jsonl", qa_rows(QA[7:]))
    cfg = tiny_config(tiny_model, *SETTINGS, train=train, val=val)
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    reference = run_training(cfg, root / "runs" / "one").output
    return root, cfg, config_file, reference


def torchrun(root: Path, *args: str, nproc: int = 2) -> dict[str, list]:
    """`afinar train ARGS` in `nproc` processes; the writes each rank made under root/runs."""
    launcher = root / "launch.py"
    launcher.write_text(LAUNCHER)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    for old in logs.glob("writes-*.json"):
        old.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AFINAR_TEST_WATCH": str(root / "runs"), "AFINAR_TEST_LOG": str(logs)}
    done = subprocess.run([*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", str(launcher), "train", *args],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {p.stem.removeprefix("writes-"): json.loads(p.read_text()) for p in logs.glob("writes-*.json")}


def assert_same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(x) == sorted(y)
    assert max(float(x[k].abs().max()) for k in x if "lora_B" in k) > 1e-3  # it did train
    for k in x:
        assert float((x[k] - y[k]).abs().max()) < 1e-5, k


def step_losses(run: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in rows for key in ("loss", "val_loss") if key in r]


def test_two_processes_train_the_same_adapter_and_only_rank_0_writes(setup):
    root, cfg, config_file, reference = setup
    out = root / "runs" / "two"
    writes = torchrun(root, "--config", str(config_file), "-o", str(out))
    assert_same_adapter(reference, out)
    ref_losses, losses = step_losses(reference), step_losses(out)
    assert [row[:2] for row in losses] == [row[:2] for row in ref_losses]  # each step and validation logged once
    assert [row[2] for row in losses] == pytest.approx([row[2] for row in ref_losses], rel=1e-5)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step_0000002", "step_0000004"]
    assert writes["0"] and writes["1"] == []  # the hook saw rank 0 write, and rank 1 write nothing


def test_a_run_interrupted_in_one_process_resumes_in_two_with_fsdp(setup, monkeypatch):
    """One launch for two claims (each launch costs ~10 s of imports): resume across process
    counts, and FSDP (the base sharded, LoRA replicated) computing the same steps."""
    from afinar.train import run_training

    root, cfg, config_file, reference = setup
    out = root / "runs" / "resumed"
    crash_on_step(monkeypatch, 5)
    with pytest.raises(Exception, match="simulated crash"):
        run_training(cfg, out)
    assert (out.with_name("resumed.partial") / "checkpoints" / "step_0000004").is_dir()
    monkeypatch.undo()
    writes = torchrun(root, "--resume", str(out), "--config", str(config_file),
                      "--set", "distributed.strategy=fsdp", "--force")
    assert_same_adapter(reference, out)
    assert json.loads((out / "metadata.json").read_text())["resumed_from_step"] == 4
    assert json.loads((out / "training_config.json").read_text())["distributed"]["strategy"] == "fsdp"
    assert writes["0"] and writes["1"] == []


def test_shard_takes_every_example_of_a_step_once():
    step = [[1, 2, 3], [4, 5], [6]]
    for size in (1, 2, 3, 4):
        shares = [distributed.shard(step, World(rank, size)) for rank in range(size)]
        assert sorted(x for share in shares for mb in share for x in mb) == [1, 2, 3, 4, 5, 6]
        assert len({len(share) for share in shares}) == 1  # as many passes on every process
    assert distributed.shard([[1, 2], [3, 4]], World(1, 2)) == [[3, 4]]  # whole micro-batches when they divide
    assert distributed.shard(step, World(1, 2)) == [[2], [5], []]  # else split; an empty piece is a zero-weight pass


def test_world_from_environment():
    assert distributed.from_env({}) == distributed.SINGLE
    assert distributed.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    with pytest.raises(AfinarError, match="RANK=2, WORLD_SIZE=2"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(AfinarError, match="WORLD_SIZE='two'"):
        distributed.from_env({"WORLD_SIZE": "two"})
