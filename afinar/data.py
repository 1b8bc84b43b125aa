"""JSONL in the common shapes -> chat messages -> token ids with an answer mask.

Shapes (detected per file; one file holds one shape):
  {"messages": [{"role", "content"}, ...]}     chat; loss on assistant turns
  {"prompt", "completion"} / {"question", "answer"} / {"instruction", "input"?, "output"}
  {"text"}                                     plain text; loss on every token
Any line may also carry "keywords": [...] (strings a correct answer must contain), used by
the fact-recall metric. No framework import here: a tokenizer is any object with the
Hugging Face tokenizer interface.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from afinar.errors import AfinarError

SHAPES = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "instruction": ("instruction", "output"),
    "text": ("text",),
}
OPTIONAL = {"keywords", "input", "id", "metadata"}
SHAPE_HELP = (
    'one JSON object per line, e.g. {"question": "...", "answer": "..."}; other shapes: '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
    '{"prompt", "completion"}, {"instruction", "input", "output"}, {"text"}'
)


@dataclass
class Example:
    messages: list[dict] | None  # chat shapes
    text: str | None  # the "text" shape
    keywords: list[str] = field(default_factory=list)
    source: str = ""  # "file:line", for messages that point at the data

    @property
    def question(self) -> str:
        """The last user message (what `ask` would be asked)."""
        if not self.messages:
            return ""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def answer(self) -> str:
        if not self.messages:
            return self.text or ""
        return [m["content"] for m in self.messages if m["role"] == "assistant"][-1]


def _detect(obj: dict) -> str | None:
    for shape, keys in SHAPES.items():
        if all(k in obj for k in keys):
            return shape
    return None


def _fail(where: str, msg: str) -> AfinarError:
    return AfinarError(f"{where}: {msg}")


def _text(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _fail(where, f'"{key}" must be a string, got {type(value).__name__} {str(value)[:60]!r}. Fix that line.')
    if not allow_empty and not value.strip():
        raise _fail(where, f'"{key}" is empty. Remove the line or fill it in.')
    return value


def _to_example(obj: dict, shape: str, where: str) -> Example:
    keywords = obj.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise _fail(where, f'"keywords" must be a list of non-empty strings, got {keywords!r}.')
    if shape == "text":
        return Example(None, _text(obj, "text", where), keywords, where)
    if shape == "messages":
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _fail(where, '"messages" must be a non-empty list of {"role", "content"} objects.')
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise _fail(where, f"messages[{i}] = {str(m)[:80]!r}: each message needs role system|user|assistant and content.")
            clean.append({"role": m["role"], "content": _text(m, "content", f"{where} messages[{i}]")})
        if not any(m["role"] == "assistant" for m in clean):
            raise _fail(where, "no assistant message: there is nothing to learn. Add the answer as role 'assistant'.")
        return Example(clean, None, keywords, where)
    if shape == "instruction":
        prompt = _text(obj, "instruction", where)
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise _fail(where, f'"input" must be a string, got {type(extra).__name__}.')
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        answer = _text(obj, "output", where)
    else:
        q, a = SHAPES[shape]
        user, answer = _text(obj, q, where), _text(obj, a, where)
    return Example([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], None, keywords, where)


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate one JSONL file; errors name file:line, the value and the fix."""
    path = Path(path)
    if not path.is_file():
        raise AfinarError(f"Data file not found: {path}. Check data.train / data.val or the path you passed.")
    examples: list[Example] = []
    shape, shape_line = None, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(where, f"not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}. Expected {SHAPE_HELP}.") from None
            if not isinstance(obj, dict):
                raise _fail(where, f"expected a JSON object, got {type(obj).__name__}. Expected {SHAPE_HELP}.")
            this = _detect(obj)
            if this is None:
                raise _fail(where, f"unknown shape with keys {sorted(obj)}. Expected {SHAPE_HELP}.")
            if shape is None:
                shape, shape_line = this, lineno
            elif this != shape:
                raise _fail(where, f"shape '{this}' but line {shape_line} has shape '{shape}': a file holds one shape. Convert the lines to one shape.")
            examples.append(_to_example(obj, this, where))
    if not examples:
        raise AfinarError(f"{path}: no examples (the file is empty). Expected {SHAPE_HELP}.")
    return examples


