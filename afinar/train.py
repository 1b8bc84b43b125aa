"""The trainer: framework-free; the backend does the tensor work, `schedule.py` decides what comes when.

One optimizer step = `grad_accumulation` micro-batches, the loss the mean over every answer token
of the step (see schedule.py). The trainer holds the run's state on itself and reports through
typed events (events.py), which the run writer appends to metrics.jsonl and `on_event` shows.

    result = Trainer(cfg, "runs/x").run()      # or run_training(cfg, "runs/x")
    result.output, result.stopped, result.best_val_loss

`setup()` then `step()` also work on their own (benchmarks time steps this way).
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from afinar import __version__, checkpoints, data, distributed, events, inputs, memory, models, oserrors, rng, runs, schedule, sinks
from afinar.backends import TrainingBackend, training_backend
from afinar.config import Config
from afinar.errors import AfinarError
from afinar.runs import NullWriter, RunWriter


@dataclass
class LoopState:
    """Everything the loop carries from step to step; saved in each checkpoint, so resume is exact."""

    step: int = 0
    consumed: int = 0  # micro-batches taken from the deterministic stream
    epoch: int = 0
    tokens_seen: int = 0
    targets_seen: int = 0
    best_val: float | None = None
    best_step: int | None = None
    last_val: float | None = None
    evals_without_improvement: int = 0
    smoothed_loss: float | None = None
    smoothed_min: float | None = None
    train_time_s: float = 0.0
    split: int = 1  # micro-batches are cut in this many pieces after out-of-memory errors
    oom_events: list = field(default_factory=list)


@dataclass
class TrainResult:
    """What a finished training run reports (the same figures are in its metadata.json)."""

    output: Path
    steps: int
    planned_steps: int
    stopped: events.Stopped | None
    best_step: int | None
    best_val_loss: float | None
    final_val_loss: float | None
    adapter_step: int
    train_time_s: float
    tokens_per_s: float
    peak_memory_mb: float

    @property
    def diverged(self) -> bool:
        return self.stopped is not None and self.stopped.reason == "diverged"


class TrainingInterrupted(AfinarError):
    exit_code = 130


class Trainer:
    def __init__(self, cfg: Config, output: str | Path, *, overwrite: bool = False, resume: bool = False,
                 force: bool = False, on_event: Callable[[events.Event], None] | None = None,
                 backend: TrainingBackend | None = None):
        """`backend`: an already loaded training backend (benchmarks); by default the config's, loaded in setup()."""
        self.cfg, self.output = cfg, Path(output)
        self.overwrite, self.resume, self.force = overwrite, resume, force
        self.world = distributed.from_env()
        # One process prints and logs: the display, and the TensorBoard / W&B sinks of train.report_to.
        self.on_event = sinks.fan_out(on_event, *sinks.for_config(cfg, self.output)) if self.world.main else None
        self.backend, self._loaded = backend, backend is not None
        self.state = LoopState()
        self.inputs: dict = {}  # the data's and base model's fingerprints (inputs.py)
        self.writer: RunWriter | None = None
        self.started = time.time()

    # ------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        """Train per the config and write the run folder; resume from the newest valid checkpoint if asked."""
        try:
            self.setup()
            stopped = None
            with _StopSignal() as stop:
                while self.state.step < self.total and stopped is None:
                    stopped = self.step()
                    if stopped is None and self._stop_requested(stop):
                        if self.world.main:
                            self.save()
                        raise TrainingInterrupted(f"Interrupted: checkpoint saved at step {self.state.step} of "
                                                  f"{self.total}. Resume with: afinar train --resume {self.output}")
            if stopped:
                self.log(stopped)
            return self.finish(stopped)
        except BaseException as e:
            self._on_crash(e)
            raise
        finally:
            if self.writer is not None:
                self.writer.release()  # the run's lock: another process may now resume it

    def setup(self) -> None:
        """Read the data, open the run folder, load the model, restore a checkpoint, plan memory."""
        cfg = self.cfg
        if not cfg.data.train:
            raise AfinarError("data.train is not set: name your training file with --set data.train=FILE (JSONL; "
                              "--set data.val=FILE for validation), or use --preset cpu for the bundled demo data.")
        read = [data.read_setting(value) for value in (cfg.data.train, cfg.data.val) if value]
        self.train_ex, self.val_ex = read[0].examples, read[1].examples if len(read) > 1 else []
        for notice in (n for d in read for n in d.notices):  # e.g. "read as ShareGPT (aliases applied)"
            self.emit(events.Notice(notice))
        if len(self.train_ex) < cfg.train.batch_size:
            raise AfinarError(f"{cfg.data.train} has {len(self.train_ex)} examples, fewer than "
                              f"train.batch_size={cfg.train.batch_size}. Add examples, or lower it: "
                              f"--set train.batch_size={max(1, len(self.train_ex))}")
        self.resolved = models.resolve(cfg.model.base)
        # Hashed now, as read: what a resume must match, and what metadata.json records at the end.
        self.inputs = inputs.fingerprints(cfg, self.resolved) if self.world.main else {}
        if not self.world.main:  # only rank 0 writes the run folder
            self.writer = NullWriter(self.output)
        elif self.resume:
            self.writer = RunWriter.reopen(self.output, cfg, self.force, self.inputs)
        else:
            self.writer = RunWriter.create(self.output, self.overwrite, cfg, self.inputs)
        for note in self.writer.notes:
            self.emit(events.Notice(note))
        if not self._loaded:
            self.backend = training_backend(cfg, self.world)
            with self.stage(f"Loading the base model {cfg.model.base}"):
                tokenizer = self.backend.load(self.resolved)
        else:
            tokenizer = self.backend.tokenizer
        self.collective = self.backend.collective
        with self.stage(f"Tokenizing {len(self.train_ex)} training and {len(self.val_ex)} validation examples"):
            prepared = schedule.prepare(cfg, tokenizer, self.train_ex, self.val_ex)
        self._start(prepared)

    @classmethod
    def on_examples(cls, cfg: Config, backend: TrainingBackend, examples: list[data.Encoded],
                    on_event: Callable[[events.Event], None] | None = None) -> "Trainer":
        """A trainer over encoded examples with a loaded backend, writing no run folder: benchmarks time its step()."""
        trainer = cls(cfg, Path(tempfile.gettempdir()) / "afinar-no-run", on_event=on_event, backend=backend)
        trainer.writer, trainer.train_ex, trainer.val_ex = NullWriter(trainer.output), [], []
        trainer.collective = backend.collective
        trainer._start(schedule.Prepared(list(examples), [], 0, 0))
        return trainer

    def _start(self, prepared: schedule.Prepared) -> None:
        """Plan the run over `prepared` (steps, memory), restore a checkpoint if resuming, say so, position the data."""
        cfg = self.cfg
        self.prepared = prepared
        self.per_epoch = len(schedule.epoch_batches(prepared, cfg))
        self.total = schedule.total_steps(cfg, len(prepared.train), self.per_epoch)
        self.resumed_from = self._restore() if self.resume else None
        self.memory_plan = self._memory_plan()
        self.log(events.Start(
            total_steps=self.total, train_examples=len(prepared.train), val_examples=len(prepared.val),
            truncated=prepared.truncated, dropped=prepared.dropped, warmup_steps=cfg.train.warmup_steps,
            device=self.backend.describe(), memory_estimate_mb=self.memory_plan, resumed_from=self.resumed_from))
        self.stream = schedule.micro_batches(prepared, cfg)
        for _ in range(self.state.consumed):  # replay the data order up to the checkpoint
            next(self.stream)

    def step(self) -> events.Stopped | None:
        """One optimizer step, its record, and the evaluation and checkpoint due after it.

        With several processes each takes its share of the step's micro-batches, scaled by the
        step's global target count; the backend sums gradients, the collective the losses.
        """
        t0 = time.perf_counter()
        st, t = self.state, self.cfg.train
        window = [next(self.stream) for _ in range(t.grad_accumulation)]
        n_targets = sum(e.n_targets for _, mb in window for e in mb)
        mine = distributed.shard([mb for _, mb in window], self.world)
        loss_sum = self.collective.all_sum([self._accumulate(mine, n_targets, filler=window[0][1][:1])])[0]
        lr = schedule.lr_at(st.step + 1, self.total, self.cfg)
        grad_norm = self.backend.optimizer_step(lr)
        st.step, st.consumed, st.epoch = st.step + 1, st.consumed + len(window), window[-1][0]
        loss = loss_sum / n_targets
        if diverged := self._divergence(loss):
            return diverged
        tokens = sum(len(e.input_ids) for _, mb in window for e in mb)
        st.tokens_seen, st.targets_seen = st.tokens_seen + tokens, st.targets_seen + n_targets
        dt = time.perf_counter() - t0
        st.train_time_s += dt
        mem = self.backend.memory()
        self.log(events.Step(step=st.step, epoch=round(st.epoch + 1, 3), loss=round(loss, 5), lr=lr,
                             grad_norm=round(grad_norm, 4), tokens=st.tokens_seen, tokens_per_s=round(tokens / dt, 1),
                             elapsed_s=round(st.train_time_s, 2), memory_mb=round(mem["memory_mb"], 1),
                             peak_memory_mb=round(mem["peak_memory_mb"], 1)))
        stopped = self.evaluate() if st.step % t.eval_every == 0 or st.step == self.total else None
        if self.world.main and t.save_every and st.step % t.save_every == 0 and st.step < self.total:
            self.save()
        return stopped

    def evaluate(self) -> events.Stopped | None:
        """Validation loss now; keep the best adapter; stop early after `early_stopping_patience` checks."""
        st = self.state
        if not self.prepared.val:
            return None
        with self.stage("validation"):
            val = schedule.validation_loss(self.backend, self.prepared.val, schedule.eval_batch_size(self.cfg),
                                           self.world, self.collective)
        st.last_val = val
        if st.best_val is None or val < st.best_val:
            st.best_val, st.best_step, st.evals_without_improvement = val, st.step, 0
            if self.world.main:
                t0 = time.perf_counter()
                with self.stage("saving the best adapter"):
                    checkpoints.save_best(self.writer.tmp, self.backend, st.step, val)
                self.log(events.Checkpoint(step=st.step, seconds=round(time.perf_counter() - t0, 2), best=True))
        else:
            st.evals_without_improvement += 1
        self.log(events.Eval(step=st.step, val_loss=round(val, 5), best_val_loss=round(st.best_val, 5)))
        self.writer.write_state(self._state_summary())
        patience = self.cfg.train.early_stopping_patience
        if patience and st.evals_without_improvement >= patience:
            return events.Stopped("early_stopping", st.step,
                                  f"No validation improvement in {patience} checks since step {st.best_step} "
                                  f"(best {st.best_val:.4f}): stopped early.")
        return None

    def save(self) -> Path:
        """A step checkpoint: the backend's state, every RNG state and the loop state (exact resume)."""
        t0 = time.perf_counter()
        with self.stage("saving a checkpoint"):
            path = checkpoints.save(self.writer.tmp, self.backend,
                                    {"step": self.state.step, "total_steps": self.total, "loop": asdict(self.state)},
                                    self.cfg.train.keep_checkpoints)
        self.log(events.Checkpoint(step=self.state.step, seconds=round(time.perf_counter() - t0, 2)))
        return path

    def finish(self, stopped: events.Stopped | None = None) -> TrainResult:
        """Choose the final adapter, write metadata and the rest, publish the run folder."""
        st, cfg = self.state, self.cfg
        if not self.world.main:
            self.collective.all_sum([0.0])  # return once rank 0 has written the run folder
            return self._result(stopped, st.step, None)
        best = checkpoints.best(self.writer.tmp)
        diverged = stopped is not None and stopped.reason == "diverged"
        lost = None
        if best is None and st.best_step is not None:  # deleted, damaged or from a replayed timeline (see _restore)
            lost = (f"the best adapter (step {st.best_step}, validation loss {st.best_val:.4f}) was lost with "
                    f"{checkpoints.folder(self.writer.tmp) / checkpoints.BEST}")
        if diverged and best is None:
            saved = lost[0].upper() + lost[1:] if lost else "No validation checkpoint was saved before it"
            raise AfinarError(f"{stopped.message} {saved}, so no run was written.")
        if best is not None and (cfg.train.final_adapter == "best" or diverged):
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy2(best[1] / name, self.writer.tmp / name)
            adapter_step, adapter_source = best[0]["step"], "best"
        else:
            with oserrors.writing(self.writer.tmp, run=self.writer.tmp, mid_run=True):
                self.backend.save_adapter(self.writer.tmp)
            adapter_step, adapter_source = st.step, "last"
        note = None
        if lost and cfg.train.final_adapter == "best":
            note = f"train.final_adapter is 'best', but {lost}: the run holds the adapter of the last step ({st.step})."
            self.emit(events.Notice(note))
        with self.stage("Writing the run folder"):
            metadata = self._metadata(stopped, adapter_step, adapter_source)
            if note:
                metadata["adapter_note"] = note
            self.writer.finish(cfg, metadata, self._state_summary(), self._guide_question())
        result = self._result(stopped, adapter_step, metadata)
        self.emit(events.Done(output=str(self.output), train_time_s=metadata["train_time_s"],
                              tokens_per_s=metadata["tokens_per_s"], final_val_loss=metadata["final_val_loss"]))
        if self.world.size > 1:
            self.collective.all_sum([0.0])
        return result

    # ------------------------------------------------------------ reporting

    def emit(self, event: events.Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        """Announce a slow stage (`events.Status`) and its end; a failed one ends without a duration."""
        self.emit(events.Status(text))
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.emit(events.Status(text, done=True))
            raise
        self.emit(events.Status(text, done=True, seconds=round(time.perf_counter() - t0, 2)))

    def log(self, event: events.Event) -> None:
        """A record for metrics.jsonl (rank 0) and for the display."""
        self.writer.log(event)
        self.emit(event)

    # ------------------------------------------------------------ pieces of the above

    def _accumulate(self, micro_batches: list, n_targets: int, filler: list) -> float:
        """Forward and backward over one step's micro-batches; on out-of-memory, split them and retry.

        Each micro-batch is cut into `state.split` pieces, so halving the micro-batch doubles the
        accumulation: the step still sees the same examples with the same loss scale.
        """
        st, t = self.state, self.cfg.train
        while True:
            try:
                loss_sum = 0.0
                for mb in micro_batches:
                    if not mb:  # no share of this micro-batch here (see distributed.shard): a zero-weight pass
                        self.backend.forward_backward(filler, scale=0.0)
                        continue
                    size = math.ceil(len(mb) / st.split)
                    for i in range(0, len(mb), size):
                        loss_sum += self.backend.forward_backward(mb[i : i + size], scale=1.0 / n_targets)[0]
                return loss_sum
            except Exception as e:
                if not self.backend.is_out_of_memory(e):
                    raise
                if self.world.size > 1 and self.cfg.distributed.strategy == "fsdp":  # a retry would desynchronise FSDP
                    raise AfinarError(f"Out of memory at step {st.step + 1} under FSDP ({self.world.size} processes). "
                                      f"Lower train.batch_tokens (now {t.batch_tokens}) or train.batch_size (now "
                                      f"{t.batch_size}), or set train.gradient_checkpointing=true.") from None
                self.backend.recover_from_out_of_memory()
                if t.batch_size // st.split <= 1:
                    raise AfinarError(
                        f"Out of memory at step {st.step + 1} even with a micro-batch of 1 example. Lower "
                        f"train.max_seq_length (now {t.max_seq_length}), set train.gradient_checkpointing=true, "
                        "or use model.quantization=nf4.") from None
                st.split *= 2
                event = events.OutOfMemory(step=st.step + 1, micro_batch=math.ceil(t.batch_size / st.split),
                                           grad_accumulation=t.grad_accumulation * st.split)
                st.oom_events.append(events.to_dict(event))
                self.log(event)

    def _divergence(self, loss: float) -> events.Stopped | None:
        """NaN/inf, or the smoothed loss far above its running minimum: stop with advice."""
        st, t = self.state, self.cfg.train
        advice = (f"Try --set train.learning_rate={t.learning_rate / 2:g} (now {t.learning_rate:g}) "
                  f"and --set train.warmup_steps={max(2 * t.warmup_steps, 10)} (now {t.warmup_steps}).")
        if not math.isfinite(loss):
            return events.Stopped("diverged", st.step, f"Training loss became {loss} at step {st.step}. {advice}")
        st.smoothed_loss = loss if st.smoothed_loss is None else 0.9 * st.smoothed_loss + 0.1 * loss
        st.smoothed_min = min(st.smoothed_min if st.smoothed_min is not None else math.inf, st.smoothed_loss)
        if t.divergence_factor and st.smoothed_loss > t.divergence_factor * st.smoothed_min:
            return events.Stopped("diverged", st.step,
                                  f"Training loss diverged at step {st.step}: smoothed {st.smoothed_loss:.3f} > "
                                  f"{t.divergence_factor:g} x its minimum {st.smoothed_min:.3f}. {advice}")
        return None

    def _restore(self) -> int | None:
        """Continue from the newest valid checkpoint of the unfinished run; its step, or None if it had none.

        A damaged newer checkpoint (checksums, or files that do not load) is named, with the steps it
        costs, and the one before it is used; temporary files of interrupted writes are removed.
        """
        tmp = self.writer.tmp
        if self.world.main:
            for note in (checkpoints.restore_interrupted_swaps(tmp), checkpoints.cleanup_partial_writes(tmp).message()):
                if note:
                    self.emit(events.Notice(note))

        def load(folder: Path) -> None:
            try:
                self.backend.load_state(folder)
            except Exception as e:
                if not self.backend.is_out_of_memory(e) and (reason := self._incompatible(folder, e)):
                    raise checkpoints.Incompatible(reason) from None
                raise
            self.backend.set_rng_state(rng.load(folder))

        found = checkpoints.load_newest_valid(tmp, load)
        step = 0
        if found:
            if message := found.message():
                self.emit(events.Notice(message))
            self.state = LoopState(**found.state["loop"])
            step = self.state.step
        if self.world.main and (notice := self._check_best(step)):
            self.emit(events.Notice(notice))
        self.writer.truncate(step)
        if self.collective.all_sum([step])[0] != step * self.world.size:
            raise AfinarError(f"The processes resumed {self.writer.tmp} from different steps (this one: {step}): "
                              "every node must read the same run folder (a shared filesystem).")
        self.writer.accept(step)  # only now: a config the checkpoints do not take must not replace the run's own
        return step if found else None

    def _incompatible(self, folder: Path, error: Exception) -> str | None:
        """Why `folder` does not load under the config a forced resume changed (e.g. another lora.rank),
        or None when no setting that shapes the weights changed: then the checkpoint itself is at fault."""
        changed = {k: v for k, v in runs.config_changes(self.writer.tmp, self.cfg).items() if k in runs.SHAPING}
        if not changed:
            return None
        what = "; ".join(f"{k} {old!r} -> {new!r}: the checkpoints hold {runs.SHAPING[k].format(old)}"
                         for k, (old, new) in changed.items())
        keep = " ".join(f"--set {k}=" + (f"[{','.join(old)}]" if isinstance(old, list) else str(old))
                        for k, (old, _) in changed.items())
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 120 else detail[:117] + "..."
        return (f"The changed config does not fit the checkpoints of {self.writer.tmp} ({what}; loading {folder.name} "
                f"failed: {type(error).__name__}: {detail}). Nothing was changed: resume with the run's own settings "
                f"(afinar train --resume {self.output} without the change, or with {keep}), or start a new run with "
                "another --output.")

    def _check_best(self, step: int) -> str | None:
        """Make checkpoints/best/ fit the resume from `step`, before any training; what to tell the user, or None."""
        st = self.state
        problems = [why] if (why := checkpoints.discard_unusable_best(self.writer.tmp, step)) else []
        if st.best_step is not None and checkpoints.best(self.writer.tmp) is None:
            problems.append(f"the best adapter so far (step {st.best_step}, validation loss {st.best_val:.4f}) is lost: "
                            f"the run ends with the last adapter unless a later validation check beats {st.best_val:.4f}")
        return "; ".join(problems) or None

    def _memory_plan(self) -> dict[str, float]:
        """The estimate of a step's memory, for the worst micro-batch: the longest examples together."""
        t = self.cfg.train
        widest = max(len(e.input_ids) for e in self.prepared.train)
        answers = sum(sorted(e.n_targets for e in self.prepared.train)[-t.batch_size:])
        batch_tokens = widest * t.batch_size
        if t.batch_tokens:
            batch_tokens = min(batch_tokens, max(t.batch_tokens, widest))
        return memory.estimate(self.backend.model_facts(), batch_tokens, answers, t.gradient_checkpointing)

    def _stop_requested(self, stop: "_StopSignal") -> bool:
        # A signal reaches processes at different steps: stop together.
        return self.collective.all_sum([float(stop.requested)])[0] > 0

    def _on_crash(self, error: BaseException) -> None:
        if self.writer is None or not self.world.main:
            return
        if checkpoints.step_checkpoints(self.writer.tmp):
            # A crash loses at most the work since the last checkpoint. Errors that a plain resume would
            # repeat say themselves what to do instead.
            if not isinstance(error, TrainingInterrupted) and getattr(error, "resumable", True):
                self.emit(events.Crashed(resume=f"afinar train --resume {self.output}"))
        else:
            self.writer.abandon()

    def _state_summary(self) -> dict:
        st = self.state
        return {"global_step": st.step, "max_steps": self.total, "epoch": st.epoch + 1, "best_val_loss": st.best_val,
                "best_step": st.best_step, "tokens_seen": st.tokens_seen}

    def _guide_question(self) -> str:
        """A question from the run's own data for INTEGRATION_GUIDE.md (validation first: not trained on)."""
        for ex in (*self.val_ex, *self.train_ex):
            if ex.question.strip():
                return ex.question
        return "Hello!"

    def _metadata(self, stopped: events.Stopped | None, adapter_step: int, adapter_source: str) -> dict:
        st, cfg = self.state, self.cfg
        backend = self.backend
        return {
            "afinar_version": __version__,
            "method": cfg.method,
            "base_model": {"name": cfg.model.base, "path": self.resolved.path, "source": self.resolved.source,
                           "sha256": models.content_hash(self.resolved), **self._replaced("model.base", "fingerprint")},
            "data": {split: {**_data_info(value, n, self.inputs.get(f"data.{split}", {}).get("sha256")),
                             **self._replaced(f"data.{split}", "sha256")} for split, value, n in
                     (("train", cfg.data.train, len(self.train_ex)), ("val", cfg.data.val, len(self.val_ex))) if value},
            "examples_truncated": self.prepared.truncated,
            "examples_dropped": self.prepared.dropped,
            "device": backend.describe(),
            "host": {"python": sys.version.split()[0], "platform": platform.platform()},
            "steps": st.step,
            "planned_steps": self.total,
            "epochs_completed": round(st.consumed / self.per_epoch, 3),
            "tokens_seen": st.tokens_seen,
            "target_tokens_seen": st.targets_seen,
            "train_time_s": round(st.train_time_s, 2),
            "wall_time_s": round(time.time() - self.started, 2),
            "tokens_per_s": round(st.tokens_seen / max(st.train_time_s, 1e-9), 1),
            "peak_memory_mb": round(backend.memory()["peak_memory_mb"], 1),
            "final_train_loss": next((e.loss for e in reversed(self.writer.history) if isinstance(e, events.Step)), None),
            "final_val_loss": None if st.last_val is None else round(st.last_val, 5),
            "best_val_loss": None if st.best_val is None else round(st.best_val, 5),
            "best_val_step": st.best_step,
            "adapter_step": adapter_step,
            "adapter_source": adapter_source,
            "resumed_from_step": self.resumed_from,
            "memory_estimate_mb": self.memory_plan,
            "micro_batch_size": math.ceil(cfg.train.batch_size / st.split),
            "out_of_memory_events": st.oom_events,
            "stopped": None if stopped is None else asdict(stopped),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _replaced(self, name: str, kind: str) -> dict:
        """{"earlier_<kind>": [...]}: the content `name` had for the first steps, when a forced resume changed it."""
        earlier = [{kind: h["hash"], "until_step": h["until_step"]}
                   for h in self.writer.inputs.get("replaced", []) if h.get("input") == name]
        return {f"earlier_{kind}": earlier} if earlier else {}

    def _result(self, stopped, adapter_step: int, metadata: dict | None) -> TrainResult:
        st = self.state
        m = metadata or {}
        return TrainResult(output=self.output, steps=st.step, planned_steps=self.total, stopped=stopped,
                           best_step=st.best_step, best_val_loss=m.get("best_val_loss"),
                           final_val_loss=m.get("final_val_loss"), adapter_step=adapter_step,
                           train_time_s=round(st.train_time_s, 2), tokens_per_s=m.get("tokens_per_s", 0.0),
                           peak_memory_mb=m.get("peak_memory_mb", 0.0))


def run_training(cfg: Config, output: str | Path, overwrite: bool = False,
                 on_event: Callable[[events.Event], None] | None = None, resume: bool = False,
                 force: bool = False) -> TrainResult:
    """`Trainer(...).run()` in one call."""
    return Trainer(cfg, output, overwrite=overwrite, resume=resume, force=force, on_event=on_event).run()


class _StopSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to abort without one).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _data_info(value: str, count: int, sha256: str | None = None) -> dict:
    """Where a data file is (absolute, so the run folder says it wherever it is read) and what it holds
    (`sha256`: as hashed when this process read it, which is what it trained on)."""
    path = data.resolve_path(value)
    return {"setting": value, "path": str(path.resolve()), "examples": count,
            "sha256": sha256 or data.content_sha256(path)}
