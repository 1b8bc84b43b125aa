"""Examples -> chat template -> token ids with an answer mask (batches of them: `batches.py`).

No framework import here: a tokenizer is any object with the Hugging Face tokenizer
interface. Reading and validating data lives in `jsonl.py` (shapes, JSONL) and `datafiles.py`
(every format, the split), re-exported here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path


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


log = logging.getLogger("afinar")


# ---------------------------------------------------------------- tokenization
#
# How a conversation becomes training tokens, for any model's chat template:
# - The whole conversation is rendered once; each assistant answer is located in that text
#   (templates may render earlier turns differently from the last one, or close the
#   conversation with EOS, so answers cannot be found by rendering turn by turn).
# - An answer starts where the template's generation prompt for that turn ends (what `ask`
#   feeds the model), or at the answer's own text where earlier turns render differently, and
#   ends through the template's end-of-turn token (<|im_end|>, <end_of_turn>, <|eot_id|>...).
# - Reasoning templates (Qwen3) render with enable_thinking=False: the empty think block is part
#   of the prompt, in training and in `ask`, never something the model learns to write.
# - The tokens before the last answer are those of the prompt text alone, so the model sees at
#   inference the very token ids it was trained on.


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


class ConversationError(AfinarError):
    """One conversation cannot be formatted by the chat template; `encode` prefixes the example's file:line."""


_PROBE = "\u2063afinar-probe\u2063"  # text no conversation contains
_probes: dict[tuple, object] = {}  # (what, chat template, EOS) -> result: each template is probed once
_noticed: set[str] = set()


def _template(tokenizer) -> str:
    return str(getattr(tokenizer, "chat_template", None) or "")


def _probe(tokenizer, question: str, compute):
    key = (question, _template(tokenizer), tokenizer.eos_token)
    if key not in _probes:
        _probes[key] = compute()
    return _probes[key]


def _notice(message: str) -> None:
    """Say something once per process (on stderr, through the 'afinar' logger)."""
    if message not in _noticed:
        _noticed.add(message)
        log.warning(message)


def _is_template_error(e: Exception) -> bool:
    return type(e).__module__.startswith("jinja2")


def _role_problem(messages: list[dict]) -> str | None:
    """Why a conversation breaks the usual order (optional system first, then user/assistant alternating)."""
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[offset:], start=offset):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"message {i + 1} is {m['role']!r} where {expected!r} was expected"
    return None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the model's chat template writes it (thinking off for reasoning templates)."""
    template = _template(tokenizer)
    if not template:
        raise AfinarError(
            "The base model's tokenizer has no chat template, so chat data cannot be formatted. "
            "Use an instruct/chat model, or data in the {\"text\"} shape."
        )
    extra = {"enable_thinking": False} if "enable_thinking" in template else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:
        if not _is_template_error(e):
            raise
        # The template's own raise_exception (jinja2.TemplateError): it refuses this conversation. Say why.
        roles = ", ".join(str(m.get("role")) for m in messages)
        problem = _role_problem(messages)
        fix = (f"Fix the order: {problem}; the usual order is an optional system message, then user and assistant "
               "alternating, starting with user." if problem else
               "The template's message says what it refuses; change those examples, or use data in the {\"text\"} shape.")
        raise ConversationError(
            f"the model's chat template refuses this conversation (roles: {roles}): \"{str(e)[:200].rstrip('.')}\". {fix}"
        ) from None


