"""Several processes, one run: which process am I, and which examples of a step are mine.

`torchrun` and `accelerate launch` start one process per GPU and tell each its place through
environment variables: RANK (0..WORLD_SIZE-1 over every node), WORLD_SIZE and LOCAL_RANK
(the GPU on this node), plus MASTER_ADDR/MASTER_PORT for the rendezvous. Without them afinar
is one process. Nothing here imports a framework: the backend does the communication.

Every process reads the same data and builds the same deterministic stream of micro-batches,
so each knows the whole optimizer step; `shard` hands it its share. The loss of a step is the
sum over all its answer tokens divided by the step's global target count (known to every
process without communication), and the backend sums the gradients across processes, so N
processes compute the step a single process computes with the same global batch.
Which process writes the run folder is the caller's decision (the trainer: rank 0 only).

Communication is one small object, a `Collective`, that the backend provides: one process has
`SINGLE_PROCESS`, whose sums are the values themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Protocol, TypeVar

from afinar.errors import AfinarError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder, checkpoints and progress."""
        return self.rank == 0


SINGLE = World()


def from_env(environ: Mapping[str, str] = os.environ) -> World:
    """This process's place, from the variables torchrun / accelerate launch set (one process without them)."""
    if "WORLD_SIZE" not in environ:
        return SINGLE
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = environ.get(name, "0")
        try:
            values[name] = int(text)
        except ValueError:
            raise AfinarError(f"Environment variable {name}={text!r} is not an integer; start afinar with "
                              "`torchrun --nproc-per-node N` or `accelerate launch`, which set it.") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise AfinarError(f"RANK={world.rank}, WORLD_SIZE={world.size}, LOCAL_RANK={world.local_rank}: need "
                          "0 <= RANK < WORLD_SIZE; start afinar with `torchrun --nproc-per-node N`.")
    return world


def shard(micro_batches: list[list[T]], world: World) -> list[list[T]]:
    """This process's share of one optimizer step's micro-batches (the whole step for one process).

    When the step's micro-batches divide evenly, each process takes whole micro-batches
    (r, r+N, ...): its micro-batch stays the configured one. Otherwise every micro-batch is
    split, process r taking its examples r, r+N, ... (similar lengths, as batches are grouped
    by length); a piece can then be empty, and the loop runs a zero-weight pass for it, so
    every process makes the same number of forward passes (FSDP gathers weights in each).
    Either way every example of the step is taken exactly once.
    """
    if world.size == 1:
        return micro_batches
    if len(micro_batches) % world.size == 0:
        return micro_batches[world.rank :: world.size]
    return [mb[world.rank :: world.size] for mb in micro_batches]


class Collective(Protocol):
    """What the core asks of the processes together (the backend implements it for its framework)."""

    def all_sum(self, values: list[float]) -> list[float]:
        """`values` summed element-wise over every process of the job (every process gets the sums)."""


class _SingleProcess:
    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)


SINGLE_PROCESS: Collective = _SingleProcess()
