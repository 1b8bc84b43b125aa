"""Examples -> chat template -> token ids with an answer mask, and the order of batches.

No framework import here: a tokenizer is any object with the Hugging Face tokenizer
interface. Reading and validating data lives in `jsonl.py` (shapes, JSONL) and `datafiles.py`
(every format, the split), re-exported here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afinar.datafiles import Split, content_sha256, read_examples, split_file  # noqa: F401  (the data API)
from afinar.errors import AfinarError
from afinar.jsonl import SHAPE_NAMES, SHAPES, Dataset, Example, normalise  # noqa: F401  (the data API)


def read_jsonl(path: str | Path) -> list[Example]:
    """Every example of a data file in any accepted format (`read_examples`), under the name callers know.

    The notices (e.g. "read as ShareGPT") are dropped: `read_examples(path).notices` has them.
    """
    return read_examples(path).examples


IGNORE = -100  # the label of a position that is not a training target (PyTorch / HF convention)
BUNDLED = "bundled:"  # data.train: bundled:farense/train.jsonl names a file shipped inside afinar
BUNDLED_DIR = Path(__file__).parent / "bundled"


def resolve_path(value: str | Path) -> Path:
    """The file a `data.*` setting names: `bundled:NAME` inside the package, anything else a path."""
    text = str(value)
    if not text.startswith(BUNDLED):
        return Path(text).expanduser()
    path = BUNDLED_DIR / text[len(BUNDLED):]
    if not path.is_file():
        known = sorted(f"{BUNDLED}{p.relative_to(BUNDLED_DIR)}" for p in BUNDLED_DIR.rglob("*.jsonl"))
        raise AfinarError(f"{text!r}: no such bundled file. Bundled data: {', '.join(known) or 'none installed'}.")
    return path


def read_setting(value: str | Path) -> Dataset:
    """The data a `data.train` / `data.val` / `data.test` setting names (examples, shape, notices)."""
    return read_examples(resolve_path(value))


# ---------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target
    truncated: bool
    source: str = ""  # the example's "file:line", for messages about it

    @property
    def n_targets(self) -> int:
        # the first token is never a target: nothing predicts it
        return sum(self.loss_mask[1:])


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


class ConversationError(AfinarError):
    """One conversation cannot be formatted by the chat template; `encode` prefixes the example's file:line."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise AfinarError(
            "The base model's tokenizer has no chat template, so chat data cannot be formatted. "
            "Use an instruct/chat model, or data in the {\"text\"} shape."
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        if not type(e).__module__.startswith("jinja2"):
            raise
        # The template's own raise_exception (jinja2.TemplateError): it refuses this conversation.
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise ConversationError(
            f"the model's chat template refuses this conversation (roles: {roles}): {str(e)[:200].rstrip('.')}. "
            "Reorder the turns: an optional system message first, then user and assistant alternating, starting with user."
        ) from None


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (through EOS)."""
    full = render(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prefix):
            raise ConversationError(
                "the chat template does not render this conversation incrementally (the text before an answer changes "
                "once the answer is added), so the answer cannot be masked. A system message after the first turn does "
                "this with many templates: move it first. Otherwise use data in the {\"text\"} shape."
            )
        start, end = len(prefix), len(upto)
        # Stop right after the end-of-turn token: what a template prints after it ("\n") belongs to the next turn.
        cut = full.rfind(eos, start, end) if eos else -1
        spans.append((start, cut + len(eos) if cut >= 0 else end))
    return full, spans


def _span_mask(offsets, spans: list[tuple[int, int]], everything: bool) -> list[bool]:
    """True for each token (start, end) that overlaps an answer span; one pass per span (a line can be megabytes)."""
    if everything:
        return [True] * len(offsets)
    mask = [False] * len(offsets)
    for s, e in spans:
        if s < e:
            mask = [m or (te > s and ts < e) for m, (ts, te) in zip(mask, offsets)]
    return mask


def encode(example: Example, tokenizer, max_len: int, train_on_prompt: bool = False, system_prompt: str | None = None) -> Encoded:
    """Token ids and loss mask; the answer always ends with EOS (added if the template does not)."""
    eos_id = tokenizer.eos_token_id
    if example.messages is None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != eos_id:
            ids = ids + [eos_id]
        mask = [True] * len(ids)
    else:
        try:
            text, spans = answer_spans(tokenizer, with_system(example.messages, system_prompt))
        except ConversationError as e:
            raise AfinarError(f"{example.source}: {e}" if example.source else str(e)) from None
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        mask = _span_mask(offsets, spans, train_on_prompt)
        last_start, last_end = spans[-1]
        eos = tokenizer.eos_token or ""
        if not eos or not text[last_start:last_end].endswith(eos):
            # The template does not close assistant turns with EOS: close the last answer
            # ourselves, or generation would never learn to stop.
            cut = max(i for i, (ts, _) in enumerate(offsets) if ts < last_end) + 1
            ids, mask = ids[:cut] + [eos_id], mask[:cut] + [True]
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], mask[:max_len], truncated, example.source)


def prompt_ids(tokenizer, question: str | list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of a question formatted exactly as in training, ready for generation."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    text = render(tokenizer, with_system(messages, system_prompt), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- batching


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


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's own, or EOS (right padding is never attended to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
