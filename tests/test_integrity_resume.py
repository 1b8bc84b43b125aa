"""What a resume must not take on trust: changed data or base model, a config the checkpoints do not fit,
a best adapter that is missing, damaged or from a replayed timeline; and what the run's neighbours
(RUN.partial, RUN.old, RUN.lock) tell a user who asks for a run that is not there. Tiny model, CPU."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afinar import checkpoints, events as E, runlock, runs, schedule
from afinar.cli import app
from afinar.errors import AfinarError
from afinar.train import run_training
from afinar.verify import verify_run
from conftest import CHECKPOINTED, QA, crash, qa_rows, tiny_config, write_jsonl

@pytest.fixture(scope="module")
def cfg(tiny_model, data_files):
    train, val = data_files
    return tiny_config(tiny_model, *CHECKPOINTED, train=train, val=val)


@pytest.fixture(scope="module")
def crashed(cfg, tmp_path_factory) -> Path:
    """`.partial/` of a run that crashed at step 7: checkpoints at steps 2, 4 and 6, best/ from step 6."""
    partial = crash(cfg, tmp_path_factory.mktemp("crashed") / "run", 7)
    assert [s for s, _ in checkpoints.step_checkpoints(partial)] == [2, 4, 6]
    assert checkpoints.best(partial)[0]["step"] == 6  # the validation loss falls at every check
    return partial


@pytest.fixture
def out(crashed, tmp_path) -> Path:
    """A private copy of the crashed run, as the --output to resume."""
    shutil.copytree(crashed, tmp_path / "run.partial")
    return tmp_path / "run"


def best_dir(out: Path) -> Path:
    return checkpoints.folder(runs.partial(out)) / checkpoints.BEST


def metadata(run: Path) -> dict:
    return json.loads((run / "metadata.json").read_text())


def notices(events: list) -> str:
    return " | ".join(e.message for e in events if isinstance(e, E.Notice))


def before_training(events: list) -> list:
    """The events up to the first step of the resumed training."""
    first = next(i for i, e in enumerate(events) if isinstance(e, E.Step))
    return events[:first]


@pytest.fixture
def worse_validation(monkeypatch):
    """Every validation check after the resume scores worse than the run's best so far."""
    monkeypatch.setattr(schedule, "validation_loss", lambda *args, **kwargs: 99.0)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="afinar")


# ---------------------------------------------------------------- 1. the inputs, not only the config


def test_resume_refuses_training_data_changed_at_the_same_path(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "data" / "train.jsonl", qa_rows(QA[:6]))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", qa_rows(QA[6:]))
    cfg = tiny_config(tiny_model, *CHECKPOINTED, train=train, val=val)
    out = tmp_path / "run"
    crash(cfg, out, 7)
    old = runs.file_sha256(train)
    write_jsonl(train, qa_rows(QA[:5] + QA[7:]))  # same path, other content
    new = runs.file_sha256(train)

    with pytest.raises(AfinarError) as err:
        run_training(cfg, out, resume=True)
    said = str(err.value)
    assert f"data.train {train}" in said and old[:12] in said and new[:12] in said
    assert "--force" in said and f"restore {train}" in said
    assert "data.val" not in said  # unchanged

    resumed = run_training(cfg, out, resume=True, force=True).output
    recorded = metadata(resumed)["data"]["train"]
    assert recorded["sha256"] == new
    assert recorded["earlier_sha256"] == [{"sha256": old, "until_step": 6}]  # steps 1-6 trained on the old file
    assert "earlier_sha256" not in metadata(resumed)["data"]["val"]
    assert not (resumed / runs.INPUTS).exists()  # only in the unfinished run


def test_resume_refuses_a_base_model_changed_at_the_same_path(tiny_model, data_files, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = tiny_config(model, *CHECKPOINTED, train=data_files[0], val=data_files[1])
    out = tmp_path / "run"
    crash(cfg, out, step=3)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0}))  # still loads, computes otherwise

    with pytest.raises(AfinarError, match=rf"model\.base {model} changed since the run started .*--force"):
        run_training(cfg, out, resume=True)
    resumed = run_training(cfg, out, resume=True, force=True).output
    assert metadata(resumed)["base_model"]["earlier_fingerprint"][0]["until_step"] == 2


# ---------------------------------------------------------------- 2. a forced change the checkpoints do not fit


def test_a_forced_rank_change_is_named_and_leaves_the_run_resumable(cfg, out, tiny_model, data_files):
    saved = runs.partial(out) / runs.TRAINING_CONFIG
    before = saved.read_bytes()
    events = []
    other = tiny_config(tiny_model, *CHECKPOINTED, "lora.rank=16", train=data_files[0], val=data_files[1])
    with pytest.raises(AfinarError) as err:
        run_training(other, out, resume=True, force=True, on_event=events.append)
    said = str(err.value)
    assert err.value.exit_code == 2
    assert "lora.rank 8 -> 16: the checkpoints hold rank-8 weights" in said and "--set lora.rank=8" in said
    assert "damaged" not in said
    assert saved.read_bytes() == before  # the run still says rank 8
    assert [s for s, _ in checkpoints.step_checkpoints(runs.partial(out))] == [2, 4, 6]  # nothing removed
    assert not [e for e in events if isinstance(e, E.Crashed)]  # no "Continue with: --resume" that would fail again

    assert run_training(cfg, out, resume=True).output.is_dir()  # plain resume still works


# ---------------------------------------------------------------- 3-5. the best adapter on resume


def test_a_kill_inside_the_best_swap_restores_the_previous_best(out, cfg, worse_validation):
    best = best_dir(out)
    step = json.loads((best / checkpoints.BEST_INFO).read_text())["step"]
    os.replace(best, best.with_name(".best.old"))  # moved aside; the new one never landed
    events = []
    resumed = run_training(cfg, out, resume=True, on_event=events.append).output
    assert f"restored {best}/" in notices(before_training(events))
    meta = metadata(resumed)
    assert meta["adapter_source"] == "best" and meta["adapter_step"] == step


def test_a_lost_best_ships_the_last_adapter_and_says_so(out, cfg, worse_validation):
    shutil.rmtree(best_dir(out))
    events = []
    resumed = run_training(cfg, out, resume=True, on_event=events.append).output
    assert "the best adapter so far (step 6" in notices(before_training(events))
    meta = metadata(resumed)
    assert meta["adapter_source"] == "last" and meta["adapter_step"] == 8
    assert "train.final_adapter is 'best', but the best adapter (step 6" in meta["adapter_note"]


def test_a_best_newer_than_the_resumed_checkpoint_is_discarded(out, cfg, worse_validation):
    step6 = checkpoints.folder(runs.partial(out)) / "step_0000006"
    optimizer = next(p for p in step6.iterdir() if p.name.startswith("optimizer"))
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # resume falls back to step 4; best/ is step 6's
    events = []
    resumed = run_training(cfg, out, resume=True, on_event=events.append).output
    said = notices(before_training(events))
    assert "best adapter of step 6, after the checkpoint resumed from (step 4)" in said and "discarded" in said
    meta = metadata(resumed)
    # Step 6 of the replayed training scored 99: the discarded best's loss is in no record of this run.
    assert meta["adapter_source"] == "last" and meta["adapter_step"] == 8


def test_a_damaged_best_is_handled_before_training(out, cfg):
    adapter = best_dir(out) / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-7] ^= 0xFF
    adapter.write_bytes(bytes(data))
    events = []
    resumed = run_training(cfg, out, resume=True, on_event=events.append).output  # not CheckpointDamaged at the end
    assert "adapter_model.safetensors changed" in notices(before_training(events))
    assert "discarded" in notices(before_training(events))
    assert not [e for e in events if isinstance(e, E.Crashed)]
    assert metadata(resumed)["adapter_step"] == 8  # the replayed step 8 beats the lost best of step 6


# ---------------------------------------------------------------- 6. --overwrite


@pytest.fixture(scope="module")
def finished(cfg, tmp_path_factory) -> Path:
    return run_training(cfg, tmp_path_factory.mktemp("finished") / "run").output


def test_an_overwrite_cut_between_its_renames_is_named_and_cleaned_up(out, cfg, finished):
    old = out.with_name("run.old")
    shutil.copytree(finished, old)  # the previous run moved aside, the new one (unfinished here) not yet in place
    with pytest.raises(AfinarError) as err:
        verify_run(out)
    said = str(err.value)
    assert f"{old} holds the run it replaces" in said and f"afinar train --resume {out}" in said
    assert "--output" not in said

    run_training(cfg, out, resume=True)
    assert verify_run(out) and not old.exists()


def test_overwrite_refuses_a_file_as_output(cfg, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(AfinarError, match=rf"--output {target} is a file, not a run folder") as err:
            run_training(cfg, target, overwrite=overwrite)
        assert "--overwrite" not in str(err.value)  # that would not help
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no notes.txt.old, .partial or .lock


def test_overwrite_replaces_only_runs_and_never_the_folder_it_works_in(cfg, finished, tmp_path, monkeypatch):
    mine = tmp_path / "userdir"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(AfinarError, match="is not one"):
        run_training(cfg, mine, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "precious"
    (tmp_path / "a.old").mkdir()
    (tmp_path / "a.old" / "backup.txt").write_text("mine")
    with pytest.raises(AfinarError, match="is not an afinar run"):
        run_training(cfg, tmp_path / "a")
    assert (tmp_path / "a.old" / "backup.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    monkeypatch.chdir(mine)
    for here in (".", "..", str(mine)):
        with pytest.raises(AfinarError, match="the current folder or one above it"):
            run_training(cfg, Path(here), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.old", "userdir"]
    # a run is still replaced by --overwrite
    again = shutil.copytree(finished, tmp_path / "again")
    assert run_training(cfg, again, overwrite=True).output == again and runs.is_run(again)


# ---------------------------------------------------------------- 7. a run that is not there (yet)


def test_an_unfinished_run_points_at_resume(out):
    with pytest.raises(AfinarError) as err:
        verify_run(out)
    said = str(err.value)
    assert f"{runs.partial(out)} holds a run that did not finish" in said
    assert said.endswith(f"Continue it with: afinar train --resume {out}") and "--output" not in said
    result = invoke("ask", out, "Onde joga o Farense?")
    assert result.exit_code == 2 and f"afinar train --resume {out}" in json.loads(result.stderr)["error"]["message"]


def test_a_run_being_trained_names_its_process(out):
    with runlock.acquire(out, command="afinar train -o run"):
        with pytest.raises(AfinarError) as err:
            verify_run(out)
    said = str(err.value)
    assert f"being trained now by PID {os.getpid()} (afinar train -o run" in said
    assert "did not finish" not in said


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="zombies are told apart through /proc (Linux)")
def test_a_lock_file_naming_an_ended_process_is_not_a_run_being_trained(out):
    import subprocess
    import time

    child = subprocess.Popen(["true"])
    stat = Path(f"/proc/{child.pid}/stat")
    for _ in range(200):  # ended, not yet reaped (a zombie): as after a SIGKILL until the parent waits
        if not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            break
        time.sleep(0.01)
    runlock.lock_path(out).write_text(json.dumps({"pid": child.pid, "command": "afinar train -o run"}))
    try:
        with pytest.raises(AfinarError, match=f"did not finish.*--resume {out}"):
            verify_run(out)
    finally:
        child.wait()
