"""Backends: one module per framework, all behind the `Backend` interface in `base.py`.

The core (config, data, training loop, run folder, evaluation) only talks to that
interface, so adding MLX is adding one module, not touching the loop.
"""

from __future__ import annotations

from afinar.backends.base import Backend
from afinar.config import Config


def get_backend(cfg: Config) -> Backend:
    """The backend named by `cfg.backend` ('auto' -> torch: the only one in this release)."""
    name = "torch" if cfg.backend == "auto" else cfg.backend
    if name == "torch":
        from afinar.backends.torch_backend import TorchBackend

        return TorchBackend(cfg)
    raise AssertionError(f"unreachable: config validation admits backend={cfg.backend!r}")
