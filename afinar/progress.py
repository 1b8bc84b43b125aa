"""Turns the trainer's events (events.py) into a live progress bar, or log lines when piped."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from afinar import events
from afinar import status


class TrainingDisplay:
    """`on_event` for the trainer: a rich bar on a terminal, one line per `log_every` steps otherwise.

    Slow stages (`events.Status`: loading the model, tokenizing, validation, checkpoints) show as a
    spinner with the elapsed time before the bar exists, in the bar while it runs, and as one line
    with their duration when they took longer than `status.SLOW_S` seconds.
    """

    def __init__(self, console: Console | None = None, log_every: int = 10):
        self.console = console or Console(stderr=True)
        self.log_every = log_every
        self.progress: Progress | None = None
        self.task = None
        self.total = 0
        self.stages: dict[str, status.Stage] = {}
        status.use_console(self.console)  # stages of library code (GGUF, hashing) then share this terminal

    def __call__(self, e: events.Event) -> None:
        if isinstance(e, events.Start):
            self._start(e)
        elif isinstance(e, events.Step):
            self._step(e)
        elif isinstance(e, events.Eval):
            self._print(f"  step {e.step:>5}  validation loss {e.val_loss:.4f}  (best {e.best_val_loss:.4f})")
        elif isinstance(e, events.Status):
            self._status(e)
        elif isinstance(e, events.Notice):
            self.console.print(f"[cyan]note:[/] {escape(e.message)}", highlight=False)
        elif isinstance(e, events.Checkpoint):
            what = "best adapter" if e.best else "checkpoint"
            self._print(f"  step {e.step:>5}  {what} saved ({e.seconds:.1f} s)", dim=True)
        elif isinstance(e, events.OutOfMemory):
            self._print(f"[yellow]Out of memory at step {e.step}: retrying with micro-batch {e.micro_batch} "
                        f"x accumulation {e.grad_accumulation} (same effective batch).[/]", markup=True)
        elif isinstance(e, events.Stopped):
            self._stop()
            self.console.print(f"[yellow]{escape(e.message)}[/] The run keeps the best validation checkpoint.")
        elif isinstance(e, events.Crashed):
            self._stop()
            self.console.print(f"[yellow]Training stopped; its checkpoints are kept. Continue with: {escape(e.resume)}[/]")
        elif isinstance(e, events.Done):
            self._stop()
            self.console.print(
                f"[green]Run written to {escape(e.output)}[/] in {e.train_time_s:.0f} s of training "
                f"({e.tokens_per_s:.0f} tokens/s); final validation loss {e.final_val_loss}")

    def _print(self, text: str, markup: bool = False, dim: bool = False) -> None:
        text = text if markup else escape(text)
        self.console.print(f"[dim]{text}[/]" if dim else text, highlight=False)

    def _status(self, e: events.Status) -> None:
        """A slow stage: in the bar while training, else a status spinner; its duration once done."""
        if not e.done:
            if self.progress is not None:
                self.progress.update(self.task, stats=f"{e.stage}...")
            else:
                self.stages[e.stage] = status.Stage(e.stage, self.console).start()
            return
        stage = self.stages.pop(e.stage, None)
        if stage is not None:  # it prints its own line (if it was slow and finished)
            stage.stop(ok=e.seconds is not None)
        elif e.seconds is not None and e.seconds > status.SLOW_S:
            self._print(f"  {status.done_line(e.stage, e.seconds)}", dim=True)

    def _start(self, e: events.Start) -> None:
        dev = e.device
        self.total = e.total_steps
        self.console.print(
            f"Training on {dev['device']} ({dev['compute_dtype']}, {dev.get('trainable_parameters', 0):,} trainable parameters): "
            f"{e.train_examples} examples, {e.val_examples} validation, {self.total} steps"
            + (f", {e.truncated} truncated" if e.truncated else "")
            + (f", {e.dropped} dropped (no answer token left)" if e.dropped else "")
            + (f"; resuming after step {e.resumed_from}" if e.resumed_from else ""), highlight=False
        )
        if by_module := dev.get("trainable_parameters_by_module"):
            kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(by_module.items()))
            self.console.print(f"LoRA parameters by layer: {kinds}", highlight=False)
        if dev.get("quantization", "none") != "none":
            self.console.print(f"Quantization: {dev['quantization']}", highlight=False)
        m = e.memory_estimate_mb
        self.console.print(
            f"Estimated memory per step: {m['total']:,.0f} MiB (weights {m['weights']:,.0f}, LoRA {m['lora']:,.0f}, "
            f"framework {m['framework']:,.0f}, optimizer {m['optimizer']:,.0f}, activations {m['activations']:,.0f}); "
            f"available {m['available']:,.0f} MiB.", highlight=False
        )
        if m["total"] > m["available"]:
            self.console.print(
                "[yellow]Warning: this setting will likely not fit. Lower train.batch_size or train.max_seq_length, "
                "or set train.gradient_checkpointing=true (afinar also halves the micro-batch by itself on out-of-memory).[/]"
            )
        if e.warmup_steps >= self.total:
            self.console.print(
                f"[yellow]Note: train.warmup_steps={e.warmup_steps} >= {self.total} total steps: "
                "the learning rate never reaches its peak.[/]"
            )
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=self.total, stats="")
            self.progress.start()

    def _step(self, e: events.Step) -> None:
        stats = (f"loss {e.loss:.4f}  lr {e.lr:.2e}  {e.tokens_per_s:.0f} tok/s  "
                 f"mem {e.memory_mb:.0f} MB (peak {e.peak_memory_mb:.0f})")
        if self.progress is not None:
            self.progress.update(self.task, completed=e.step, stats=stats)
        elif e.step % self.log_every == 0 or e.step in (1, self.total):
            self.console.print(f"  step {e.step:>5}/{self.total}  {stats}", highlight=False)

    def _stop(self) -> None:
        for stage in self.stages.values():
            stage.stop(ok=False)
        self.stages.clear()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
