"""The training loop: framework-free, the backend does the tensor work.

One optimizer step = `grad_accumulation` micro-batches. The loss is the mean over every
answer token of the whole step (each micro-batch's token-loss sum is scaled by 1 / targets
in the step), so the gradient does not depend on how the step is cut into micro-batches.
Learning rate: linear warmup (lr x step / warmup_steps), then cosine decay to `min_lr_ratio` x peak.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from afinar import __version__, data, models
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
        raise AfinarError(
            f"No training example has an answer token left within train.max_seq_length={cfg.train.max_seq_length}. "
            "Raise train.max_seq_length (see `afinar data check`)."
        )
    return Prepared(kept, [e for e in val if e.n_targets > 0], len(train) - len(kept), truncated)


def micro_batches(prepared: Prepared, cfg: Config) -> Iterator[tuple[int, list[data.Encoded]]]:
    """(epoch, micro-batch) forever, in a deterministic order."""
    lengths = [len(e.input_ids) for e in prepared.train]
    epoch = 0
    while True:
        for idx in data.batch_order(lengths, cfg.train.batch_size, cfg.train.seed, epoch, cfg.train.group_by_length):
            yield epoch, [prepared.train[i] for i in idx]
        epoch += 1


def total_steps(cfg: Config, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    batches = math.ceil(n_train / cfg.train.batch_size)
    return max(1, math.ceil(cfg.train.epochs * batches / cfg.train.grad_accumulation))


def validation_loss(backend, val: list[data.Encoded], batch_size: int) -> float | None:
    if not val:
        return None
    loss, n = 0.0, 0
    for i in range(0, len(val), batch_size):
        s, k = backend.eval_loss(val[i : i + batch_size])
        loss, n = loss + s, n + k
    return loss / n


def run_training(cfg: Config, output: str | Path, overwrite: bool = False,
                 on_event: Callable[[dict], None] | None = None) -> Path:
    """Train per `cfg` and write the run folder at `output`. `on_event` sees every metrics record."""
    started = time.time()
    train_ex = data.read_jsonl(cfg.data.train)
    val_ex = data.read_jsonl(cfg.data.val) if cfg.data.val else []
    if len(train_ex) < cfg.train.batch_size:
        raise AfinarError(f"{cfg.data.train} has {len(train_ex)} examples, fewer than train.batch_size={cfg.train.batch_size}.")
    resolved = models.resolve(cfg.model.base)
    writer = RunWriter.create(output, overwrite)
    try:
        backend = get_backend(cfg)
        tokenizer = backend.load(resolved)
        prepared = prepare(cfg, tokenizer, train_ex, val_ex)
        steps = total_steps(cfg, len(prepared.train))
        emit = on_event or (lambda record: None)
        emit({"event": "start", "total_steps": steps, "train_examples": len(prepared.train),
              "val_examples": len(prepared.val), "truncated": prepared.truncated, "dropped": prepared.dropped,
              "device": backend.describe(), "warmup_steps": cfg.train.warmup_steps})

        stream = micro_batches(prepared, cfg)
        tokens_seen = targets_seen = 0
        best_val, best_step, last_val = math.inf, 0, None
        loop_start = time.time()
        epoch = 0
        for step in range(1, steps + 1):
            t0 = time.time()
            window = [next(stream) for _ in range(cfg.train.grad_accumulation)]
            epoch = window[-1][0]
            n_targets = sum(e.n_targets for _, mb in window for e in mb)
            loss_sum = 0.0
            for _, mb in window:
                s, _ = backend.forward_backward(mb, scale=1.0 / n_targets)
                loss_sum += s
            lr = lr_at(step, steps, cfg)
            grad_norm = backend.optimizer_step(lr)
            loss = loss_sum / n_targets
            if not math.isfinite(loss):
                raise AfinarError(
                    f"Training loss became {loss} at step {step}. Lower train.learning_rate (now {cfg.train.learning_rate}) "
                    f"or raise train.warmup_steps (now {cfg.train.warmup_steps})."
                )
            step_tokens = sum(len(e.input_ids) for _, mb in window for e in mb)
            tokens_seen += step_tokens
            targets_seen += n_targets
            dt = time.time() - t0
            record = {"step": step, "epoch": round(epoch + 1, 3), "loss": round(loss, 5), "lr": lr,
                      "grad_norm": round(grad_norm, 4), "tokens": tokens_seen, "tokens_per_s": round(step_tokens / dt, 1),
                      "elapsed_s": round(time.time() - loop_start, 2), **_round(backend.memory())}
            writer.log(record)
            emit(record)
            if step % cfg.train.eval_every == 0 or step == steps:
                last_val = validation_loss(backend, prepared.val, max(cfg.train.batch_size, 8))
                if last_val is not None:
                    if last_val < best_val:
                        best_val, best_step = last_val, step
                    record = {"step": step, "val_loss": round(last_val, 5), "best_val_loss": round(best_val, 5)}
                    writer.log(record)
                    emit(record)
                writer.write_state(_state(step, steps, epoch, best_val, best_step))
        backend.save_adapter(writer.tmp)
        train_time = time.time() - loop_start
        memory = _round(backend.memory())
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
            "steps": steps,
            "epochs_completed": round(steps * cfg.train.grad_accumulation * cfg.train.batch_size / len(prepared.train), 3),
            "tokens_seen": tokens_seen,
            "target_tokens_seen": targets_seen,
            "train_time_s": round(train_time, 2),
            "wall_time_s": round(time.time() - started, 2),
            "tokens_per_s": round(tokens_seen / train_time, 1),
            "peak_memory_mb": memory["peak_memory_mb"],
            "final_train_loss": next(r["loss"] for r in reversed(writer.history) if "loss" in r),
            "final_val_loss": None if last_val is None else round(last_val, 5),
            "best_val_loss": None if best_step == 0 else round(best_val, 5),
            "best_val_step": best_step or None,
            "adapter_step": steps,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = writer.finish(cfg, metadata, _state(steps, steps, epoch, best_val, best_step))
        emit({"event": "done", "output": str(path), **{k: metadata[k] for k in ("train_time_s", "tokens_per_s", "final_val_loss")}})
        return path
    except BaseException:
        writer.abandon()
        raise


def _state(step: int, total: int, epoch: int, best_val: float, best_step: int) -> dict:
    return {"global_step": step, "max_steps": total, "epoch": epoch + 1,
            "best_val_loss": None if best_step == 0 else round(best_val, 5), "best_step": best_step or None}


def _round(d: dict) -> dict:
    return {k: round(v, 1) for k, v in d.items()}


def _data_info(path: str, count: int) -> dict:
    return {"path": path, "examples": count, "sha256": file_sha256(path)}