def has_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (Gemma's refuse one or drop it)."""
    def compute():
        try:
            return _PROBE in render(tokenizer, [{"role": "system", "content": _PROBE}, {"role": "user", "content": "?"}], True)
        except ConversationError:
            return False
    return bool(_template(tokenizer)) and _probe(tokenizer, "system", compute)


def with_system(messages: list[dict], system_prompt: str | None, tokenizer=None) -> list[dict]:
    """`messages` with `system_prompt` first (unless they bring their own system message).

    With `tokenizer`, a model whose template has no system role gets the system text at the
    start of the first user turn instead (said once), as Gemma-3's own template does.
    """
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if tokenizer is None or messages[0]["role"] != "system" or has_system_role(tokenizer):
        return messages
    system, rest = messages[0]["content"], messages[1:]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:  # no user turn to take it: let the template say what it makes of this
        return messages
    _notice("This model's chat template has no system role: the system prompt is put at the start of the first user turn.")
    rest = list(rest)
    rest[first_user] = {**rest[first_user], "content": f"{system}\n\n{rest[first_user]['content']}"}
    return rest


def _special_tokens(tokenizer) -> list[str]:
    """Special token strings (end-of-turn candidates), longest first."""
    tokens = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    tokens.update(t for t in (tokenizer.eos_token,) if t)
    return sorted(tokens, key=len, reverse=True)


def _token_at(text: str, pos: int, tokens: list[str]) -> str | None:
    return next((t for t in tokens if text.startswith(t, pos)), None)


def turn_end_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an answer (<|im_end|>, <end_of_turn>, <|eot_id|>...)."""
    def compute():
        try:
            text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}])
        except AfinarError:
            return None
        at = text.find(_PROBE)
        return _token_at(text, at + len(_PROBE), _special_tokens(tokenizer)) if at >= 0 else None
    return _probe(tokenizer, "turn end", compute) if _template(tokenizer) else None


def _locate(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Where `content` is printed in `text` at or after `cursor` (templates may trim it)."""
    for variant in dict.fromkeys((content, content.strip())):
        at = text.find(variant, cursor)
        if at >= 0:
            return at, at + len(variant)
    if "</think>" in content:  # reasoning templates re-print a think block: from its <think> to the answer's end
        answer = content.split("</think>")[-1].strip()
        at = text.find(answer, cursor)
        think = text.find("<think>", cursor, at) if at >= 0 else -1
        if think >= 0:
            return think, at + len(answer)
    return None


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (through its end-of-turn token)."""
    full = render(tokenizer, messages)
    specials = _special_tokens(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        found = _locate(full, m["content"], cursor)
        if m["role"] != "assistant":
            cursor = found[1] if found else cursor  # templates may drop or move a system text: keep going
            continue
        if found is None:
            raise ConversationError(
                f"the chat template does not print assistant message {i + 1} as written (it rewrites the text), so "
                "afinar cannot tell which tokens are the answer. Use data in the {\"text\"} shape for this model."
            )
        start, end = found
        try:  # the answer starts where the prompt `ask` feeds the model ends, when the template prints that prompt here
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        except AfinarError:
            prompt = ""
        if cursor <= len(prompt) <= start and full.startswith(prompt):
            start = len(prompt)
        end += len(_token_at(full, end, specials) or "")
        spans.append((start, end))
        cursor = end
    return full, spans


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _span_mask(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """True for each token (start, end) that overlaps an answer span; one pass per span (a line can be megabytes)."""
    mask = [False] * len(offsets)
    for s, e in spans:
        if s < e:
            mask = [m or (te > s and ts < e) for m, (ts, te) in zip(mask, offsets)]
    return mask


def _tokenize(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool], int]:
    """Token ids of `text`, which are answer targets, and how many tokens end with the last answer.

    Everything before the last answer is tokenized as one string, exactly as `ask` tokenizes the
    conversation so far (earlier answers are marked by their characters); the last answer takes
    the tokens of the text through it when those extend the prompt's, else its own: a BPE
    tokenizer can split a blank line before an answer differently from one at the end of a
    prompt, and the prompt's own split is the one the model meets when answering.
    """
    last_start, last_end = spans[-1]
    enc = tokenizer(text[:last_start], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = _span_mask(enc["offset_mapping"], spans[:-1])
    upto = _token_ids(tokenizer, text[:last_end])
    answer = upto[len(ids):] if upto[: len(ids)] == ids else _token_ids(tokenizer, text[last_start:last_end])
    # What follows the last answer starts after its end-of-turn token (or is cut off by `encode`): alone.
    tail = _token_ids(tokenizer, text[last_end:]) if last_end < len(text) else []
    return ids + answer + tail, mask + [True] * len(answer) + [False] * len(tail), len(ids) + len(answer)


def encode(example: Example, tokenizer, max_len: int, train_on_prompt: bool = False, system_prompt: str | None = None) -> Encoded:
    """Token ids and loss mask; every answer ends with its end-of-turn token, or EOS if the template writes none."""
    eos_id = tokenizer.eos_token_id
    if example.messages is None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != eos_id:
            ids = ids + [eos_id]
        mask = [True] * len(ids)
    else:
        try:
            text, spans = answer_spans(tokenizer, with_system(example.messages, system_prompt, tokenizer))
        except ConversationError as e:
            raise AfinarError(f"{example.source}: {e}" if example.source else str(e)) from None
        ids, mask, cut = _tokenize(tokenizer, text, spans)
        if train_on_prompt:
            mask = [True] * len(ids)
        last_start, last_end = spans[-1]
        if not any(text[last_start:last_end].endswith(t) for t in _special_tokens(tokenizer)):
            # The template closes answers with no special token: close the last answer with EOS
            # ourselves, or generation would never learn to stop.
            ids, mask = ids[:cut] + [eos_id], mask[:cut] + [True]
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], mask[:max_len], truncated, example.source)


def prompt_ids(tokenizer, question: str | list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of a question formatted exactly as in training, ready for generation.

    A model without a chat template (trained on {"text"} data) gets the question as plain text.
    """
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    if not _template(tokenizer):
        parts = [system_prompt] if system_prompt and messages[0]["role"] != "system" else []
        text = "\n\n".join([*parts, *(m["content"] for m in messages)])
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    text = render(tokenizer, with_system(messages, system_prompt, tokenizer), add_generation_prompt=True)
    return _token_ids(tokenizer, text)


_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*")


def clean_answer(text: str) -> str:
    """A generated answer without the empty think block a reasoning model may open with, and outer spaces."""
    return _EMPTY_THINK.sub("", text).strip()


def stop_token_ids(tokenizer, model_folder: str | Path | None = None) -> list[int]:
    """Every token id that ends an answer: the tokenizer's EOS, each `eos_token_id` of the model's
    generation_config.json (int or list), and the chat template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    config = _generation_config(model_folder)
    eos = config.get("eos_token_id")
    ids += eos if isinstance(eos, list) else [eos]
    end = turn_end_token(tokenizer)
    if end is not None:
        ids.append(tokenizer.convert_tokens_to_ids(end))
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def _generation_config(model_folder: str | Path | None) -> dict:
    """generation_config.json of a local model folder, or of a hub model in the local cache; {} if none."""
    if model_folder is None:
        return {}
    path = Path(model_folder) / "generation_config.json"
    if not path.is_file() and not Path(model_folder).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_folder), "generation_config.json")
        except Exception:  # not a valid repo id
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def pad_id(tokenizer) -> int:
    """The padding id: the tokenizer's own, or EOS (right padding is never attended to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
