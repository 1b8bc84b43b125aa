"""What training reports, as typed records: one schema for `metrics.jsonl`, the progress display and reports.

Every record is a dataclass with a fixed `event` name. The trainer emits them, the run writer appends
them to `metrics.jsonl` as one JSON object a line (`to_json`), and everything that reads a run's
history (the progress display, `loss.png`, `afinar compare`) goes through `read_metrics`, which
turns each line back into its dataclass. Lines written before records carried an `event` field
(runs of afinar 0.1) are recognised by their keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("afinar")


@dataclass
class Start:
    """Training is about to take its first step (also written again after a resume)."""

    event: ClassVar[str] = "start"
    total_steps: int
    train_examples: int
    val_examples: int
    truncated: int
    dropped: int
    warmup_steps: int
    device: dict[str, Any]
    memory_estimate_mb: dict[str, float]
    resumed_from: int | None = None


@dataclass
class Step:
    """One optimizer step."""

    event: ClassVar[str] = "step"
    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    memory_mb: float
    peak_memory_mb: float


@dataclass
class Eval:
    """A validation pass."""

    event: ClassVar[str] = "eval"
    step: int
    val_loss: float
    best_val_loss: float


@dataclass
class OutOfMemory:
    """A step ran out of memory and is retried with half the micro-batch and twice the accumulation."""

    event: ClassVar[str] = "out_of_memory"
    step: int
    micro_batch: int
    grad_accumulation: int


@dataclass
class Checkpoint:
    """A step checkpoint was written (or `best/`, with `best=True`)."""

    event: ClassVar[str] = "checkpoint"
    step: int
    seconds: float
    best: bool = False


@dataclass
class Stopped:
    """Training ended before its planned steps: early stopping or divergence."""

    event: ClassVar[str] = "stopped"
    reason: str  # "early_stopping" | "diverged"
    step: int
    message: str


@dataclass
class Crashed:
    """Training failed after a checkpoint was saved: the run can be resumed."""

    event: ClassVar[str] = "crashed"
    resume: str


@dataclass
class Done:
    """The run folder is complete."""

    event: ClassVar[str] = "done"
    output: str
    train_time_s: float
    tokens_per_s: float
    final_val_loss: float | None


@dataclass
class Status:
    """A slow stage in progress or finished (validation pass, checkpoint, merge); not written to metrics.jsonl."""

    event: ClassVar[str] = "status"
    stage: str
    done: bool = False
    seconds: float | None = None


@dataclass
class Notice:
    """Something the user should know that changes nothing (aliases applied to data); not written to metrics.jsonl."""

    event: ClassVar[str] = "notice"
    message: str


Event = Start | Step | Eval | OutOfMemory | Checkpoint | Stopped | Crashed | Done | Status | Notice
KINDS: dict[str, type] = {k.event: k for k in (Start, Step, Eval, OutOfMemory, Checkpoint, Stopped, Crashed, Done, Status,
                                               Notice)}


def to_dict(event: Event) -> dict[str, Any]:
    return {"event": event.event, **asdict(event)}


def to_json(event: Event) -> str:
    return json.dumps(to_dict(event), ensure_ascii=False)


def from_dict(record: dict[str, Any]) -> Event | None:
    """The dataclass for one metrics record; None for a record of an unknown kind (a newer afinar)."""
    kind = record.get("event") or _legacy_kind(record)
    cls = KINDS.get(kind)
    if cls is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


def _legacy_kind(record: dict) -> str | None:
    """Records of afinar 0.1 had no `event` field: a step had a loss, an evaluation a val_loss."""
    if "val_loss" in record:
        return "eval"
    if "loss" in record:
        return "step"
    return None


def read_metrics(path: str | Path) -> list[Event]:
    """Every record of a `metrics.jsonl`, as dataclasses.

    A last line that does not parse is one a crash cut short mid-write (possibly inside a multi-byte
    character: records are UTF-8): it is dropped silently. A bad line before it (an edit, a damaged
    disk block) is skipped with a warning naming it, and every good record after it is kept: a
    resume rewrites the file from what this returns, so stopping there would delete them.
    """
    path = Path(path)
    if not path.is_file():
        return []
    # Split the bytes, not the text: one torn character must cost one line, and str.splitlines would
    # also split inside a message holding U+2028, which json.dumps(ensure_ascii=False) leaves raw.
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[Event] = []
    bad: list[tuple[int, bytes]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = _parse(line)
        except ValueError:
            if number < len(lines):
                bad.append((number, line))
            continue
        if event is not None:
            out.append(event)
    if bad:
        log.warning(_damaged(path, bad, len(out)))
    return out


def _parse(line: bytes) -> Event | None:
    """One line's record; ValueError when it is not one (bad UTF-8 or JSON, or a record missing its fields)."""
    record = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    try:
        return from_dict(record)
    except TypeError as e:  # a known event without its fields
        raise ValueError(str(e)) from None


def _damaged(path: Path, bad: list[tuple[int, bytes]], kept: int) -> str:
    numbers = ", ".join(str(n) for n, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    first = bad[0][1].decode("utf-8", errors="replace")
    shown = first if len(first) <= 60 else first[:57] + "..."
    what = f"line {numbers} is not a metrics record" if len(bad) == 1 else f"lines {numbers} are not metrics records"
    return (f"{path}: {what} (line {bad[0][0]}: {shown!r}); skipped, the other {kept} records are kept. "
            f"Fix or delete {'that line' if len(bad) == 1 else 'those lines'} if the run's history matters.")


def of_kind(events: list[Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]
