"""What training reports, as typed records: one schema for `metrics.jsonl`, the progress display and reports.

Every record is a dataclass with a fixed `event` name. The trainer emits them, the run writer appends
them to `metrics.jsonl` as one JSON object a line (`to_json`), and everything that reads a run's
history (the progress display, `loss.png`, `afinar compare`) goes through `read_metrics`, which
turns each line back into its dataclass. Lines written before records carried an `event` field
(runs of afinar 0.1) are recognised by their keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar


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
    """Every record of a `metrics.jsonl`, as dataclasses; a line cut short by a crash ends the list."""
    path = Path(path)
    if not path.is_file():
        return []
    out: list[Event] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        event = from_dict(record) if isinstance(record, dict) else None
        if event is not None:
            out.append(event)
    return out


def of_kind(events: list[Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]
