"""Reading JSONL training data: one validated `Example` per line, or an error naming file:line.

Shapes (detected per file; one file holds one shape):
  {"messages": [{"role", "content"}, ...]}     chat; loss on assistant turns
  {"prompt", "completion"} / {"question", "answer"} / {"instruction", "input"?, "output"}
  {"text"}                                     plain text; loss on every token
Any line may also carry "keywords": [...] (strings a correct answer must contain), used by
the fact-recall metric.

Files are UTF-8 (a leading byte-order mark is skipped), with LF, CRLF or CR line endings.
Anything else (another encoding, a binary or compressed file, a malformed line) is an
`AfinarError` naming file:line, the offending value and the fix (decoding lives in
`textfile.py`). `tests/data/bad/` holds
one file per case.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from afinar import textfile
from afinar.errors import AfinarError

SHAPES = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "instruction": ("instruction", "output"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant")
SHAPE_HELP = (
    'one JSON object per line, e.g. {"question": "...", "answer": "..."}; other shapes: '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
    '{"prompt", "completion"}, {"instruction", "input", "output"}, {"text"}'
)
# Keys people use for the shapes' keys: named in the error so the fix is a rename.
KEY_ALIASES = {
    "q": "question", "query": "question", "pergunta": "question", "a": "answer", "response": "answer",
    "resposta": "answer", "conversations": "messages", "conversation": "messages", "chat": "messages",
    "content": "text", "input_text": "prompt", "target": "completion",
}
ROLE_ALIASES = {"bot": "assistant", "ai": "assistant", "model": "assistant", "gpt": "assistant", "chatbot": "assistant",
                "human": "user", "prompter": "user"}
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


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


def _kind(value) -> str:
    """The JSON name of a value's type, as a user who wrote the file would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _show(value, limit: int = 60) -> str:
    """A value as JSON, cut to `limit` characters (a line can hold megabytes)."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_unicode(value: str, where: str, what: str) -> None:
    """JSON can spell half an emoji ("\\ud83d"); no tokenizer can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _fail(where, f"{what} holds an unpaired surrogate \\u{ord(value[e.start]):04x} at character {e.start + 1} "
                           f"(near {_show(value[max(0, e.start - 20):e.start], 30)}): usually an emoji cut in half. "
                           "Remove it or write the whole character.") from None


