"""Training data -> validated `Example`s, or an error naming file:line (or item / row), the value and the fix.

Shapes (detected per file; one file holds one shape):
  {"messages": [{"role", "content"}, ...]}     chat; loss on assistant turns
  {"conversations": [{"from", "value"}, ...]}  ShareGPT: chat, its names mapped (human -> user, gpt -> assistant)
  {"prompt", "completion"} / {"question", "answer"} / {"instruction", "input"?, "output"}
  {"text"}                                     plain text; loss on every token
Any line may also carry "keywords": [...] (strings a correct answer must contain), used by
the fact-recall metric.

`Rows` validates one file's objects, whatever the file format (`datafiles.py` reads JSON,
Parquet and saved Hugging Face datasets through it); `read` reads JSONL. JSONL files are UTF-8
(a leading byte-order mark is skipped), with LF, CRLF or CR line endings. Anything else
(another encoding, a binary or compressed file, a malformed line) is an `AfinarError` naming
file:line, the offending value and the fix (decoding lives in `textfile.py`).
`tests/data/bad/` holds one file per case.
"""

from __future__ import annotations

import json
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
SHAREGPT = "sharegpt"
# What `data check` calls each shape.
SHAPE_NAMES = {"question_answer": "question/answer", "prompt_completion": "prompt/completion", "instruction": "instruction",
               "messages": "chat (messages)", SHAREGPT: "ShareGPT", "text": "text"}
ROLES = ("system", "user", "assistant")
_SHAPE_LIST = (
    '{"question": "...", "answer": "..."}; other shapes: '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}, '
    '{"conversations": [{"from": "human", "value": "..."}, ...]}, '
    '{"prompt", "completion"}, {"instruction", "input", "output"}, {"text"}'
)
SHAPE_HELP = f"one JSON object per line, e.g. {_SHAPE_LIST}"
# Keys people use for the shapes' keys: named in the error so the fix is a rename.
KEY_ALIASES = {
    "q": "question", "query": "question", "pergunta": "question", "a": "answer", "response": "answer",
    "resposta": "answer", "conversation": "messages", "chat": "messages",
    "content": "text", "input_text": "prompt", "target": "completion",
}
# Role names of other formats: applied in ShareGPT data, named as the fix in "messages" data.
ROLE_ALIASES = {"bot": "assistant", "ai": "assistant", "model": "assistant", "gpt": "assistant", "chatbot": "assistant",
                "human": "user", "prompter": "user"}
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


@dataclass
class Example:
    messages: list[dict] | None  # chat shapes
    text: str | None  # the "text" shape
    keywords: list[str] = field(default_factory=list)
    source: str = ""  # "file:line" (or "file item N" / "file row N"), for messages that point at the data

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


@dataclass
class Dataset:
    """One data file (or saved dataset) read and validated."""

    path: Path
    format: str  # jsonl | json | parquet | hf-dataset
    shape: str  # a key of SHAPE_NAMES
    examples: list[Example]
    notices: list[str] = field(default_factory=list)  # what was read how, once per file (aliases applied, split)
    rows: list[str] | None = None  # with keep_rows: each example's record as one JSON line (for `data split`)


def detect(obj: dict) -> str | None:
    """The shape of one record (a key of SHAPE_NAMES), or None."""
    turns = obj.get("messages")
    if "conversations" in obj or (isinstance(turns, list) and any(
            isinstance(t, dict) and "role" not in t and ("from" in t or "value" in t) for t in turns)):
        return SHAREGPT
    for shape, keys in SHAPES.items():
        if all(k in obj for k in keys):
            return shape
    return None


def _fail(where: str, msg: str) -> AfinarError:
    return AfinarError(f"{where}: {msg}")


def describe(value) -> str:
    """A value as a user would name it in a message: its JSON type, then the value (cut)."""
    return f"{_kind(value)} {_show(value)}"


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


