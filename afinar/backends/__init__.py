"""Backends: one module per framework, all behind the `Backend` interface in `base.py`.

The core (config, data, training loop, run folder, evaluation) only talks to that
interface, so adding MLX is adding one module, not touching the loop.
"""

from __future__ import annotations

from afinar.backends.base import Backend
from afinar.config import Config


def resolve_name(cfg: Config) -> str:
    """'auto' -> 'mlx' on an Apple Silicon Mac with MLX installed, 'torch' everywhere else."""
    if cfg.backend != "auto":
        return cfg.backend
    from afinar.backends import mlx_backend

    return "mlx" if mlx_backend.on_apple_silicon() and mlx_backend.available() else "torch"


def get_backend(cfg: Config) -> Backend:
    """The backend named by `cfg.backend` (see `resolve_name` for 'auto')."""
    name = resolve_name(cfg)
    if name == "torch":
        from afinar.backends.torch_backend import TorchBackend

        return TorchBackend(cfg)
    if name == "mlx":
        from afinar.backends.mlx_backend import MLXBackend

        return MLXBackend(cfg)
    raise AssertionError(f"unreachable: config validation admits backend={cfg.backend!r}")
