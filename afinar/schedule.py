"""What training and evaluation share: encoded examples, the batch order, the learning-rate
schedule and the validation loss. Framework-free: the backend does the tensor work.

Learning rate: linear warmup (lr x step / warmup_steps), then cosine decay to `min_lr_ratio` x peak.
The loss of a step is the mean over every answer token of the step (each micro-batch's token-loss
sum is scaled by 1 / targets in the step), so the gradient does not depend on how the step is cut
into micro-batches, nor on how many processes share it (see distributed.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

from afinar import batches, data, distributed
from afinar.config import Config
from afinar.errors import AfinarError


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
    """Encoded training and validation examples (those with at least one answer token)."""

    train: list[data.Encoded]
    val: list[data.Encoded]
    dropped: int
    truncated: int


def encode_all(cfg: Config, tokenizer, examples: list[data.Example]) -> list[data.Encoded]:
    """Examples as the run trains on them (template, system prompt, truncation, answer mask)."""
    return [data.encode(ex, tokenizer, cfg.train.max_seq_length, cfg.data.train_on_prompt, cfg.data.system_prompt)
            for ex in examples]


def prepare(cfg: Config, tokenizer, train_ex: list[data.Example], val_ex: list[data.Example]) -> Prepared:
    train, val = encode_all(cfg, tokenizer, train_ex), encode_all(cfg, tokenizer, val_ex)
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
    return batches.batch_order(lengths, t.batch_size, t.seed, epoch, t.group_by_length, t.batch_tokens)


def total_steps(cfg: Config, n_train: int, batches_per_epoch: int | None = None) -> int:
    """Optimizer steps of the run; `batches_per_epoch` when a token budget sets the batch count."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    batches = batches_per_epoch or math.ceil(n_train / cfg.train.batch_size)
    return max(1, math.ceil(cfg.train.epochs * batches / cfg.train.grad_accumulation))


class Scorer(Protocol):
    def eval_loss(self, batch: list[data.Encoded]) -> tuple[float, int]: ...


def validation_loss(scorer: Scorer, val: list[data.Encoded], batch_size: int,
                    world: distributed.World = distributed.SINGLE,
                    collective: distributed.Collective = distributed.SINGLE_PROCESS) -> float | None:
    """Mean loss per answer token over `val`; with several processes each scores its share."""
    if not val:
        return None
    batches = [val[i : i + batch_size] for i in range(0, len(val), batch_size)]
    loss, n = 0.0, 0
    for mb in distributed.shard(batches, world):
        if not mb:  # no share here: a pass anyway, FSDP's gathers need every process
            scorer.eval_loss(batches[0][:1])
            continue
        s, k = scorer.eval_loss(mb)
        loss, n = loss + s, n + k
    loss, n = collective.all_sum([loss, n])
    return loss / n


def eval_batch_size(cfg: Config) -> int:
    """Validation batches are never smaller than 8 examples: no gradients, so memory allows it."""
    return max(cfg.train.batch_size, 8)
