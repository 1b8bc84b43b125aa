"""Run folders that never lie: the run lock, checksummed checkpoints with fallback, leftovers of
interrupted writes, run verification before loading, and environment failures as clean errors.

Runs are real (the training loop on the tiny model, fp32 CPU), damaged the way a user's disk or
hands damage them. Tests marked `needs wiring` exercise the same mechanisms through `afinar train`
/ `ask` / `serve`; they pass once the loop and the CLI call them (see each reason).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from afinar import checkpoints, manifest, models, oserrors, rng, runlock
from afinar.backends import training_backend
from afinar.cli import app
from afinar.train import run_training
from afinar.verify import RunDamaged, verify_run
from conftest import CHECKPOINTED, REPO, crash, tiny_config



# ---------------------------------------------------------------- fixtures: real runs, built once


@pytest.fixture(scope="module")
def cfg(tiny_model, data_files):
    train, val = data_files
    return tiny_config(tiny_model, *CHECKPOINTED, train=train, val=val)


@pytest.fixture(scope="module")
def crashed(cfg, tmp_path_factory) -> Path:
    """`.partial/` of a run that crashed at step 7, with checkpoints at steps 2, 4 and 6."""
    partial = crash(cfg, tmp_path_factory.mktemp("crashed") / "run", 7)
    assert [s for s, _ in checkpoints.step_checkpoints(partial)] == [2, 4, 6]
    return partial


@pytest.fixture(scope="module")
def finished(cfg, tmp_path_factory) -> Path:
    return run_training(cfg, tmp_path_factory.mktemp("finished") / "run").output


@pytest.fixture(scope="module")
def backend(cfg):
    """A trainable tiny model: `restore(backend)` is the loader resume passes to `load_newest_valid`."""
    engine = training_backend(cfg)
    engine.load(models.resolve(cfg.model.base))
    return engine


def restore(backend):
    """What the trainer loads from a checkpoint: the backend's state and every RNG state."""
    def load(folder: Path) -> None:
        backend.load_state(folder)
        backend.set_rng_state(rng.load(folder))
    return load


@pytest.fixture
def partial(crashed, tmp_path) -> Path:
    """A private copy of the crashed run to damage."""
    copy = tmp_path / "run.partial"
    shutil.copytree(crashed, copy)
    return copy


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# ---------------------------------------------------------------- damage, as it happens


def ckpt(partial: Path, step: int) -> Path:
    return checkpoints.folder(partial) / f"step_{step:07d}"


def file_in(folder: Path, prefix: str) -> Path:
    """The checkpoint file whose name starts with `prefix` (backends name their optimizer/RNG files)."""
    return next(p for p in sorted(folder.iterdir()) if p.name.startswith(prefix))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def delete(path: Path) -> None:
    path.unlink()


def flip(path: Path) -> None:
    """Flip one byte near the end: inside the tensor data, so the file still parses."""
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def lora_weights(engine) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(engine.model).items()}


# ---------------------------------------------------------------- checkpoints: manifests and fallback


def test_every_checkpoint_has_a_manifest_that_matches(crashed):
    folders = [p for _, p in checkpoints.step_checkpoints(crashed)] + [checkpoints.folder(crashed) / "best"]
    for folder in folders:
        recorded = json.loads((folder / manifest.MANIFEST).read_text())["files"]
        assert set(recorded) == {p.name for p in folder.iterdir()} - {manifest.MANIFEST}
        assert manifest.verify(folder) == []
    found = checkpoints.latest(crashed)
    assert (found.step, found.verified, found.skipped, found.message()) == (6, True, [], None)


DAMAGE = [  # (file prefix, how, the words the report must use)
    ("adapter_model", truncate, "truncated"),
    ("adapter_model", empty, "empty"),
    ("adapter_model", flip, "changed"),
    ("optimizer", truncate, "truncated"),
    ("optimizer", empty, "empty"),
    ("trainer_state", truncate, "truncated"),
    ("trainer_state", empty, "empty"),
    ("rng_state", delete, "missing"),
]


