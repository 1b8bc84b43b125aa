"""Checkpoints inside a run folder, and finding the one to resume from.

  checkpoints/step_0000200/   adapter + optimizer (backend), rng_state.pkl (rng.py) + trainer_state.json (core)
  checkpoints/best/           the adapter with the lowest validation loss so far + best.json

Each checkpoint folder is built aside and renamed into place (`atomic.folder`), so a crash
mid-write leaves the previous checkpoints intact and every `step_*` folder is complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from afinar import atomic, rng

STEP_DIR = re.compile(r"^step_(\d{7})$")


def folder(run_tmp: Path) -> Path:
    return Path(run_tmp) / "checkpoints"


def step_checkpoints(run_tmp: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    root = folder(run_tmp)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_tmp: Path) -> tuple[dict, Path] | None:
    """(trainer state, folder) of the newest complete checkpoint, or None."""
    found = step_checkpoints(run_tmp)
    if not found:
        return None
    path = found[-1][1]
    return json.loads((path / "trainer_state.json").read_text()), path


def save(run_tmp: Path, backend, state: dict, keep: int) -> Path:
    """Write checkpoints/step_NNNNNNN/ (backend state, then the core's), keep the newest `keep`."""
    target = folder(run_tmp) / f"step_{state['step']:07d}"
    with atomic.folder(target) as tmp:
        backend.save_state(tmp)
        rng.save(tmp, backend.rng_state())
        atomic.write_json(tmp / "trainer_state.json", state)
    for _, old in step_checkpoints(run_tmp)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_best(run_tmp: Path, backend, step: int, val_loss: float) -> Path:
    target = folder(run_tmp) / "best"
    with atomic.folder(target) as tmp:
        backend.save_adapter(tmp)
        atomic.write_json(tmp / "best.json", {"step": step, "val_loss": val_loss})
    return target


def best(run_tmp: Path) -> tuple[dict, Path] | None:
    path = folder(run_tmp) / "best"
    if not (path / "best.json").is_file():
        return None
    return json.loads((path / "best.json").read_text()), path
