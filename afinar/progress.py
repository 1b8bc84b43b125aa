"""Turns the training loop's metric records into a live progress bar (or log lines when piped)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingDisplay:
    """`on_event` for `run_training`: a rich bar on a terminal, one line per `log_every` steps otherwise."""

    def __init__(self, console: Console | None = None, log_every: int = 10):
        self.console = console or Console(stderr=True)
        self.log_every = log_every
        self.progress: Progress | None = None
        self.task = None
        self.total = 0

    def __call__(self, r: dict) -> None:
        event = r.get("event")
        if event == "start":
            self._start(r)
        elif event == "done":
            self._stop()
            self.console.print(
                f"[green]Run written to {escape(r['output'])}[/] in {r['train_time_s']:.0f} s of training "
                f"({r['tokens_per_s']:.0f} tokens/s); final validation loss {r['final_val_loss']}"
            )
        elif event == "out_of_memory":
            self.console.print(f"[yellow]Out of memory at step {r['step']}: retrying with micro-batch {r['micro_batch']} "
                               f"x accumulation {r['grad_accumulation']} (same effective batch).[/]")
        elif event == "stopped":
            self._stop()
            self.console.print(f"[yellow]{escape(r['message'])}[/] The run keeps the best validation checkpoint.")
        elif event == "crashed":
            self._stop()
            self.console.print(f"[yellow]Training stopped; its checkpoints are kept. Continue with: {escape(r['resume'])}[/]")
        elif "val_loss" in r:
            self.console.print(f"  step {r['step']:>5}  validation loss {r['val_loss']:.4f}  (best {r['best_val_loss']:.4f})")
        elif "loss" in r:
            self._step(r)

    def _start(self, r: dict) -> None:
        dev = r["device"]
        self.total = r["total_steps"]
        self.console.print(
            f"Training on {dev['device']} ({dev['compute_dtype']}, {dev.get('trainable_parameters', 0):,} trainable parameters): "
            f"{r['train_examples']} examples, {r['val_examples']} validation, {self.total} steps"
            + (f", {r['truncated']} truncated" if r["truncated"] else "")
            + (f", {r['dropped']} dropped (no answer token left)" if r["dropped"] else "")
            + (f"; resuming after step {r['resumed_from']}" if r.get("resumed_from") else "")
        )
        if dev.get("quantization", "none") != "none":
            self.console.print(f"Quantization: {dev['quantization']}")
        m = r["memory_estimate_mb"]
        self.console.print(
            f"Estimated memory per step: {m['total']:,.0f} MiB (weights {m['weights']:,.0f}, LoRA {m['lora']:,.0f}, "
            f"optimizer {m['optimizer']:,.0f}, activations {m['activations']:,.0f}); available {m['available']:,.0f} MiB."
        )
        if m["total"] > m["available"]:
            self.console.print(
                "[yellow]Warning: this setting will likely not fit. Lower train.batch_size or train.max_seq_length, "
                "or set train.gradient_checkpointing=true (afinar also halves the micro-batch by itself on out-of-memory).[/]"
            )
        if r["warmup_steps"] >= self.total:
            self.console.print(
                f"[yellow]Note: train.warmup_steps={r['warmup_steps']} >= {self.total} total steps: "
                "the learning rate never reaches its peak.[/]"
            )
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=self.total, stats="")
            self.progress.start()

    def _step(self, r: dict) -> None:
        stats = (f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:.0f} tok/s  "
                 f"mem {r['memory_mb']:.0f} MB (peak {r['peak_memory_mb']:.0f})")
        if self.progress is not None:
            self.progress.update(self.task, completed=r["step"], stats=stats)
        elif r["step"] % self.log_every == 0 or r["step"] in (1, self.total):
            self.console.print(f"  step {r['step']:>5}/{self.total}  {stats}")

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
