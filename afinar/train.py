"""The training loop: framework-free, the backend does the tensor work.

One optimizer step = `grad_accumulation` micro-batches. The loss is the mean over every
answer token of the whole step (each micro-batch's token-loss sum is scaled by 1 / targets
in the step), so the gradient does not depend on how the step is cut into micro-batches,
nor on how many processes share it under torchrun (see distributed.py).
Learning rate: linear warmup (lr x step / warmup_steps), then cosine decay to `min_lr_ratio` x peak.
"""

from __future__ import annotations

import math
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from afinar import __version__, checkpoints, data, distributed, models
from afinar.backends import get_backend
from afinar.config import Config
from afinar.errors import AfinarError
from afinar.runs import RunWriter, file_sha256


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (1-based)."""
    t = cfg.train
    if step <= t.warmup_steps:
        return t.learning_rate * step / max(1, t.warmup_steps)
    progress = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
    floor = t.learning_rate * t.min_lr_ratio
    return floor + (t.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Prepared:
    train: list[data.Encoded]
    val: list[data.Encoded]
    dropped: int
    truncated: int


def prepare(cfg: Config, tokenizer, train_ex: list[data.Example], val_ex: list[data.Example]) -> Prepared:
    enc = lambda ex: data.encode(ex, tokenizer, cfg.train.max_seq_length, cfg.data.train_on_prompt, cfg.data.system_prompt)
    train, val = [enc(e) for e in train_ex], [enc(e) for e in val_ex]
    truncated = sum(e.truncated for e in train)
    kept = [e for e in train if e.n_targets > 0]
    if not kept:
        first = train[0]
        raise AfinarError(
            f"{cfg.data.train}: no training example has an answer token left within train.max_seq_length="
            f"{cfg.train.max_seq_length} (first: {first.source or 'line 1'}, {len(first.input_ids)} tokens kept). "
            "Raise train.max_seq_length (see `afinar data check`)."
        )
    return Prepared(kept, [e for e in val if e.n_targets > 0], len(train) - len(kept), truncated)


def micro_batches(prepared: Prepared, cfg: Config) -> Iterator[tuple[int, list[data.Encoded]]]:
    """(epoch, micro-batch) forever, in a deterministic order."""
    epoch = 0
    while True:
        for idx in epoch_batches(prepared, cfg, epoch):
            yield epoch, [prepared.train[i] for i in idx]
        epoch += 1


def epoch_batches(prepared: Prepared, cfg: Config, epoch: int = 0) -> list[list[int]]:
    t = cfg.train
    lengths = [len(e.input_ids) for e in prepared.train]
    return data.batch_order(lengths, t.batch_size, t.seed, epoch, t.group_by_length, t.batch_tokens)


def total_steps(cfg: Config, n_train: int, batches_per_epoch: int | None = None) -> int:
    """Optimizer steps of the run; `batches_per_epoch` when a token budget sets the batch count."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    batches = batches_per_epoch or math.ceil(n_train / cfg.train.batch_size)
    return max(1, math.ceil(cfg.train.epochs * batches / cfg.train.grad_accumulation))


def validation_loss(backend, val: list[data.Encoded], batch_size: int, world=distributed.SINGLE) -> float | None:
    if not val:
        return None
    batches = [val[i : i + batch_size] for i in range(0, len(val), batch_size)]
    loss, n = 0.0, 0
    for mb in distributed.shard(batches, world):
        if not mb:  # no share here: a pass anyway, FSDP's gathers need every process
            backend.eval_loss(batches[0][:1])
            continue
        s, k = backend.eval_loss(mb)
        loss, n = loss + s, n + k
    if world.size > 1:
        loss, n = backend.all_sum([loss, n])
    return loss / n


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


class TrainingInterrupted(AfinarError):
    exit_code = 130