def _text(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise _fail(where, f'"{key}" is missing. Add it, e.g. "{key}": "...".')
    value = obj[key]
    if value is None:
        raise _fail(where, f'"{key}" is null. Write the text in double quotes, e.g. "{key}": "...", or remove the line.')
    if not isinstance(value, str):
        hint = f'"{key}": {json.dumps(str(value), ensure_ascii=False)}' if isinstance(value, (int, float)) else f'"{key}": "..."'
        raise _fail(where, f'"{key}" must be a string, got {_kind(value)} {_show(value)}. Write it as text in double quotes, e.g. {hint}.')
    if not allow_empty and not value.strip():
        raise _fail(where, f'"{key}" is empty{" (only whitespace)" if value else ""}: {_show(value)}. Fill it in or remove the line.')
    _check_unicode(value, where, f'"{key}"')
    return value


def _keywords(obj: dict, where: str) -> list[str]:
    keywords = obj.get("keywords")
    if keywords is None:
        return []
    if not isinstance(keywords, list):
        hint = f" Write [{_show(keywords)}]." if isinstance(keywords, str) and keywords.strip() else ""
        raise _fail(where, f'"keywords" must be a list of non-empty strings, got {_kind(keywords)} {_show(keywords)}.{hint}')
    for i, k in enumerate(keywords):
        if not isinstance(k, str) or not k.strip():
            what = "empty" if isinstance(k, str) else f"{_kind(k)}, not a string"
            raise _fail(where, f'"keywords" must be a list of non-empty strings; keywords[{i}] is {_show(k)} ({what}). '
                               "Remove it or write the word the answer must contain.")
        _check_unicode(k, where, f"keywords[{i}]")
    return keywords


def _messages(obj: dict, where: str) -> list[dict]:
    msgs = obj["messages"]
    expected = '"messages" must be a non-empty list of {"role", "content"} objects'
    if not isinstance(msgs, list):
        raise _fail(where, f"{expected}, got {_kind(msgs)} {_show(msgs)}.")
    if not msgs:
        raise _fail(where, f"{expected}, got an empty list. Add the user and assistant turns, or remove the line.")
    clean = []
    for i, m in enumerate(msgs):
        here = f"{where} messages[{i}]"
        if not isinstance(m, dict):
            raise _fail(here, f'must be an object {{"role": "...", "content": "..."}}, got {_kind(m)} {_show(m)}.')
        role = m.get("role")
        if role not in ROLES:
            alias = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
            fix = f'Rename it to "{alias}".' if alias else 'Use "system", "user" or "assistant".'
            got = f"role {_show(role)}" if "role" in m else 'no "role"'
            raise _fail(here, f"has {got}: each message needs a role system|user|assistant and a content. {fix}")
        clean.append({"role": role, "content": _text(m, "content", here)})
    if not any(m["role"] == "assistant" for m in clean):
        roles = ", ".join(m["role"] for m in clean)
        raise _fail(where, f"no assistant message (roles: {roles}): there is nothing to learn. Add the answer as role 'assistant'.")
    return clean


def _to_example(obj: dict, shape: str, where: str) -> Example:
    keywords = _keywords(obj, where)
    if shape == "text":
        return Example(None, _text(obj, "text", where), keywords, where)
    if shape == "messages":
        return Example(_messages(obj, where), None, keywords, where)
    if shape == "instruction":
        prompt = _text(obj, "instruction", where)
        extra = obj.get("input")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise _fail(where, f'"input" must be a string, got {_kind(extra)} {_show(extra)}. '
                               f'Write it in double quotes, e.g. "input": {json.dumps(str(extra), ensure_ascii=False)}, or leave it out.')
        _check_unicode(extra, where, '"input"')
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        answer = _text(obj, "output", where)
    else:
        q, a = SHAPES[shape]
        user, answer = _text(obj, q, where), _text(obj, a, where)
    return Example([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], None, keywords, where)


def _unknown_shape(obj: dict) -> str:
    keys = sorted(obj)
    if not keys:
        return f"empty object {{}}. Expected {SHAPE_HELP}."
    q = lambda k: json.dumps(k, ensure_ascii=False)
    shown = ", ".join(q(k) for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    fixes = []
    for needed in SHAPES.values():
        have = [k for k in needed if k in obj]
        if have:  # half a shape: name what is missing
            missing = [k for k in needed if k not in obj]
            fixes.append(f"{' and '.join(map(q, have))} needs {' and '.join(map(q, missing))}")
    renames = [f"{q(k)} to {q(KEY_ALIASES[k.lower()])}" for k in keys
               if k.lower() in KEY_ALIASES and KEY_ALIASES[k.lower()] not in obj]
    if renames:
        fixes.append(f"rename {', '.join(renames)}")
    fix = f" Fix: {'; '.join(fixes)}." if fixes else ""
    return f"unknown shape with keys [{shown}].{fix} Expected {SHAPE_HELP}."


def _json_error(e: json.JSONDecodeError, line: str, path: Path) -> str:
    """What is wrong with a line that is not JSON, and the likely fix."""
    pos = min(e.pos, len(line))
    stripped = line.strip()
    if len(line) <= 120:
        near = _visible(line.strip())
    else:  # a long line: show where it breaks
        near = ("…" if pos > 50 else "") + _visible(line[max(0, pos - 50): pos + 30]) + "…"
    what = f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    if "\x00" in line:
        return (f"a NUL byte (\\x00) at column {line.index(chr(0)) + 1}: the line is corrupted (or the file is binary). "
                f"Remove the NUL bytes, e.g. tr -d '\\000' < {path} > fixed.jsonl")
    if e.msg.startswith("Invalid control character"):
        ch = line[pos] if pos < len(line) else "?"
        return (f"{what}: a raw control character U+{ord(ch):04X} inside a string. "
                f"Write it escaped ({json.dumps(ch)[1:-1]}) or remove it. The line: {near[:100]}")
    if e.msg.startswith("Unexpected UTF-8 BOM"):
        return ("a byte-order mark (BOM, U+FEFF) starts this line, in the middle of the file (files joined with cat?). "
                "Remove it.")
    if stripped in ("{", "[") or (stripped.startswith("[") and stripped.endswith(("{", "[", ","))):
        jq = "jq -c '.[]'" if stripped.startswith("[") else "jq -c ."
        return (f"{what}: {near!r} looks like a pretty-printed JSON document, not JSONL. JSONL holds one object per line; "
                f"convert it with {jq} {path} > data.jsonl")
    hint = 'Fix the JSON at that column: one JSON object per line, e.g. {"question": "...", "answer": "..."}.'
    if e.msg.startswith("Expecting") and _TRAILING_COMMA.search(line, max(0, pos - 40), pos + 40):
        hint = "There is a trailing comma before '}' or ']': remove it."
    elif e.msg.startswith("Expecting property name enclosed in double quotes") and "'" in line:
        hint = "JSON needs double quotes around keys and strings, not single quotes (this looks like a Python dict)."
    elif e.msg.startswith("Unterminated string"):
        hint = ("A closing quote is missing, or the line was cut: a line break inside a string must be written as \\n, "
                "and each example must fit on one line.")
    elif e.msg.startswith("Extra data"):
        hint = "There is more than one JSON value on this line: put each object on its own line."
    return f"{what}. {hint} The line: {near}"


def _visible(text: str) -> str:
    """Control characters (a terminal would act on them) written as escapes; everything else as is."""
    return "".join(c if c >= " " and c != "\x7f" else json.dumps(c)[1:-1] for c in text)


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate one JSONL file; errors name file:line, the value and the fix."""
    path = Path(path)
    textfile.check_path(path)
    examples: list[Example] = []
    shape, shape_line, lines = None, 0, 0
    for lineno, line in textfile.lines(path):
        lines = lineno
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(where, _json_error(e, line, path)) from None
        except RecursionError:
            raise _fail(where, "not valid JSON for afinar: nested too deeply. Flatten the line to one object of strings.") from None
        except ValueError as e:  # a number with more digits than Python converts (4300)
            reason = "a number has more than 4300 digits" if "digits" in str(e) else str(e)[:100]
            raise _fail(where, f"not valid JSON for afinar: {reason}. Write the value as a string.") from None
        if not isinstance(obj, dict):
            hint = ("This looks like a JSON array of objects: put each object on its own line."
                    if isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj) else f"Expected {SHAPE_HELP}.")
            raise _fail(where, f"expected a JSON object {{...}}, got {_kind(obj)} {_show(obj)}. {hint}")
        this = _detect(obj)
        if this is None:
            raise _fail(where, _unknown_shape(obj))
        if shape is None:
            shape, shape_line = this, lineno
        elif this != shape:
            raise _fail(where, f"shape '{this}' but line {shape_line} has shape '{shape}': a file holds one shape. Convert the lines to one shape.")
        examples.append(_to_example(obj, this, where))
    if not examples:
        what = "the file is empty" if lines == 0 else f"the file holds only {lines} blank line{'s' if lines > 1 else ''}"
        raise AfinarError(f"{path}: no examples: {what}. Expected {SHAPE_HELP}.")
    return examples


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
    # The same line reader, so line i is example i (str.splitlines would also split at U+2028 inside a string).
    lines = [ln for _, ln in textfile.lines(path) if ln.strip()]
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
