"""Checkpoints inside a run folder, and finding the newest one that is still whole.

  checkpoints/step_0000200/   adapter + optimizer (backend), rng_state.pkl (rng.py), trainer_state.json (core), manifest.json
  checkpoints/best/           the adapter with the lowest validation loss so far + best.json + manifest.json

Each checkpoint folder is built aside and renamed into place (`atomic.folder`), its manifest
(each file's size and sha256) written last, so a crash mid-write leaves the previous ones
intact, and a file damaged later (a full disk, a bad copy, a flipped byte) is found and named.
Resuming takes the newest checkpoint that matches its manifest and loads; damaged newer ones
are reported with the steps they cost, and removed. `best/` is checked then too, before any
training: damaged, or written after the checkpoint resumed from, it is discarded; moved aside
by a crash in the middle of its replacement, it is put back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from afinar import atomic, manifest, oserrors, rng
from afinar.errors import AfinarError
from afinar.runpaths import output_of

STEP_DIR = re.compile(r"^step_(\d{7})$")
TRAINER_STATE = "trainer_state.json"
BEST = "best"
BEST_INFO = "best.json"
# Leftovers of writes a crash interrupted: atomic.folder's `.<name>.<8 random>` build folders and
# `.<name>.old` swaps; atomic.write_bytes' `.<name>.<8 random>.tmp` files (and `.<name>.tmp.<ext>`).
_TEMP_DIR = re.compile(r"^\..+\.(old|[a-z0-9_]{8})$")
_TEMP_FILE = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")


class NoValidCheckpoint(AfinarError):
    """Every step checkpoint of a run is damaged: nothing to resume from."""

    exit_code = 2
    resumable = False  # "--resume" again would fail the same way: the message says what does work


class Incompatible(AfinarError):
    """The checkpoints do not fit the config a forced resume changed (another LoRA rank): nothing loaded or removed."""

    exit_code = 2
    resumable = False


class CheckpointDamaged(AfinarError):
    """checkpoints/best/ no longer matches its manifest."""

    exit_code = 3


def folder(run_tmp: Path) -> Path:
    return Path(run_tmp) / "checkpoints"


def step_checkpoints(run_tmp: Path) -> list[tuple[int, Path]]:
    """Every step checkpoint folder, oldest first (complete when written; `latest` checks they still are)."""
    root = folder(run_tmp)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save(run_tmp: Path, backend, state: dict, keep: int) -> Path:
    """Write checkpoints/step_NNNNNNN/ (backend state, the core's, then the manifest), keep the newest `keep`."""
    target = folder(run_tmp) / f"step_{state['step']:07d}"

    def fill(tmp: Path) -> None:
        backend.save_state(tmp)
        rng.save(tmp, backend.rng_state())
        atomic.write_json(tmp / TRAINER_STATE, state)

    _write(Path(run_tmp), target, fill)
    for _, old in step_checkpoints(run_tmp)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_best(run_tmp: Path, backend, step: int, val_loss: float) -> Path:
    target = folder(run_tmp) / BEST

    def fill(tmp: Path) -> None:
        backend.save_adapter(tmp)
        atomic.write_json(tmp / BEST_INFO, {"step": step, "val_loss": val_loss})

    _write(Path(run_tmp), target, fill)
    return target


def _write(run_tmp: Path, target: Path, fill: Callable[[Path], None]) -> None:
    """Build `target` aside with `fill`, add its manifest, rename it into place; a full disk or a
    vanished run folder is a clean error (exit 3: training stopped mid-run)."""
    if not run_tmp.is_dir():  # atomic.folder would quietly recreate it, holding only this checkpoint
        raise oserrors.run_removed(run_tmp, target)
    resumable = bool(step_checkpoints(run_tmp))  # else the run is abandoned: no "--resume" advice
    with oserrors.writing(target, run=run_tmp, mid_run=True, resumable=resumable), atomic.folder(target) as tmp:
        fill(tmp)
        manifest.write(tmp)


def best(run_tmp: Path) -> tuple[dict, Path] | None:
    """(best.json, folder) of checkpoints/best/, or None if there is none; CheckpointDamaged if it changed."""
    path = folder(run_tmp) / BEST
    if not path.is_dir():
        return None
    info, damage = _read_best(path)
    if damage:
        raise CheckpointDamaged(
            f"{path} is damaged ({'; '.join(damage)}): its adapter cannot be used as the run's adapter. "
            f"Restore it, or continue with: afinar train --resume {output_of(run_tmp)}, which discards it "
            "(the run then ends with the last adapter, unless a later validation check writes a new best)."
        )
    return info, path


def _read_best(path: Path) -> tuple[dict | None, list[str]]:
    """(best.json, what is damaged) of the best folder `path`."""
    damage = [str(d) for d in manifest.verify(path)] if manifest.exists(path) else []
    info, problem = _read_json_object(path / BEST_INFO)
    if problem:
        damage.append(problem)
    return info, damage


def discard_unusable_best(run_tmp: Path, step: int) -> str | None:
    """Remove checkpoints/best/ if a run resumed at `step` cannot ship it; why, or None if it is kept.

    Checked when resuming, before any training: a damaged best found only at the end would cost
    the whole resumed run. A best written after `step` comes from training the resume replays
    (or, with --force, replaces): its loss is not in the resumed metrics, so it is not the best
    of the run that ends.
    """
    path = folder(run_tmp) / BEST
    if not path.is_dir():
        return None
    info, damage = _read_best(path)
    written = info.get("step") if info else None
    if info and not isinstance(written, int):
        damage.append(f"{BEST_INFO} names no step")
    if damage:
        why = f"{path} is damaged ({'; '.join(damage)})"
    elif written <= step:
        return None
    else:
        why = (f"{path} holds the best adapter of step {written}, after the checkpoint resumed from (step {step}): "
               "it comes from training that is now replayed")
    shutil.rmtree(path)
    return why + "; it was discarded"


def restore_interrupted_swaps(run_tmp: Path) -> str | None:
    """Put back each `checkpoints/.<name>.old` whose `<name>` is missing; what was restored, or None.

    A crash inside `atomic.folder`'s swap (the old folder moved aside, the new one not yet in place)
    leaves the previous version there whole: for `best/` the only copy of the run's best adapter.
    Call it before `cleanup_partial_writes`, which would delete it.
    """
    root = folder(run_tmp)
    restored = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        name = path.name[1:-len(".old")] if path.name.startswith(".") and path.name.endswith(".old") else ""
        if name and path.is_dir() and not (root / name).exists():
            os.replace(path, root / name)
            restored.append(name)
    if not restored:
        return None
    return (f"restored {', '.join(f'{root / n}/' for n in restored)} from the copy a crash left while replacing "
            f"{'it' if len(restored) == 1 else 'them'}")


# ---------------------------------------------------------------- resume


@dataclass(frozen=True)
class Skipped:
    """A step checkpoint passed over because it is damaged."""

    step: int
    path: Path
    reason: str


@dataclass
class Resumable:
    """The checkpoint to resume from, and the newer ones that were damaged."""

    step: int
    path: Path
    state: dict  # trainer_state.json
    skipped: list[Skipped] = field(default_factory=list)
    verified: bool = True  # False: written before manifests existed, so only loading it vouches for it
    loaded: bool = False  # the backend's loader has restored it

    @property
    def steps_lost(self) -> int:
        """Steps of training the damaged checkpoints cost beyond the newest one."""
        return max((s.step for s in self.skipped), default=self.step) - self.step

    def __iter__(self):
        """`state, folder = latest(run)`: the (trainer state, folder) pair `latest` returned before it
        verified checkpoints; callers that resume should move to `load_newest_valid`."""
        return iter((self.state, self.path))

    def message(self) -> str | None:
        """What to tell the user, e.g. "checkpoint step 6 is damaged (optimizer.pt truncated: 20000 of
        51531 bytes); resuming from step 4: 2 steps lost"; None when the newest checkpoint was fine."""
        parts = [f"checkpoint step {s.step} is damaged ({s.reason})" for s in self.skipped]
        if not self.verified:
            check = "its files load" if self.loaded else "its files were not checked"
            parts.append(f"checkpoint step {self.step} has no {manifest.MANIFEST} (written by an older afinar): {check}")
        if not parts:
            return None
        lost = self.steps_lost
        tail = f"resuming from step {self.step}" + (f": {lost} step{'s' if lost != 1 else ''} lost" if self.skipped else "")
        return "; ".join([*parts, tail])


def latest(run_tmp: Path) -> Resumable | None:
    """The newest step checkpoint that matches its manifest (nothing loaded, nothing removed).

    None if the run has no step checkpoint; NoValidCheckpoint (exit 2) if it has some, all damaged.
    A checkpoint without a manifest (older afinar) counts if its trainer state reads; to know its
    other files load, use `load_newest_valid`.
    """
    return _newest_valid(Path(run_tmp), None)


def load_newest_valid(run_tmp: Path, loader: Callable[[Path], None]) -> Resumable | None:
    """Restore the newest step checkpoint that matches its manifest and that `loader` loads.

    `loader` is the backend's `load_checkpoint`: an exception from it (a file a library no longer
    reads, a checkpoint without a manifest whose files are damaged) marks that checkpoint damaged
    too, and the next older one is tried; so `loader` must overwrite everything it restores.
    Out-of-memory errors are not damage and propagate. The damaged checkpoints newer than the
    one restored are removed (the resumed run rewrites those steps). None if there is no step
    checkpoint; NoValidCheckpoint (exit 2) if none is valid, with nothing removed.
    """
    found = _newest_valid(Path(run_tmp), loader)
    if found is not None:
        for s in found.skipped:
            shutil.rmtree(s.path, ignore_errors=True)
    return found


def _newest_valid(run_tmp: Path, loader: Callable[[Path], None] | None) -> Resumable | None:
    skipped: list[Skipped] = []
    for step, path in reversed(step_checkpoints(run_tmp)):
        verified = manifest.exists(path)
        problems = [str(d) for d in manifest.verify(path)] if verified else []
        state, problem = _read_json_object(path / TRAINER_STATE)
        if problem and not problems:  # with a manifest, a damaged trainer state is already named
            problems.append(problem)
        elif state is not None and (state.get("step") != step or not isinstance(state.get("loop"), dict)):
            problems.append(f"{TRAINER_STATE} does not describe step {step}")
        if not problems and loader is not None:
            try:
                loader(path)
            except Incompatible:
                raise  # the config's fault, not the checkpoint's: nothing is damaged, nothing removed
            except Exception as e:
                if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                    raise  # the device, not the checkpoint
                problems.append(f"its files do not load: {type(e).__name__}: {_short(e)}")
        if problems:
            skipped.append(Skipped(step, path, ", ".join(problems)))
            continue
        return Resumable(step, path, state, skipped, verified, loaded=loader is not None)
    if skipped:
        raise NoValidCheckpoint(
            f"No checkpoint of {run_tmp} can be resumed: "
            + "; ".join(f"step {s.step} is damaged ({s.reason})" for s in skipped)
            + f". Restore the damaged files, or start over with: afinar train --output {output_of(run_tmp)} --overwrite"
        )
    return None


def _read_json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None) or (None, what is wrong with the file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{path.name} unreadable: {e}"
    if not text.strip():
        return None, f"{path.name} empty"
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, f"{path.name} is not valid JSON: {e}"
    if not isinstance(obj, dict):
        return None, f"{path.name} is not a JSON object"
    return obj, None



def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- leftovers


@dataclass(frozen=True)
class Leftovers:
    """Temporary files and folders of interrupted writes that `cleanup_partial_writes` removed."""

    paths: list[Path]
    bytes: int

    def message(self) -> str | None:
        if not self.paths:
            return None
        return (f"removed {len(self.paths)} temporary file(s) left by interrupted writes "
                f"({self.bytes / 2**20:.1f} MB): {', '.join(p.name for p in self.paths)}")


def cleanup_partial_writes(run: Path) -> Leftovers:
    """Delete what writes interrupted by a crash left under `run`, so a finished run never holds them.

    Call it when resuming and just before a run is published, while holding the run's lock (see
    runlock.py): a write in progress by another process looks exactly like a leftover.
    """
    removed, size = [], 0
    for root, dirs, files in os.walk(run):
        for name in sorted(dirs):
            if _TEMP_DIR.match(name):
                path = Path(root, name)
                size += _tree_size(path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                dirs.remove(name)
        for name in sorted(files):
            if _TEMP_FILE.match(name):
                path = Path(root, name)
                size += path.stat().st_size
                path.unlink(missing_ok=True)
                removed.append(path)
    return Leftovers(removed, size)


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