def run_training(cfg: Config, output: str | Path, overwrite: bool = False,
                 on_event: Callable[[dict], None] | None = None, resume: bool = False, force: bool = False) -> Path:
    """Train per `cfg` and write the run folder at `output`. `on_event` sees every metrics record.

    With `resume`, continue `<output>.partial/` from its newest checkpoint (same data order,
    schedule, optimizer and RNG states: the result equals an uninterrupted run).
    """
    started = time.time()
    train_ex = data.read_jsonl(cfg.data.train)
    val_ex = data.read_jsonl(cfg.data.val) if cfg.data.val else []
    if len(train_ex) < cfg.train.batch_size:
        raise AfinarError(f"{cfg.data.train} has {len(train_ex)} examples, fewer than train.batch_size={cfg.train.batch_size}.")
    resolved = models.resolve(cfg.model.base)
    world = distributed.from_env()  # under torchrun: only rank 0 writes the run and prints
    if world.main:
        writer = RunWriter.reopen(output, cfg, force) if resume else RunWriter.create(output, overwrite, cfg)
    else:
        writer = distributed.FollowerWriter(Path(output))
    emit = on_event if on_event and world.main else (lambda record: None)
    stop = _StopSignal()
    try:
        backend = get_backend(cfg)
        if world.size > 1 and not hasattr(backend, "all_sum"):
            raise AfinarError(f"backend={backend.name} trains in one process only; WORLD_SIZE={world.size} was set "
                              "(torchrun / accelerate launch). Use --set backend=torch, or start one process.")
        tokenizer = backend.load(resolved)
        prepared = prepare(cfg, tokenizer, train_ex, val_ex)
        per_epoch = len(epoch_batches(prepared, cfg))
        steps = total_steps(cfg, len(prepared.train), per_epoch)
        state, resumed_from = LoopState(), None
        if resume and (found := checkpoints.latest(writer.tmp)):
            saved, folder = found
            backend.load_checkpoint(folder)
            state, resumed_from = LoopState(**saved["loop"]), saved["loop"]["step"]
            writer.truncate(state.step)
        elif resume:
            writer.truncate(0)
        if world.size > 1 and backend.all_sum([state.step])[0] != state.step * world.size:
            raise AfinarError(f"The processes resumed {writer.tmp} from different steps (this one: {state.step}): "
                              "every node must read the same run folder (a shared filesystem).")
        widest = max(len(e.input_ids) for e in prepared.train)  # the worst micro-batch: the longest examples together
        answers = sum(sorted(e.n_targets for e in prepared.train)[-cfg.train.batch_size:])
        batch_tokens = widest * cfg.train.batch_size
        if cfg.train.batch_tokens:
            batch_tokens = min(batch_tokens, max(cfg.train.batch_tokens, widest))
        memory_plan = backend.estimate_memory(batch_tokens, answers)
        emit({"event": "start", "total_steps": steps, "memory_estimate_mb": memory_plan, "train_examples": len(prepared.train),
              "val_examples": len(prepared.val), "truncated": prepared.truncated, "dropped": prepared.dropped,
              "device": backend.describe(), "warmup_steps": cfg.train.warmup_steps, "resumed_from": resumed_from})

        stream = micro_batches(prepared, cfg)
        for _ in range(state.consumed):  # replay the data order up to the checkpoint
            next(stream)
        stopped = None
        with stop:
            while state.step < steps and stopped is None:
                stopped = _train_step(cfg, backend, prepared, stream, state, steps, writer, emit, world)
                requested = stop.requested
                if world.size > 1:  # a signal reaches processes at different steps: stop together
                    requested = backend.all_sum([float(requested)])[0] > 0
                if stopped is None and requested:
                    if world.main:
                        checkpoints.save(writer.tmp, backend, _ckpt_state(state, steps), cfg.train.keep_checkpoints)
                    raise TrainingInterrupted(
                        f"Interrupted: checkpoint saved at step {state.step} of {steps}. "
                        f"Resume with: afinar train --resume {output}"
                    )
        if stopped:
            emit({"event": "stopped", **stopped})
        if not world.main:
            backend.all_sum([0.0])  # return once rank 0 has written the run folder
            return writer.output
        path = _finish(cfg, writer, backend, resolved, prepared, train_ex, val_ex, state, steps, started,
                       resumed_from, stopped, emit, memory_plan, per_epoch)
        if world.size > 1:
            backend.all_sum([0.0])
        return path
    except BaseException as e:
        if checkpoints.step_checkpoints(writer.tmp):
            # A crash loses at most the work since the last checkpoint.
            if not isinstance(e, TrainingInterrupted):
                emit({"event": "crashed", "resume": f"afinar train --resume {output}"})
        else:
            writer.abandon()
        raise


