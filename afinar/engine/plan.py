"""What the engine asks of a runner, and the framework-free planning the torch runners share.

A runner owns the model and its per-row state (KV cache); the engine (scheduler.py) owns the
requests. The engine gives each admitted request a slot (a row, 0 <= slot < max_rows) and calls
`step()` again and again; each call returns the tokens produced since the last one, tagged with
the handle the engine passed to `add`. A runner may return a step's tokens one call late (the
torch runner launches step k+1 on the GPU before it reads step k's tokens): so results carry
handles, not slots, and a handle the engine has already finished is simply ignored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from afinar.engine.request import SamplingParams


class RowError(Exception):
    """A failure that belongs to some rows only (their prefill, their forward): only they fail.

    `produced`: the (handle, token) pairs the step made for the other rows, which go on.
    """

    def __init__(self, handles: list[Any], cause: BaseException, produced: list | None = None):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.handles, self.cause, self.produced = handles, cause, produced or []


class Runner(Protocol):
    max_rows: int  # rows (KV slots) it holds
    max_len: int  # tokens one row holds, prompt + answer

    def add(self, handle: Any, slot: int, prompt: list[int], params: SamplingParams) -> None:
        """Take a new row: prefill `prompt` in chunks over the next steps, then decode it."""

    def remove(self, slot: int) -> None:
        """Forget a row (finished, cancelled): its slot is free for `add` at once."""

    def step(self) -> list[tuple[Any, int]]:
        """Run one engine step; return (handle, token) for every token produced since the last call."""

    def busy(self) -> bool:
        """Whether rows are running or results are still to be returned."""

    def reset(self) -> None:
        """Drop every row after a failure the runner could not pin on some rows."""

    def warm_up(self, say: Callable[[str], None]) -> None:
        """Compile, allocate and capture now (before the server says ready), not in the first request."""


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest size >= n (sizes ascending); beyond the last, n itself."""
    return next((s for s in sizes if s >= n), n)


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... below hi, then hi: the shapes a CUDA graph is captured for."""
    sizes, s = [], lo
    while s < hi:
        sizes.append(s)
        s *= 2
    return (*sizes, hi)


@dataclass
class Chunk:
    slot: int
    tokens: list[int]
    start: int  # position of tokens[0] in the row
    last: bool  # the prompt's end: the runner samples the row's first token after it


class PrefillQueue:
    """Prompts waiting to be prefilled, handed out in chunks of at most `chunk` tokens.

    A step packs rows while the padded batch (rows x longest chunk) stays within `chunk`
    tokens, so the work a step adds to the rows decoding is bounded whatever the prompts. The
    rows with the least prompt left go first: a short question is not queued behind the 12
    chunks of a long one, which takes the steps when no short prompt waits. A row passed over
    `patience` steps in a row goes first (no starvation). Chunks always start at multiples of
    `chunk` in their prompt, whatever else is packed with them: a row's arithmetic (hence, on
    CPU, its bits) does not depend on the other rows.
    """

    def __init__(self, chunk: int, patience: int = 4):
        self.chunk, self.patience = chunk, patience
        self.rows: OrderedDict[int, list] = OrderedDict()  # slot -> [prompt, tokens done, steps passed over]

    def add(self, slot: int, prompt: list[int]) -> None:
        self.rows[slot] = [prompt, 0, 0]

    def remove(self, slot: int) -> None:
        self.rows.pop(slot, None)

    def __len__(self) -> int:
        return len(self.rows)

    def next(self, flat: bool = False, max_rows: int | None = None) -> list[Chunk]:
        """This step's chunks. `flat`: the runner packs tokens without padding, so the budget is
        their sum (not rows x longest); `max_rows`: at most that many rows."""
        order = sorted(self.rows.items(), key=lambda kv: (kv[1][2] < self.patience, len(kv[1][0]) - kv[1][1]))
        chunks: list[Chunk] = []
        width = total = 0
        for slot, (prompt, done, _) in order:
            n = min(len(prompt) - done, self.chunk)
            if max_rows is not None and len(chunks) >= max_rows:
                break
            if flat:
                if chunks and total + n > self.chunk:
                    continue
                total += n
            elif chunks and (len(chunks) + 1) * max(width, n) > self.chunk:
                continue
            width = max(width, n)
            chunks.append(Chunk(slot, prompt[done:done + n], done, done + n == len(prompt)))
        served = {c.slot for c in chunks}
        for slot, row in list(self.rows.items()):
            row[2] = 0 if slot in served else row[2] + 1
        for c in chunks:
            if c.last:
                del self.rows[c.slot]
            else:
                self.rows[c.slot][1] += len(c.tokens)
        return chunks