@pytest.mark.parametrize("prefix,damage,kind", DAMAGE, ids=[f"{p}-{d.__name__}" for p, d, _ in DAMAGE])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(partial, backend, prefix, damage, kind):
    target = file_in(ckpt(partial, 6), prefix)
    damage(target)
    found = checkpoints.load_newest_valid(partial, restore(backend))
    assert (found.step, found.steps_lost, [s.step for s in found.skipped]) == (4, 2, [6])
    message = found.message()
    assert message.startswith(f"checkpoint step 6 is damaged ({target.name} {kind}")
    assert message.endswith("resuming from step 4: 2 steps lost")
    # Step 4 is what was loaded (not step 6's damaged or step 2's weights), and the damaged one is gone.
    expected = load_file(str(ckpt(partial, 4) / "adapter_model.safetensors"))
    loaded = lora_weights(backend)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert [s for s, _ in checkpoints.step_checkpoints(partial)] == [2, 4]


def test_two_damaged_checkpoints_count_every_lost_step(partial, backend):
    truncate(file_in(ckpt(partial, 6), "optimizer"))
    flip(file_in(ckpt(partial, 4), "adapter_model"))
    found = checkpoints.load_newest_valid(partial, restore(backend))
    assert found.step == 2 and found.steps_lost == 4
    assert "checkpoint step 6 is damaged (optimizer" in found.message()
    assert "checkpoint step 4 is damaged (adapter_model.safetensors changed" in found.message()


def test_no_valid_checkpoint_is_a_clean_error_that_changes_nothing(partial, backend):
    for step, prefix in ((2, "rng_state"), (4, "optimizer"), (6, "adapter_model")):
        empty(file_in(ckpt(partial, step), prefix))
    before = sorted(p.relative_to(partial) for p in partial.rglob("*"))
    with pytest.raises(checkpoints.NoValidCheckpoint) as err:
        checkpoints.load_newest_valid(partial, restore(backend))
    assert err.value.exit_code == 2
    for step, prefix in ((6, "adapter_model"), (4, "optimizer"), (2, "rng_state")):
        assert f"step {step} is damaged ({prefix}" in str(err.value)
    assert "--overwrite" in str(err.value)
    assert sorted(p.relative_to(partial) for p in partial.rglob("*")) == before


def test_a_load_error_after_the_manifest_matched_falls_back(partial, backend):
    """A library that no longer reads a file the manifest vouches for: the loader's error is damage too."""
    folder = ckpt(partial, 6)
    optimizer = file_in(folder, "optimizer")
    truncate(optimizer)
    manifest.write(folder)  # the manifest now matches the bad bytes
    assert manifest.verify(folder) == []
    found = checkpoints.load_newest_valid(partial, restore(backend))
    assert found.step == 4
    assert found.message().startswith("checkpoint step 6 is damaged (its files do not load: ")


def test_checkpoints_without_manifest_count_only_if_they_load(partial, backend):
    for _, folder in checkpoints.step_checkpoints(partial):
        (folder / manifest.MANIFEST).unlink()  # as written before manifests existed
    truncate(file_in(ckpt(partial, 6), "optimizer"))
    unchecked = checkpoints.latest(partial)  # without a loader nothing vouches for the files
    assert (unchecked.step, unchecked.verified) == (6, False)
    assert "has no manifest.json (written by an older afinar): its files were not checked" in unchecked.message()

    found = checkpoints.load_newest_valid(partial, restore(backend))
    assert (found.step, found.verified, found.loaded) == (4, False, True)
    assert found.message().startswith("checkpoint step 6 is damaged (its files do not load: ")
    assert "checkpoint step 4 has no manifest.json (written by an older afinar): its files load; " \
           "resuming from step 4: 2 steps lost" in found.message()


def test_out_of_memory_while_loading_is_not_damage(partial):
    def loader(folder):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    with pytest.raises(torch.OutOfMemoryError):
        checkpoints.load_newest_valid(partial, loader)
    assert [s for s, _ in checkpoints.step_checkpoints(partial)] == [2, 4, 6]


def test_damaged_best_adapter_is_named(partial):
    best = checkpoints.folder(partial) / "best"
    flip(best / "adapter_model.safetensors")
    with pytest.raises(checkpoints.CheckpointDamaged, match=r"best is damaged \(adapter_model\.safetensors changed.*"
                                                            r"afinar train --resume .*run\b"):
        checkpoints.best(partial)


def test_cleanup_removes_leftovers_of_interrupted_writes(partial):
    root = checkpoints.folder(partial)
    building = root / ".step_0000008.k2j4_x9q"  # atomic.folder's build folder, killed mid-write
    shutil.copytree(ckpt(partial, 6), building)
    swapped = root / ".best.old"  # killed between moving the old best aside and deleting it
    shutil.copytree(root / "best", swapped)
    half_file = partial / ".metadata.json.ab12cd34.tmp"  # atomic.write_bytes, killed before the rename
    half_file.write_text("{")
    keep = sorted(p for p in partial.rglob("*") if not any(x in p.parts for x in (building.name, swapped.name))
                  and p != half_file)
    size = sum(p.stat().st_size for d in (building, swapped) for p in d.rglob("*")) + 1

    left = checkpoints.cleanup_partial_writes(partial)
    assert sorted(left.paths) == sorted([building, swapped, half_file]) and left.bytes == size
    assert left.message().startswith("removed 3 temporary file(s) left by interrupted writes")
    assert sorted(partial.rglob("*")) == keep
    assert checkpoints.cleanup_partial_writes(partial).message() is None


# ---------------------------------------------------------------- environment failures


class _NoSpaceBackend:
    """Forwards to a real backend, but the disk fills while it writes the checkpoint."""

    def __init__(self, real, error: Exception):
        self.real, self.error = real, error

    def save_state(self, folder: Path) -> None:
        self.real.save_adapter(folder)  # part of it is written, then the disk is full
        raise self.error


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
], ids=["ENOSPC", "torch-unexpected-pos", "torch-stream-writer"])
def test_full_disk_during_a_checkpoint_is_a_clean_error(partial, backend, error):
    before = sorted(partial.rglob("*"))
    state = json.loads((ckpt(partial, 6) / "trainer_state.json").read_text()) | {"step": 8}
    with pytest.raises(oserrors.EnvironmentFailure) as err:
        checkpoints.save(partial, _NoSpaceBackend(backend, error), state, keep=3)
    assert err.value.exit_code == 3 and err.value.reason == oserrors.NO_SPACE
    assert "No space left on the disk holding" in str(err.value) and "MB free there now" in str(err.value)
    assert str(err.value).endswith(f"afinar train --resume {partial.with_name('run')}")
    assert sorted(partial.rglob("*")) == before  # no half checkpoint, no temporary folder


def test_run_folder_removed_while_training(partial, backend):
    shutil.rmtree(partial)
    with pytest.raises(oserrors.EnvironmentFailure, match="was removed while training") as err:
        checkpoints.save(partial, backend, {"step": 8, "loop": {}}, keep=3)
    assert (err.value.exit_code, err.value.reason) == (3, oserrors.RUN_REMOVED)
    assert not partial.exists()  # not quietly recreated with a lone checkpoint in it


@pytest.mark.parametrize("error,reason,words", [
    (OSError(errno.EROFS, "Read-only file system"), oserrors.READ_ONLY, "filesystem is read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), oserrors.NO_PERMISSION, "No permission to write"),
    (OSError(errno.EPERM, "Operation not permitted"), oserrors.NO_PERMISSION, "No permission to write"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), oserrors.NO_SPACE, "No space left"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                  "\"No space left on device\" })"), oserrors.NO_SPACE, "No space left"),
], ids=["EROFS", "EACCES", "EPERM", "EDQUOT", "safetensors-ENOSPC"])
def test_environment_errors_map_to_clean_errors(tmp_path, error, reason, words):
    target = tmp_path / "runs" / "x.partial" / "metrics.jsonl"
    with pytest.raises(oserrors.EnvironmentFailure) as err:
        with oserrors.writing(target):
            raise error
    assert (err.value.reason, err.value.exit_code, err.value.path) == (reason, 2, target)
    assert words in str(err.value) and str(target) in str(err.value)
    assert err.value.__cause__ is error


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(KeyError):
        with oserrors.writing(tmp_path / "x"):
            raise KeyError("a bug")
    with pytest.raises(FileNotFoundError):  # the run folder still exists: not "removed while training"
        with oserrors.writing(tmp_path / "x" / "y", run=tmp_path, mid_run=True):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")