def _train_step(cfg, backend, prepared, stream, state: LoopState, steps: int, writer, emit,
                world=distributed.SINGLE) -> dict | None:
    """One optimizer step, its logging, evaluation and checkpoint; a dict if training must stop.

    With several processes each takes its share of the step's micro-batches, scaled by the
    step's global target count; the backend sums gradients and losses across processes.
    """
    t0 = time.time()
    step = state.step + 1
    window = [next(stream) for _ in range(cfg.train.grad_accumulation)]
    n_targets = sum(e.n_targets for _, mb in window for e in mb)
    mine = distributed.shard([mb for _, mb in window], world)
    loss_sum = _accumulate(cfg, backend, mine, n_targets, state, writer, emit, world, filler=window[0][1][:1])
    if world.size > 1:
        loss_sum = backend.all_sum([loss_sum])[0]
    lr = lr_at(step, steps, cfg)
    grad_norm = backend.optimizer_step(lr)
    loss = loss_sum / n_targets
    state.step, state.consumed, state.epoch = step, state.consumed + len(window), window[-1][0]
    diverged = _divergence(cfg, state, loss)
    if diverged:
        return diverged
    step_tokens = sum(len(e.input_ids) for _, mb in window for e in mb)
    state.tokens_seen += step_tokens
    state.targets_seen += n_targets
    dt = time.time() - t0
    state.train_time_s += dt
    record = {"step": step, "epoch": round(state.epoch + 1, 3), "loss": round(loss, 5), "lr": lr,
              "grad_norm": round(grad_norm, 4), "tokens": state.tokens_seen, "tokens_per_s": round(step_tokens / dt, 1),
              "elapsed_s": round(state.train_time_s, 2), **_round(backend.memory())}
    writer.log(record)
    emit(record)
    stopped = None
    if step % cfg.train.eval_every == 0 or step == steps:
        stopped = _evaluate(cfg, backend, prepared, state, steps, writer, emit, world)
    if world.main and cfg.train.save_every and (step % cfg.train.save_every == 0) and step < steps:
        checkpoints.save(writer.tmp, backend, _ckpt_state(state, steps), cfg.train.keep_checkpoints)
    return stopped


def _accumulate(cfg, backend, micro_batches: list, n_targets: int, state: LoopState, writer, emit,
                world=distributed.SINGLE, filler: list | None = None) -> float:
    """Forward and backward over one step's micro-batches; on out-of-memory, split them and retry.

    Each micro-batch is cut into `state.split` pieces, so halving the micro-batch doubles the
    accumulation: the step still sees the same examples with the same loss scale.
    """
    while True:
        try:
            loss_sum = 0.0
            for mb in micro_batches:
                if not mb:  # no share of this micro-batch here (see distributed.shard): a zero-weight pass
                    backend.forward_backward(filler, scale=0.0)
                    continue
                size = math.ceil(len(mb) / state.split)
                for i in range(0, len(mb), size):
                    s, _ = backend.forward_backward(mb[i : i + size], scale=1.0 / n_targets)
                    loss_sum += s
            return loss_sum
        except Exception as e:
            if not backend.is_out_of_memory(e):
                raise
            if world.size > 1 and cfg.distributed.strategy == "fsdp":  # a retry would desynchronise FSDP's gathers
                t = cfg.train
                raise AfinarError(f"Out of memory at step {state.step + 1} under FSDP ({world.size} processes). Lower "
                                  f"train.batch_tokens (now {t.batch_tokens}) or train.batch_size (now {t.batch_size}), "
                                  "or set train.gradient_checkpointing=true.") from None
            backend.recover_from_out_of_memory()
            if cfg.train.batch_size // state.split <= 1:
                raise AfinarError(
                    f"Out of memory at step {state.step + 1} even with a micro-batch of 1 example. Lower "
                    f"train.max_seq_length (now {cfg.train.max_seq_length}), set train.gradient_checkpointing=true, "
                    "or use model.quantization=nf4."
                ) from None
            state.split *= 2
            event = {"event": "out_of_memory", "step": state.step + 1,
                     "micro_batch": math.ceil(cfg.train.batch_size / state.split),
                     "grad_accumulation": cfg.train.grad_accumulation * state.split}
            state.oom_events.append(event)
            writer.log(event)
            emit(event)


def _evaluate(cfg, backend, prepared, state: LoopState, steps: int, writer, emit,
              world=distributed.SINGLE) -> dict | None:
    val = validation_loss(backend, prepared.val, max(cfg.train.batch_size, 8), world)
    if val is None:
        return None
    state.last_val = val
    if state.best_val is None or val < state.best_val:
        state.best_val, state.best_step, state.evals_without_improvement = val, state.step, 0
        if world.main:
            checkpoints.save_best(writer.tmp, backend, state.step, val)
    else:
        state.evals_without_improvement += 1
    record = {"step": state.step, "val_loss": round(val, 5), "best_val_loss": round(state.best_val, 5)}
    writer.log(record)
    emit(record)
    writer.write_state(_state(state, steps))
    patience = cfg.train.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        return {"reason": "early_stopping", "step": state.step,
                "message": f"No validation improvement in {patience} checks since step {state.best_step} "
                           f"(best {state.best_val:.4f}): stopped early."}
    return None