def _messages(obj: dict, where: str, sharegpt: bool, applied: dict) -> list[dict]:
    """The conversation, validated. ShareGPT's names (conversations, from/value, human/gpt, a "system"
    field) are mapped, and each mapping recorded in `applied` (the file says them once)."""
    key = "conversations" if sharegpt and "conversations" in obj else "messages"
    turn = '{"from", "value"}' if sharegpt else '{"role", "content"}'
    msgs = obj[key]
    expected = f'"{key}" must be a non-empty list of {turn} objects'
    if not isinstance(msgs, list):
        raise _fail(where, f"{expected}, got {_kind(msgs)} {_show(msgs)}.")
    if not msgs:
        raise _fail(where, f"{expected}, got an empty list. Add the user and assistant turns, or remove the line.")
    clean = []
    for i, m in enumerate(msgs):
        here = f"{where} {key}[{i}]"
        if not isinstance(m, dict):
            example = '{"from": "...", "value": "..."}' if sharegpt else '{"role": "...", "content": "..."}'
            raise _fail(here, f"must be an object {example}, got {_kind(m)} {_show(m)}.")
        role_key, content_key = "role", "content"
        if sharegpt:
            role_key, content_key = ("from" if "from" in m else "role"), ("value" if "value" in m else "content")
            if (key, role_key, content_key) != ("messages", "role", "content"):
                applied.setdefault("keys", {})[f"{key}/{role_key}/{content_key} -> messages/role/content"] = None
        role = m.get(role_key)
        if sharegpt and isinstance(role, str) and (role.lower() in ROLE_ALIASES or role.lower() in ROLES):
            mapped = ROLE_ALIASES.get(role.lower(), role.lower())
            if mapped != role:
                applied.setdefault("roles", {})[f"{role} -> {mapped}"] = None
            role = mapped
        if role not in ROLES:
            got = f"{role_key} {_show(role)}" if role_key in m else f'no "{role_key}"'
            if sharegpt:
                raise _fail(here, f"has {got}: afinar reads the roles human or user, gpt or assistant (also bot, model), "
                                  "and system. Rename it, or remove the turn.")
            alias = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
            fix = f'Rename it to "{alias}".' if alias else 'Use "system", "user" or "assistant".'
            raise _fail(here, f"has {got}: each message needs a role system|user|assistant and a content. {fix}")
        clean.append({"role": role, "content": _text(m, content_key, here)})
    if sharegpt and obj.get("system") not in (None, ""):  # ShareGPT variants keep the system prompt apart
        if clean[0]["role"] == "system":
            raise _fail(where, f'both a "system" field and a system turn in "{key}": keep one.')
        clean.insert(0, {"role": "system", "content": _text(obj, "system", where)})
        applied.setdefault("keys", {})['"system" -> a first system turn'] = None
    if not any(m["role"] == "assistant" for m in clean):
        roles = ", ".join(m["role"] for m in clean)
        raise _fail(where, f"no assistant message (roles: {roles}): there is nothing to learn. Add the answer as role 'assistant'.")
    return clean


def _to_example(obj: dict, shape: str, where: str, applied: dict) -> Example:
    keywords = _keywords(obj, where)
    if shape == "text":
        return Example(None, _text(obj, "text", where), keywords, where)
    if shape in ("messages", SHAREGPT):
        return Example(_messages(obj, where, shape == SHAREGPT, applied), None, keywords, where)
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


def _unknown_shape(obj: dict, expected: str) -> str:
    keys = sorted(obj)
    if not keys:
        return f"empty object {{}}. Expected {expected}."
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
    return f"unknown shape with keys [{shown}].{fix} Expected {expected}."


def json_error(e: json.JSONDecodeError, line: str, path: Path, document: bool = False, around: str | None = None) -> str:
    """What is wrong with a line that is not JSON (or the line of a JSON `document` where it breaks), and the likely fix.

    `around`: the document's text just before the error, where a trailing comma may sit on an earlier line."""
    pos = min(e.colno - 1, len(line))
    stripped = line.strip()
    if len(line) <= 120:
        near = _visible(line.strip())
    else:  # a long line: show where it breaks
        near = ("…" if pos > 50 else "") + _visible(line[max(0, pos - 50): pos + 30]) + "…"
    what = f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    if "\x00" in line:
        return (f"a NUL byte (\\x00) at column {line.index(chr(0)) + 1}: the line is corrupted (or the file is binary). "
                f"Remove the NUL bytes, e.g. tr -d '\\000' < {path} > fixed{path.suffix}")
    if e.msg.startswith("Invalid control character"):
        ch = line[pos] if pos < len(line) else "?"
        return (f"{what}: a raw control character U+{ord(ch):04X} inside a string. "
                f"Write it escaped ({json.dumps(ch)[1:-1]}) or remove it. The line: {near[:100]}")
    if e.msg.startswith("Unexpected UTF-8 BOM"):
        return ("a byte-order mark (BOM, U+FEFF) starts this line, in the middle of the file (files joined with cat?). "
                "Remove it.")
    if not document and (stripped in ("{", "[") or (stripped.startswith("[") and stripped.endswith(("{", "[", ",")))):
        jq = "jq -c '.[]'" if stripped.startswith("[") else "jq -c ."
        return (f"{what}: {near!r} looks like a pretty-printed JSON document, not JSONL. JSONL holds one object per line; "
                f"convert it with {jq} {path} > data.jsonl (or name the file .json: afinar reads a JSON array too)")
    if document:
        hint = "Fix the JSON at that line and column."
    else:
        hint = 'Fix the JSON at that column: one JSON object per line, e.g. {"question": "...", "answer": "..."}.'
    if e.msg.startswith("Expecting") and (_TRAILING_COMMA.search(around) if around is not None
                                          else _TRAILING_COMMA.search(line, max(0, pos - 40), pos + 40)):
        hint = "There is a trailing comma before '}' or ']': remove it."
    elif e.msg.startswith("Expecting property name enclosed in double quotes") and "'" in line:
        hint = "JSON needs double quotes around keys and strings, not single quotes (this looks like a Python dict)."
    elif e.msg.startswith("Unterminated string"):
        hint = "A closing quote is missing, or the line was cut: a line break inside a string must be written as \\n"
        hint += "." if document else ", and each example must fit on one line."
    elif e.msg.startswith("Extra data") and not document:
        hint = "There is more than one JSON value on this line: put each object on its own line."
    return f"{what}. {hint} The line: {near}"