# ---------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target
    truncated: bool

    @property
    def n_targets(self) -> int:
        # the first token is never a target: nothing predicts it
        return sum(self.loss_mask[1:])


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise AfinarError(
            "The base model's tokenizer has no chat template, so chat data cannot be formatted. "
            "Use an instruct/chat model, or data in the {\"text\"} shape."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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
            raise AfinarError("The chat template does not render conversations incrementally; use data in the {\"text\"} shape.")
        start, end = len(prefix), len(upto)
        # Stop right after the end-of-turn token: what a template prints after it ("\n") belongs to the next turn.
        cut = full.rfind(eos, start, end) if eos else -1
        spans.append((start, cut + len(eos) if cut >= 0 else end))
    return full, spans


def encode(example: Example, tokenizer, max_len: int, train_on_prompt: bool = False, system_prompt: str | None = None) -> Encoded:
    """Token ids and loss mask; the answer always ends with EOS (added if the template does not)."""
    eos_id = tokenizer.eos_token_id
    if example.messages is None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != eos_id:
            ids = ids + [eos_id]
        mask = [True] * len(ids)
    else:
        text, spans = answer_spans(tokenizer, with_system(example.messages, system_prompt))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        mask = [train_on_prompt or any(s < e and te > s and ts < e for s, e in spans) for ts, te in offsets]
        last_start, last_end = spans[-1]
        eos = tokenizer.eos_token or ""
        if not eos or not text[last_start:last_end].endswith(eos):
            # The template does not close assistant turns with EOS: close the last answer
            # ourselves, or generation would never learn to stop.
            cut = max(i for i, (ts, _) in enumerate(offsets) if ts < last_end) + 1
            ids, mask = ids[:cut] + [eos_id], mask[:cut] + [True]
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], mask[:max_len], truncated)


def prompt_ids(tokenizer, question: str | list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of a question formatted exactly as in training, ready for generation."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    text = render(tokenizer, with_system(messages, system_prompt), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- batching


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Deterministic micro-batches of example indices for one epoch.

    With grouping, examples are shuffled, sorted by length inside windows of 64 batches (so
    a batch pads little), and the batches shuffled again: each epoch still sees every example once.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * 64
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lambda i: lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------- split


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def split_file(path: str | Path, val_fraction: float, seed: int, out_dir: str | Path | None = None) -> tuple[Path, Path, int, int]:
    """Deterministic train/val split; examples with the same question land on the same side."""
    from afinar import atomic

    if not 0 < val_fraction < 1:
        raise AfinarError(f"--val-fraction {val_fraction}: must be between 0 and 1 (e.g. 0.1).")
    path = Path(path)
    examples = read_jsonl(path)  # validates every line first
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    groups: dict[str, list[str]] = {}
    for ex, line in zip(examples, lines):
        groups.setdefault(normalise(ex.question or ex.answer), []).append(line)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(len(keys) * val_fraction))
    if n_val >= len(keys):
        raise AfinarError(f"{path}: {len(keys)} distinct questions are too few to split with --val-fraction {val_fraction}.")
    val_keys = set(keys[:n_val])
    out = Path(out_dir) if out_dir else path.parent
    train_lines = [ln for k in keys if k not in val_keys for ln in groups[k]]
    val_lines = [ln for k in keys if k in val_keys for ln in groups[k]]
    train_path, val_path = out / "train.jsonl", out / "val.jsonl"
    if path.resolve() in (train_path.resolve(), val_path.resolve()):
        raise AfinarError(f"Splitting {path} into {out} would overwrite the input. Pass --out-dir.")
    atomic.write_text(train_path, "\n".join(train_lines) + "\n")
    atomic.write_text(val_path, "\n".join(val_lines) + "\n")
    return train_path, val_path, len(train_lines), len(val_lines)