def _divergence(cfg, state: LoopState, loss: float) -> dict | None:
    """NaN/inf, or the smoothed loss far above its running minimum: stop with advice."""
    t = cfg.train
    advice = (f"Try --set train.learning_rate={t.learning_rate / 2:g} (now {t.learning_rate:g}) "
              f"and --set train.warmup_steps={max(2 * t.warmup_steps, 10)} (now {t.warmup_steps}).")
    if not math.isfinite(loss):
        return {"reason": "diverged", "step": state.step, "message": f"Training loss became {loss} at step {state.step}. {advice}"}
    state.smoothed_loss = loss if state.smoothed_loss is None else 0.9 * state.smoothed_loss + 0.1 * loss
    state.smoothed_min = min(state.smoothed_min if state.smoothed_min is not None else math.inf, state.smoothed_loss)
    factor = t.divergence_factor
    if factor and state.smoothed_loss > factor * state.smoothed_min:
        return {"reason": "diverged", "step": state.step,
                "message": f"Training loss diverged at step {state.step}: smoothed {state.smoothed_loss:.3f} > "
                           f"{factor:g} x its minimum {state.smoothed_min:.3f}. {advice}"}
    return None


def _finish(cfg, writer, backend, resolved, prepared, train_ex, val_ex, state: LoopState, steps, started,
            resumed_from, stopped, emit, memory_plan, per_epoch: int) -> Path:
    best = checkpoints.best(writer.tmp)
    if stopped and stopped["reason"] == "diverged" and best is None:
        raise AfinarError(stopped["message"] + " No validation checkpoint was saved before it, so no run was written.")
    use_best = best is not None and (cfg.train.final_adapter == "best" or stopped and stopped["reason"] == "diverged")
    if use_best:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(best[1] / name, writer.tmp / name)
        adapter_step, adapter_source = best[0]["step"], "best"
    else:
        backend.save_adapter(writer.tmp)
        adapter_step, adapter_source = state.step, "last"
    train_time = max(state.train_time_s, 1e-9)
    metadata = {
        "afinar_version": __version__,
        "method": cfg.method,
        "base_model": {"name": cfg.model.base, "path": resolved.path, "source": resolved.source,
                       "sha256": models.content_hash(resolved)},
        "data": {split: _data_info(path, n) for split, path, n in
                 (("train", cfg.data.train, len(train_ex)), ("val", cfg.data.val, len(val_ex))) if path},
        "examples_truncated": prepared.truncated,
        "examples_dropped": prepared.dropped,
        "device": backend.describe(),
        "host": {"python": sys.version.split()[0], "platform": platform.platform()},
        "steps": state.step,
        "planned_steps": steps,
        "epochs_completed": round(state.consumed / per_epoch, 3),
        "tokens_seen": state.tokens_seen,
        "target_tokens_seen": state.targets_seen,
        "train_time_s": round(state.train_time_s, 2),
        "wall_time_s": round(time.time() - started, 2),
        "tokens_per_s": round(state.tokens_seen / train_time, 1),
        "peak_memory_mb": _round(backend.memory())["peak_memory_mb"],
        "final_train_loss": next((r["loss"] for r in reversed(writer.history) if "loss" in r), None),
        "final_val_loss": None if state.last_val is None else round(state.last_val, 5),
        "best_val_loss": None if state.best_val is None else round(state.best_val, 5),
        "best_val_step": state.best_step,
        "adapter_step": adapter_step,
        "adapter_source": adapter_source,
        "resumed_from_step": resumed_from,
        "memory_estimate_mb": memory_plan,
        "micro_batch_size": math.ceil(cfg.train.batch_size / state.split),
        "out_of_memory_events": state.oom_events,
        "stopped": stopped,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = writer.finish(cfg, metadata, _state(state, steps))
    emit({"event": "done", "output": str(path), **{k: metadata[k] for k in ("train_time_s", "tokens_per_s", "final_val_loss")}})
    return path


def _ckpt_state(state: LoopState, steps: int) -> dict:
    return {"step": state.step, "total_steps": steps, "loop": asdict(state)}


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


def _state(state: LoopState, steps: int) -> dict:
    return {"global_step": state.step, "max_steps": steps, "epoch": state.epoch + 1, "best_val_loss": state.best_val,
            "best_step": state.best_step, "tokens_seen": state.tokens_seen}


def _round(d: dict) -> dict:
    return {k: round(v, 1) for k, v in d.items()}


def _data_info(path: str, count: int) -> dict:
    return {"path": path, "examples": count, "sha256": file_sha256(path)}