def parse(line: str, where: str, path: Path):
    """One JSONL line's value; errors name `where`, what is wrong and the fix."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise _fail(where, json_error(e, line, path)) from None
    except (RecursionError, ValueError) as e:
        raise _fail(where, unreadable(e, "line")) from None


def unreadable(e: Exception, unit: str) -> str:
    """Valid JSON that Python's reader refuses: too deep, or a number too long."""
    if isinstance(e, RecursionError):
        return f"not valid JSON for afinar: nested too deeply. Flatten the {unit} to one object of strings."
    reason = "a number has more than 4300 digits" if "digits" in str(e) else str(e)[:100]
    return f"not valid JSON for afinar: {reason}. Write the value as a string."


def _visible(text: str) -> str:
    """Control characters (a terminal would act on them) written as escapes; everything else as is."""
    return "".join(c if c >= " " and c != "\x7f" else json.dumps(c)[1:-1] for c in text)


class Rows:
    """Validates one file's records in order into a `Dataset`: the same checks and messages for every format.

    `unit` is what a position is called: "line" (JSONL: FILE:N), "item" (a JSON array: FILE item N)
    or "row" (Parquet, Hugging Face datasets: FILE row N).
    """

    def __init__(self, path: Path, fmt: str, unit: str, keep_rows: bool = False):
        self.path, self.format, self.unit = path, fmt, unit
        self.expected = SHAPE_HELP if unit == "line" else f"each {unit} an object such as {_SHAPE_LIST}"
        self.examples: list[Example] = []
        self.rows: list[str] | None = [] if keep_rows else None
        self.notices: list[str] = []
        self.shape, self.first = None, 0
        self.applied: dict[str, dict] = {}  # ShareGPT mappings seen, said once in `done`

    def where(self, n: int) -> str:
        return f"{self.path}:{n}" if self.unit == "line" else f"{self.path} {self.unit} {n}"

    def add(self, n: int, obj, raw: str | None = None) -> None:
        """Validate record `n` (1-based); `raw` is its text as written, kept for `data split` (default: re-encoded)."""
        where = self.where(n)
        if not isinstance(obj, dict):
            hint = f"Expected {self.expected}."
            if self.unit == "line" and isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj):
                hint = "This looks like a JSON array of objects: put each object on its own line, or name the file .json."
            raise _fail(where, f"expected a JSON object {{...}}, got {_kind(obj)} {_show(obj)}. {hint}")
        this = detect(obj)
        if this is None:
            raise _fail(where, _unknown_shape(obj, self.expected))
        if self.shape is None:
            self.shape, self.first = this, n
        elif this != self.shape:
            raise _fail(where, f"shape '{this}' but {self.unit} {self.first} has shape '{self.shape}': a file holds one shape. "
                               f"Convert the {self.unit}s to one shape.")
        self.examples.append(_to_example(obj, this, where, self.applied))
        if self.rows is not None:
            self.rows.append(raw if raw is not None else json.dumps(obj, ensure_ascii=False, default=str))

    def done(self, empty: str) -> Dataset:
        """The Dataset; `empty` says why there is none when no record was read (e.g. "the file is empty")."""
        if not self.examples:
            raise AfinarError(f"{self.path}: no examples: {empty}. Expected {self.expected}.")
        notices = list(self.notices)
        if self.shape == SHAREGPT:
            said = [*self.applied.get("keys", {}), *(["roles " + ", ".join(self.applied["roles"])] if "roles" in self.applied else [])]
            notices.append(f"{self.path}: read as ShareGPT ({'; '.join(said)})")
        return Dataset(self.path, self.format, self.shape, self.examples, notices, self.rows)


def read(path: str | Path, keep_rows: bool = False) -> Dataset:
    """Read and validate one JSONL file; errors name file:line, the value and the fix."""
    path = Path(path)
    textfile.check_path(path)
    rows = Rows(path, "jsonl", "line", keep_rows)
    lines = 0
    for lineno, line in textfile.lines(path):
        lines = lineno
        if line.strip():
            rows.add(lineno, parse(line, rows.where(lineno), path), raw=line)
    return rows.done("the file is empty" if lines == 0 else f"the file holds only {lines} blank line{'s' if lines > 1 else ''}")


def normalise(text: str) -> str:
    return " ".join(text.lower().split())