# ---------------------------------------------------------------- the run lock


def test_output_under_a_regular_file_is_a_clean_error(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    for output in (blocker / "run", blocker / "deeper" / "run"):
        with pytest.raises(oserrors.EnvironmentFailure) as err:
            runlock.acquire(output)
        assert err.value.exit_code == 2 and err.value.reason == oserrors.NOT_A_FOLDER
        assert f"{blocker} is a regular file, not a folder" in str(err.value)


def test_lock_is_exclusive_names_the_holder_and_cleans_up(tmp_path):
    out = tmp_path / "run"
    lock = runlock.acquire(out, command="afinar train --output run")
    assert runlock.holder(out)["pid"] == os.getpid()
    with pytest.raises(runlock.RunLocked, match=rf"PID {os.getpid()}: afinar train --output run") as err:
        runlock.acquire(out)
    assert err.value.exit_code == 2
    lock.release()
    assert not runlock.lock_path(out).exists()
    with runlock.acquire(out):
        pass


LOCKER = r"""
import os, sys, time
from pathlib import Path
from afinar import runlock
from afinar.errors import AfinarError
out, go, release = map(Path, sys.argv[1:4])
while not go.exists():
    time.sleep(0.001)
try:
    lock = runlock.acquire(out, command="locker")
except AfinarError as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
partial = out.with_name(out.name + ".partial")
partial.mkdir()
(partial / "writer.txt").write_text(str(os.getpid()))
print("locked", flush=True)
while not release.exists():
    time.sleep(0.01)
lock.release()
"""


def _python(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_race_one_wins_the_loser_exits_2_naming_it(tmp_path):
    out, go, release = tmp_path / "run", tmp_path / "go", tmp_path / "release"
    procs = [_python(LOCKER, out, go, release) for _ in range(2)]
    time.sleep(0.5)  # both are waiting at the start line
    go.touch()
    deadline = time.time() + 30
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.01)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    loser_err = loser.stderr.read()
    assert loser.returncode == 2, loser_err
    assert f"PID {winner.pid}: locker" in loser_err
    assert winner.stdout.readline().strip() == "locked"
    # Only the winner wrote: its file, its PID in the lock.
    partial = out.with_name("run.partial")
    assert [p.name for p in partial.iterdir()] == ["writer.txt"]
    assert (partial / "writer.txt").read_text() == str(winner.pid)
    assert runlock.holder(out)["pid"] == winner.pid
    release.touch()
    assert winner.wait(timeout=30) == 0, winner.stderr.read()
    assert not runlock.lock_path(out).exists()


def test_a_lock_file_left_by_sigkill_never_blocks(tmp_path):
    out = tmp_path / "run"
    proc = _python(LOCKER, out, tmp_path / "go", tmp_path / "release")
    (tmp_path / "go").touch()
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert runlock.holder(out)["pid"] == proc.pid  # the file stays behind, naming a dead process
    with runlock.acquire(out, command="next"):
        assert runlock.holder(out)["pid"] == os.getpid()


# ---------------------------------------------------------------- verify_run: every broken run folder


def test_a_good_run_verifies(run):
    info = verify_run(run)
    assert info.rank == 8 and len(info.modules) == 6  # q/k/v in 2 layers
    assert {"adapter structure", "adapter sha256"} <= set(info.checked)
    assert any(c.startswith("shapes against") for c in info.checked)
    assert info.notes == []


def other_adapter(tmp_path: Path, tiny_model: Path, rank: int = 8, hidden: int | None = None) -> Path:
    """A real PEFT adapter of another run: rank `rank`, on the tiny model or one `hidden` wide."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    if hidden:
        config.hidden_size, config.intermediate_size, config.head_dim = hidden, 2 * hidden, hidden // config.num_attention_heads
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    folder = tmp_path / f"other-r{rank}-h{hidden}"
    model.save_pretrained(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def broken(kind: str, run: Path, tmp_path: Path, tiny_model: Path) -> None:
    """Damage `run` the way `kind` says."""
    adapter, adapter_cfg = run / "adapter_model.safetensors", run / "adapter_config.json"
    if kind == "truncated adapter":
        truncate(adapter)
    elif kind == "empty adapter":
        empty(adapter)
    elif kind == "random adapter":
        adapter.write_bytes(random.Random(0).randbytes(adapter.stat().st_size))
    elif kind == "flipped adapter":
        flip(adapter)
    elif kind == "missing adapter":
        delete(adapter)
    elif kind == "invalid adapter_config":
        adapter_cfg.write_text('{"r": 8, "lora_alpha": ')
    elif kind == "empty adapter_config":
        empty(adapter_cfg)
    elif kind == "adapter from another base":
        for name in (adapter.name, adapter_cfg.name):
            shutil.copy(other_adapter(tmp_path, tiny_model, hidden=32) / name, run / name)
    elif kind == "adapter weights of another rank":
        shutil.copy(other_adapter(tmp_path, tiny_model, rank=4) / adapter.name, adapter)
    elif kind == "adapter files of another rank":
        for name in (adapter.name, adapter_cfg.name):
            shutil.copy(other_adapter(tmp_path, tiny_model, rank=4) / name, run / name)
    elif kind == "narrowed target_modules":
        edit_json(adapter_cfg, target_modules=["q_proj", "v_proj"])
    elif kind == "widened target_modules":
        edit_json(adapter_cfg, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    elif kind == "edited lora_alpha":
        edit_json(adapter_cfg, lora_alpha=64)
    elif kind == "invalid training_config":
        (run / "training_config.json").write_text("{'model': 1}")
    elif kind == "empty training_config":
        empty(run / "training_config.json")
    elif kind == "invalid metadata":
        (run / "metadata.json").write_text('{"steps": 2,}')
    elif kind == "empty metadata":
        empty(run / "metadata.json")
    else:
        raise AssertionError(kind)


BROKEN = {  # kind -> (the file the error names, words it must hold; {size}: the adapter's bytes)
    "truncated adapter": ("adapter_model.safetensors", "is truncated: {half} of {size} bytes (the size metadata.json records)"),
    "empty adapter": ("adapter_model.safetensors", "is empty (0 bytes; metadata.json records {size})"),
    "random adapter": ("adapter_model.safetensors", "is not a readable safetensors file"),
    "flipped adapter": ("adapter_model.safetensors", "does not match the sha256 in metadata.json: the file changed after "
                        "training. Restore it, retrain, or pass --no-verify if you changed it on purpose."),
    "missing adapter": ("adapter_model.safetensors", "is not a complete afinar run: missing adapter_model.safetensors"),
    "invalid adapter_config": ("adapter_config.json", "is not valid JSON"),
    "empty adapter_config": ("adapter_config.json", "is empty"),
    "adapter from another base": ("adapter_model.safetensors", "holds lora_A [8, 32] for "
                                  "model.layers.0.self_attn.k_proj, but that layer of"),
    "adapter weights of another rank": ("adapter_model.safetensors", "holds rank-4 matrices "
                                        "(model.layers.0.self_attn.k_proj), but adapter_config.json says r=8"),
    "adapter files of another rank": ("adapter_config.json", "does not match training_config.json (lora.rank=8 but r=4)"),
    "narrowed target_modules": ("adapter_config.json", "has target_modules=['q_proj', 'v_proj'], but "
                                "adapter_model.safetensors holds LoRA matrices for ['k_proj', 'q_proj', 'v_proj']"),
    "widened target_modules": ("adapter_config.json", "holds no matrices for 2 such layers of the base "
                               "(e.g. model.layers.0.self_attn.o_proj)"),
    "edited lora_alpha": ("adapter_config.json", "does not match training_config.json (lora.alpha=16 but lora_alpha=64)"),
    "invalid training_config": ("training_config.json", "is not valid JSON"),
    "empty training_config": ("training_config.json", "is empty"),
    "invalid metadata": ("metadata.json", "is not valid JSON"),
    "empty metadata": ("metadata.json", "is empty"),
}


def expected_error(kind: str, run: Path, size: int) -> tuple[Path, str]:
    name, words = BROKEN[kind]
    return run / name, words.format(size=size, half=size // 2)


@pytest.mark.parametrize("kind", list(BROKEN))
def test_verify_names_the_broken_file(run, tmp_path, tiny_model, kind):
    file, words = expected_error(kind, run, (run / "adapter_model.safetensors").stat().st_size)
    broken(kind, run, tmp_path, tiny_model)
    with pytest.raises(RunDamaged) as err:
        verify_run(run)
    assert err.value.exit_code == 2 and err.value.file == file
    assert words in str(err.value)
    if kind != "missing adapter":
        assert str(err.value).startswith(f"{file} ")


def test_no_verify_accepts_an_adapter_edited_on_purpose_but_not_a_broken_one(run, tmp_path, tiny_model):
    flip(run / "adapter_model.safetensors")
    info = verify_run(run, checksums=False)
    assert "checksums not checked (--no-verify)" in info.notes
    broken("narrowed target_modules", run, tmp_path, tiny_model)
    with pytest.raises(RunDamaged, match="target_modules"):
        verify_run(run, checksums=False)


def test_plain_peft_loads_a_narrowed_adapter_silently(run, tmp_path, tiny_model):
    """Why verify_run compares target_modules with the tensors: PEFT itself does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    broken("narrowed target_modules", run, tmp_path, tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}  # k_proj's trained matrices dropped, no error
    with pytest.raises(RunDamaged):
        verify_run(run)


def test_the_run_manifest_covers_the_files_read(run):
    """A manifest in the run folder (written by RunWriter.finish once wired) catches any edit of what is read."""
    manifest.write(run, ["adapter_model.safetensors", "adapter_config.json", "training_config.json", "metadata.json"])
    assert "manifest.json" in verify_run(run).checked
    meta = run / "metadata.json"
    meta.write_text(meta.read_text().replace('"steps": 8', '"steps": 9'))  # same size, one digit
    with pytest.raises(RunDamaged, match=r"metadata\.json does not match manifest\.json \(metadata\.json changed: "):
        verify_run(run)


def test_check_base_false_reads_no_base(run, monkeypatch):
    monkeypatch.setattr(models, "resolve", lambda base: pytest.fail("the base was resolved"))
    info = verify_run(run, check_base=False)
    assert not any(c.startswith("shapes against") for c in info.checked)


# ---------------------------------------------------------------- end to end, once the loop and CLI are wired

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="afinar")


