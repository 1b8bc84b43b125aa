"""`train.report_to`: TensorBoard and W&B (offline) get the figures of metrics.jsonl, read back by their own readers."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from afinar import events
from afinar.errors import AfinarError

from conftest import qa_rows, write_jsonl

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

# metrics.jsonl field -> the name each sink logs it under (what a user finds in TensorBoard / W&B)
STEP_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
             "memory_mb": "train/memory_mb", "peak_memory_mb": "train/peak_memory_mb", "epoch": "train/epoch"}
EVAL_TAGS = {"val_loss": "eval/val_loss", "best_val_loss": "eval/best_val_loss"}


def expected(run) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the run's metrics.jsonl."""
    want: dict[str, dict[int, float]] = {}
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        tags = STEP_TAGS if record["event"] == "step" else EVAL_TAGS if record["event"] == "eval" else {}
        for field, tag in tags.items():
            want.setdefault(tag, {})[record["step"]] = record[field]
    return want


def tensorboard_events(folder) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows them (its own reader, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    return {tag: dict(points) for tag, points in tensorboard_events(folder).items()}


def wandb_records(path):
    """The records of a W&B run file (`run-ID.wandb`): a W&B header, then LevelDB-log records in 32 KiB blocks."""
    raw = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        else:  # LAST
            yield pending + chunk


def wandb_history(run_dir) -> dict[str, dict[int, float]]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "run-*.wandb"))
    out: dict[str, dict[int, float]] = {}
    for raw in wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for key, value in row.items():
            if not key.startswith("_"):
                out.setdefault(key, {})[row["_step"]] = value
    return out


@pytest.fixture(scope="module")
def logged_run(tiny_model, tmp_path_factory):
    from afinar.train import run_training

    from conftest import QA, tiny_config

    root = tmp_path_factory.mktemp("logging")
    train = write_jsonl(root / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(root / "val.jsonl", qa_rows(QA[6:]))
    cfg = tiny_config(tiny_model, "train.max_steps=4", "train.eval_every=2", "train.report_to=[tensorboard, wandb]",
                      train=train, val=val)
    mp = pytest.MonkeyPatch()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb-home"), "WANDB_SILENT": "true",
                       "WANDB_PROJECT": "afinar-test"}.items():
        mp.setenv(key, value)
    (root / "wandb-home").mkdir()
    try:
        run = run_training(cfg, root / "run").output
    finally:
        mp.undo()
    return root, run


def test_tensorboard_holds_the_metrics(logged_run):
    _, run = logged_run
    want = expected(run)
    assert set(want) == set(STEP_TAGS.values()) | set(EVAL_TAGS.values()) and sorted(want["train/loss"]) == [1, 2, 3, 4]
    got = tensorboard_scalars(run / "tensorboard")
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert got[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # stored as float32


def test_wandb_offline_history_holds_the_metrics(logged_run):
    root, run = logged_run
    (run_dir,) = [p for p in (root / "wandb-home" / "wandb").glob("offline-run-*") if p.is_dir()]
    got = wandb_history(run_dir)
    for tag, by_step in expected(run).items():
        assert got[tag] == pytest.approx(by_step), tag


def test_resumed_run_hides_lost_steps_in_tensorboard(tiny_model, tmp_path, monkeypatch):
    """Steps logged after the last checkpoint died with the crash: a resume purges them, as metrics.jsonl does."""
    from afinar.train import run_training

    from conftest import QA, Boom, crash_on_step, tiny_config

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(QA[:6]))
    cfg = tiny_config(tiny_model, "train.max_steps=4", "train.save_every=2", "train.report_to=[tensorboard]", train=train)
    calls = crash_on_step(monkeypatch, 4)
    with pytest.raises(Boom):
        run_training(cfg, tmp_path / "run")
    # Step 3 was logged, then lost (the checkpoint is at step 2); the resume runs steps 3 and 4 again.
    monkeypatch.undo()
    assert calls["n"] == 4
    run = run_training(cfg, tmp_path / "run", resume=True).output
    shown = tensorboard_events(run / "tensorboard")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per process
    assert [step for step, _ in shown["train/loss"]] == [1, 2, 3, 4]  # the lost step 3 once, not twice
    want = expected(run)["train/loss"]
    assert [value for _, value in shown["train/loss"]] == pytest.approx([want[s] for s in (1, 2, 3, 4)], rel=1e-6)


def test_missing_library_is_a_clear_error(make_cfg, monkeypatch, tmp_path):
    import importlib.util

    from afinar import sinks
    from afinar.train import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(AfinarError, match=r"train.report_to includes 'wandb'.*pip install 'afinar\[logging\]'"):
        Trainer(make_cfg("train.report_to=[wandb]"), tmp_path / "run")
    assert sinks.scalars(events.Eval(step=1, val_loss=0.5, best_val_loss=0.25)) == {
        "eval/val_loss": 0.5, "eval/best_val_loss": 0.25}
