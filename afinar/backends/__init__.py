"""Backends: one package per framework, each behind the small protocols of `base.py`.

  torch  torch_model (shared), torch_train (+ torch_distributed: DDP / FSDP), torch_answer
  mlx    mlx_model (shared), mlx_train, mlx_answer

The core (config, data, trainer, run folder, evaluation) only talks to those protocols, so a
framework is a few modules, not a change to the loop.
"""

from __future__ import annotations

from afinar import distributed
from afinar.backends.base import AnsweringBackend, ExportBackend, TrainingBackend
from afinar.config import Config
from afinar.errors import AfinarError


def resolve_name(cfg: Config) -> str:
    """'auto' -> 'mlx' on an Apple Silicon Mac with MLX installed, 'torch' everywhere else."""
    if cfg.backend != "auto":
        return cfg.backend
    from afinar.backends import mlx_model

    return "mlx" if mlx_model.on_apple_silicon() and mlx_model.available() else "torch"


def training_backend(cfg: Config, world: distributed.World = distributed.SINGLE) -> TrainingBackend:
    """The backend that trains `cfg` in this process of `world` (DDP or FSDP under torchrun)."""
    name = resolve_name(cfg)
    if name == "mlx":
        if world.size > 1:
            raise AfinarError(f"backend=mlx trains in one process only; WORLD_SIZE={world.size} was set "
                              "(torchrun / accelerate launch). Use --set backend=torch, or start one process.")
        from afinar.backends.mlx_train import MLXTrainer

        return MLXTrainer(cfg)
    if world.size == 1:
        from afinar.backends.torch_train import TorchTrainer

        return TorchTrainer(cfg)
    from afinar.backends.torch_distributed import DDPTrainer, FSDPTrainer

    return (FSDPTrainer if cfg.distributed.strategy == "fsdp" else DDPTrainer)(cfg, world)


def answering_backend(cfg: Config) -> AnsweringBackend:
    """The backend that answers with (and exports) a run trained with `cfg`."""
    if resolve_name(cfg) == "mlx":
        from afinar.backends.mlx_answer import MLXAnswerer

        return MLXAnswerer(cfg)
    from afinar.backends.torch_answer import TorchAnswerer

    return TorchAnswerer(cfg)


__all__ = ["AnsweringBackend", "ExportBackend", "TrainingBackend", "answering_backend", "resolve_name",
           "training_backend"]
