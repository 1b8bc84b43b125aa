"""Encoded examples -> micro-batches: the order of each epoch's batches, and right-padded arrays.

Framework-free (numpy): every backend turns a `Padded` into its own tensors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from afinar.data import IGNORE, Encoded


@dataclass
class Padded:
    """A micro-batch as right-padded arrays, for any framework.

    `ids` and `attention` are (rows, width); `targets` holds each token where it is a training
    target and IGNORE elsewhere (padding included): HF's `labels=`. `positions` are the flat
    indices (row * width + t) of the positions that predict a target, and `labels` those
    targets: position t predicts token t + 1.
    """

    ids: np.ndarray
    attention: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    labels: np.ndarray


def pad_batch(batch: list[Encoded], pad_id: int) -> Padded:
    width = max(len(e.input_ids) for e in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(batch), width), dtype=np.int64)
    targets = np.full((len(batch), width), IGNORE, dtype=np.int64)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        targets[row, :n] = np.where(np.asarray(e.loss_mask, dtype=bool), ids[row, :n], IGNORE)
    keep = targets[:, 1:] != IGNORE
    rows, cols = np.nonzero(keep)
    return Padded(ids, attention, targets, rows * width + cols, targets[:, 1:][keep])


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                max_tokens: int = 0) -> list[list[int]]:
    """Deterministic micro-batches of example indices for one epoch.

    With grouping, examples are shuffled, sorted by length inside windows of 64 batches (so
    a batch pads little), and the batches shuffled again: each epoch still sees every example once.
    With `max_tokens` > 0, batches are always grouped by length and cut by a token budget:
    a batch holds at most `batch_size` examples and at most `max_tokens` padded tokens
    (examples x its longest), so short examples travel in large batches and every batch
    costs about the same memory.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length or max_tokens:
        window = batch_size * 64
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: lengths[i])]
    if max_tokens:
        batches = _token_batches(order, lengths, batch_size, max_tokens)
    else:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length or max_tokens:
        rng.shuffle(batches)
    return batches


def _token_batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Cut `order` (sorted by length within windows) into batches within the token budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        if current and (len(current) == batch_size or wider * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches
