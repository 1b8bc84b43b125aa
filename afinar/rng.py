"""Random-number state in checkpoints: what exact resume needs, captured the same way for every backend.

A checkpoint's `rng_state.pkl` holds the host's generators (Python's `random`, NumPy's global
state) and whatever the backend reports as its own (`rng_state()`: torch's CPU and CUDA
generators; for MLX, whose global generator cannot be saved, the counter its dropout keys
derive from). The file is our own, written by `save` and read back by `load` only.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np

FILE = "rng_state.pkl"


def save(folder: str | Path, backend_state: dict[str, Any]) -> None:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "backend": backend_state}
    (Path(folder) / FILE).write_bytes(pickle.dumps(state))


def load(folder: str | Path) -> dict[str, Any]:
    """Restore the host generators from `folder`; return the backend's part for it to restore."""
    # Our own file, written by `save` into a checkpoint of this run: unpickling it is safe.
    state = pickle.loads((Path(folder) / FILE).read_bytes())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    return state["backend"]
