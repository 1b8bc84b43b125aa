"""Training metrics to TensorBoard and Weights & Biases: event consumers, like the progress display.

`train.report_to: [tensorboard, wandb]` adds them (`pip install 'afinar[logging]'`); the trainer
hands every event to each, on rank 0 only. They send the figures of metrics.jsonl, under one name
each (`scalars`): every step's loss, learning rate, gradient norm, tokens/s, memory and epoch, and
every validation's loss. The x axis is the optimizer step.

  tensorboard  `RUN/tensorboard/` through `torch.utils.tensorboard.SummaryWriter`:
               `tensorboard --logdir RUN/tensorboard` (or `RUN.partial/tensorboard` while it trains).
               A resumed run purges what came after its checkpoint, as metrics.jsonl does.
  wandb        one W&B run per `afinar train` process, named after the run folder, with the
               resolved config. W&B's own variables choose where it goes: WANDB_PROJECT (default
               "afinar"), WANDB_ENTITY, WANDB_MODE=offline (no account needed), WANDB_DIR.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from afinar import events
from afinar.config import Config
from afinar.errors import AfinarError

STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "memory_mb", "peak_memory_mb", "epoch")
EVAL_FIELDS = ("val_loss", "best_val_loss")
TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'afinar[logging]'"


def scalars(event: events.Event) -> dict[str, float]:
    """The figures of one metrics record, by the name both sinks use ('train/loss', 'eval/val_loss')."""
    if isinstance(event, events.Step):
        return {f"train/{name}": float(getattr(event, name)) for name in STEP_FIELDS}
    if isinstance(event, events.Eval):
        return {f"eval/{name}": float(getattr(event, name)) for name in EVAL_FIELDS}
    return {}


def _require(module: str, target: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise AfinarError(f"train.report_to includes '{target}', but the '{module}' package is not installed. "
                          f"Install it with: {INSTALL}  (or remove '{target}' from train.report_to).")


class TensorBoardSink:
    """Scalars into an event file under `folder`, opened when training starts."""

    def __init__(self, folder: str | Path):
        _require("tensorboard", "tensorboard")
        self.folder = Path(folder)
        self.writer = None

    def __call__(self, e: events.Event) -> None:
        if isinstance(e, events.Start):
            from torch.utils.tensorboard import SummaryWriter

            self.close()
            # Steps after the checkpoint a run resumes from were lost with the crash: hide them.
            self.writer = SummaryWriter(str(self.folder), purge_step=(e.resumed_from or 0) + 1, flush_secs=10)
        elif self.writer is not None and (figures := scalars(e)):
            for tag, value in figures.items():
                self.writer.add_scalar(tag, value, e.step)
        elif isinstance(e, (events.Done, events.Crashed)):
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """One W&B run per training process: the config at start, the scalars by step, the result at the end."""

    def __init__(self, cfg: Config, name: str):
        _require("wandb", "wandb")
        self.cfg, self.name = cfg, name
        self.run = None

    def __call__(self, e: events.Event) -> None:
        if isinstance(e, events.Start):
            self._open(e)
        elif self.run is None:
            return
        elif figures := scalars(e):
            self.run.log(figures, step=e.step)
        elif isinstance(e, events.Done):
            self.run.summary.update({"train_time_s": e.train_time_s, "tokens_per_s": e.tokens_per_s,
                                     "final_val_loss": e.final_val_loss, "output": e.output})
            self._finish(0)
        elif isinstance(e, events.Crashed):
            self._finish(1)

    def _open(self, e: events.Start) -> None:
        import wandb

        self._finish(0)
        name = self.name + (f" (resumed after step {e.resumed_from})" if e.resumed_from else "")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "afinar", name=name, group=self.name, job_type="train",
                config={**self.cfg.model_dump(mode="json"), "total_steps": e.total_steps,
                        "train_examples": e.train_examples, "val_examples": e.val_examples, "device": e.device},
                reinit="create_new", settings=wandb.Settings(console="off"))  # afinar's own output is not a metric
        except Exception as err:  # no account, no network: say what to do instead of a W&B traceback
            raise AfinarError(f"train.report_to=wandb: Weights & Biases could not start a run ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}). Log in with `wandb login`, or set WANDB_MODE=offline "
                              "to write the run locally (upload it later with `wandb sync`).") from None

    def _finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def for_config(cfg: Config, output: str | Path) -> list[Callable[[events.Event], None]]:
    """The sinks `train.report_to` asks for, for the run written to `output` (checked before training)."""
    from afinar.runs import partial

    made: list[Callable[[events.Event], None]] = []
    for target in cfg.train.report_to:
        if target == "tensorboard":
            made.append(TensorBoardSink(partial(output) / TENSORBOARD_DIR))
        elif target == "wandb":
            made.append(WandbSink(cfg, Path(output).name))
    return made


def fan_out(*consumers: Callable[[events.Event], None] | None) -> Callable[[events.Event], None] | None:
    """One `on_event` that hands each event to every consumer, in order (None when there is none)."""
    present = [c for c in consumers if c is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def on_event(e: events.Event) -> None:
        for consumer in present:
            consumer(e)

    return on_event