@pytest.mark.slow
def test_two_trainings_into_one_output_one_wins(tmp_path, tiny_model, data_files):
    train, val = data_files
    out = tmp_path / "run"
    args = ["train", "--output", str(out), "--set", f"model.base={tiny_model}", "--set", "model.quantization=none",
            "--set", "train.batch_size=2", "--set", "train.max_steps=12", "--set", "train.save_every=2",
            "--set", f"data.train={train}", "--set", f"data.val={val}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "afinar.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], errors
    winner, loser_err = (procs[0], errors[1]) if codes[0] == 0 else (procs[1], errors[0])
    assert f"PID {winner.pid}" in loser_err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 13))
    assert not runlock.lock_path(out).exists()


def test_resume_skips_a_damaged_checkpoint_and_still_equals_an_uninterrupted_run(cfg, crashed, tmp_path):
    straight = run_training(cfg, tmp_path / "straight").output
    out = tmp_path / "run"
    shutil.copytree(crashed, out.with_name("run.partial"))
    truncate(file_in(ckpt(out.with_name("run.partial"), 6), "optimizer"))
    events = []
    resumed = run_training(cfg, out, resume=True, on_event=events.append).output
    said = " ".join(json.dumps(e, default=str) for e in events)
    assert "checkpoint step 6 is damaged (optimizer" in said and "resuming from step 4: 2 steps lost" in said
    assert json.loads((resumed / "metadata.json").read_text())["resumed_from_step"] == 4
    a, b = load_file(str(resumed / "adapter_model.safetensors")), load_file(str(straight / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_resume_with_every_checkpoint_damaged_exits_2(cfg, crashed, tmp_path, tiny_model, data_files):
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    shutil.copytree(crashed, partial)
    for step in (2, 4, 6):
        empty(file_in(ckpt(partial, step), "adapter_model"))
    result = invoke("train", "--resume", out)
    assert result.exit_code == 2 and "No checkpoint of" in result.stderr and "Traceback" not in result.stderr
    assert [s for s, _ in checkpoints.step_checkpoints(partial)] == [2, 4, 6]


def test_a_finished_run_holds_no_leftovers(cfg, crashed, tmp_path):
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    shutil.copytree(crashed, partial)
    shutil.copytree(ckpt(partial, 6), checkpoints.folder(partial) / ".step_0000008.k2j4_x9q")
    shutil.copytree(ckpt(partial, 4), checkpoints.folder(partial) / ".step_0000004.old")
    resumed = run_training(cfg, out, resume=True).output
    assert not [p for p in resumed.rglob(".*")]


def test_run_folder_deleted_mid_training_is_a_clean_error(cfg, tmp_path, monkeypatch):
    from afinar.backends.torch_train import TorchTrainer

    out = tmp_path / "run"
    original = TorchTrainer.optimizer_step
    calls = {"n": 0}

    def optimizer_step(self, lr):
        calls["n"] += 1
        if calls["n"] == 3:
            shutil.rmtree(out.with_name("run.partial"))
        return original(self, lr)

    monkeypatch.setattr(TorchTrainer, "optimizer_step", optimizer_step)
    with pytest.raises(oserrors.EnvironmentFailure, match="was removed while training") as err:
        run_training(cfg, out)
    assert err.value.exit_code == 3 and not out.exists() and not out.with_name("run.partial").exists()


def test_train_output_under_a_regular_file_exits_2(tmp_path, tiny_model, data_files):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    result = invoke("train", "--output", blocker / "run", "--set", f"model.base={tiny_model}",
                    "--set", f"data.train={data_files[0]}", "--set", "train.max_steps=1")
    assert result.exit_code == 2 and f"{blocker} is a regular file" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("kind", list(BROKEN))
def test_ask_on_a_broken_run_prints_a_json_error(run, tmp_path, tiny_model, kind):
    file, words = expected_error(kind, run, (run / "adapter_model.safetensors").stat().st_size)
    broken(kind, run, tmp_path, tiny_model)
    result = invoke("ask", run, "Onde joga o Farense?")
    assert result.exit_code == 2, result.output
    error = json.loads(result.stderr.strip().splitlines()[-1])["error"]
    assert error["type"] == "user_error" and file.name in error["message"] and words in error["message"]


def test_ask_no_verify_answers_with_an_adapter_changed_on_purpose(run):
    flip(run / "adapter_model.safetensors")
    assert invoke("ask", run, "Onde joga o Farense?").exit_code == 2
    result = invoke("ask", run, "Onde joga o Farense?", "--no-verify", "--max-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "answer" in json.loads(result.stdout)


@pytest.mark.parametrize("kind", ["invalid training_config", "empty metadata", "flipped adapter"])
def test_serve_on_a_broken_run_exits_2_before_binding(run, tmp_path, tiny_model, kind):
    file, _ = expected_error(kind, run, 0)
    broken(kind, run, tmp_path, tiny_model)
    result = invoke("serve", run, "--port", "0")
    assert result.exit_code == 2 and str(file) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [("eval",), ("export", "--to", "mlx"), ("compare", "--output", "CMP")])
def test_eval_export_compare_refuse_a_changed_adapter(run, tmp_path, command):
    flip(run / "adapter_model.safetensors")
    args = [a if a != "CMP" else tmp_path / "cmp" for a in command[1:]]
    result = invoke(command[0], run, *([run] if command[0] == "compare" else []), *args)
    assert result.exit_code == 2 and "does not match the sha256 in metadata.json" in result.stderr
