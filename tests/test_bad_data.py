"""The bad-data corpus (tests/data/bad/) through the real CLI.

Every malformed input must give one short message naming file:line (or the file), the value
and the fix, exit code 2, no traceback, and, for `afinar train`, no run folder left behind.
What training survives (too long, duplicates, train/val overlap) is a warning of
`afinar data check` with exit code 0. tests/data/bad/README.md lists what each file shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afinar.cli import app

BAD = Path(__file__).parent / "data" / "bad"
runner = CliRunner()

# file -> (line the message names, or None where the whole file is at fault; substrings of the message)
ERRORS: dict[str, tuple[int | None, list[str]]] = {
    # JSON syntax
    "broken_json.jsonl": (3, ["not valid JSON", "Expecting ',' delimiter", "one JSON object per line"]),
    "trailing_comma.jsonl": (2, ["not valid JSON", "trailing comma", "remove it"]),
    "single_quotes.jsonl": (2, ["not valid JSON", "double quotes", "Python dict"]),
    "array_line.jsonl": (2, ["expected a JSON object", 'got an array ["Onde joga o Farense?"', '{"question": "...", "answer": "..."}']),
    "array_of_objects.jsonl": (1, ["got an array", "put each object on its own line"]),
    "bare_string.jsonl": (3, ["expected a JSON object", 'got a string "Onde joga o Farense? No São Luís."']),
    "pretty_printed.jsonl": (1, ["pretty-printed JSON document", "jq -c '.[]'"]),
    "two_objects_one_line.jsonl": (2, ["Extra data", "each object on its own line"]),
    "multiline_string.jsonl": (2, ["Unterminated string", "written as \\n"]),
    "deeply_nested.jsonl": (2, ["nested too deeply"]),
    "huge_integer.jsonl": (2, ["4300 digits", "Write the value as a string"]),
    # encodings and bytes
    "latin1.jsonl": (2, ["not UTF-8", "byte 0xe3", "Fara\\xe7\\xe3o", "Faração", "iconv -f latin1 -t utf-8"]),
    "bom_in_middle.jsonl": (2, ["byte-order mark", "Remove it"]),
    "utf16.jsonl": (None, ["UTF-16", "iconv -f utf-16 -t utf-8"]),
    "nul_bytes.jsonl": (3, ["NUL byte", "column 28", "tr -d"]),
    "lone_surrogate.jsonl": (2, ['"question"', "unpaired surrogate \\ud83d", "emoji"]),
    "binary.png": (None, ["is a PNG image", "not UTF-8 JSONL text"]),
    "random_bytes.bin": (None, ["is a binary file", "Pass a UTF-8 file"]),
    "compressed.jsonl.gz": (None, ["gzip-compressed", "gunzip -k"]),
    # shapes and fields
    "missing_answer.jsonl": (3, ["unknown shape", '"question" needs "answer"']),
    "answer_empty.jsonl": (2, ['"answer" is empty', "Fill it in"]),
    "answer_whitespace.jsonl": (2, ['"answer" is empty (only whitespace)', "Fill it in"]),
    "question_number.jsonl": (2, ['"question" must be a string, got a number 1910', '"question": "1910"']),
    "question_null.jsonl": (3, ['"question" is null', "double quotes"]),
    "keywords_not_list.jsonl": (2, ['"keywords" must be a list', 'got a string "branco"', 'Write ["branco"]']),
    "keywords_empty_string.jsonl": (2, ['"keywords" must be a list', 'keywords[1] is "" (empty)']),
    "messages_not_list.jsonl": (2, ['"messages" must be a non-empty list', "got a string"]),
    "messages_empty.jsonl": (2, ['"messages" must be a non-empty list', "got an empty list"]),
    "message_without_content.jsonl": (2, ["messages[0]", '"content" is missing']),
    "unknown_role.jsonl": (2, ["messages[1]", 'role "bot"', 'Rename it to "assistant"']),
    "no_assistant_turn.jsonl": (2, ["no assistant message (roles: system, user)", "role 'assistant'"]),
    "assistant_empty.jsonl": (2, ["messages[1]", '"content" is empty']),
    "assistant_first.jsonl": (1, ["chat template refuses", "roles: assistant, user, assistant", "starting with user"]),
    "mixed_shapes.jsonl": (3, ["shape 'messages'", "line 1 has shape 'question_answer'", "one shape"]),
    "unknown_keys.jsonl": (1, ["unknown shape", 'rename "a" to "answer", "q" to "question"']),
    "instruction_input_number.jsonl": (2, ['"input" must be a string, got a number 1910', '"input": "1910"']),
    "text_empty.jsonl": (2, ['"text" is empty', "Fill it in"]),
    "empty.jsonl": (None, ["no examples", "the file is empty", "one JSON object per line"]),
    "blank_lines.jsonl": (None, ["no examples", "only 5 blank lines"]),
    "directory_instead_of_file": (None, ["holds no train.jsonl or val.jsonl", ".parquet", "(it holds: train.csv)"]),
    # JSON documents and ShareGPT: the same checks, positions named "item N" (and the line of a syntax error)
    "json_bad_item.json": (None, ["json_bad_item.json item 2", '"answer" is empty']),
    "json_trailing_comma.json": (4, ["(item 2)", "trailing comma", "remove it"]),
    "json_two_lists.json": (None, ['2 list fields ("train", "test")', "a file of its own"]),
    "sharegpt_unknown_role.jsonl": (2, ["conversations[1]", 'from "function_call"', "remove the turn"]),
}

# file -> substrings of the warning(s); `data check` exits 0
WARNINGS: dict[str, list[str]] = {
    "answer_too_long.jsonl": ["1 example is longer than train.max_seq_length=512", "answer_too_long.jsonl:4", "will be cut"],
    "prompt_too_long_some.jsonl": ["2 examples (first:", "prompt_too_long_some.jsonl:4", "leaving no answer token", "training skips them"],
    "prompt_too_long_all.jsonl": ["leaving no answer token", "all of them: training would stop with an error"],
    "duplicated_lines.jsonl": ["2 duplicate question+answer pairs", "duplicated_lines.jsonl:3 repeats line 1"],
    "special_token_text.jsonl": ["special token's text", "special_token_text.jsonl:2 (</s>)", "Remove or rephrase"],
    "train_val_overlap": ["1 question appears in both train and val", "train_val_overlap/val.jsonl:1", "afinar data split"],
}

# accepted transparently: read exactly like the plain UTF-8 / LF file
ACCEPTED = ["bom.jsonl", "crlf.jsonl", "cr_line_endings.jsonl", "line_separator_in_string.jsonl"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], prog_name="afinar")


def squash(text: str) -> str:
    """Whitespace removed: the console wraps (and folds long paths) at its width."""
    return "".join(text.split())


def assert_clean_error(result, *needles: str) -> None:
    """Exit 2, a short message on stderr naming every needle, no traceback."""
    text = result.stdout + result.stderr
    assert result.exit_code == 2, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    assert result.stderr.startswith("error: "), text
    assert len(result.stderr) < 1200 and result.stderr.count("\n") <= 4, f"not one screen: {result.stderr!r}"
    for needle in needles:
        assert squash(needle) in squash(result.stderr), f"{needle!r} not in {result.stderr!r}"


def where(name: str, line: int | None) -> str:
    path = BAD / name
    return f"{path}:{line}" if line else str(path)


def check(path, model, *extra):
    return invoke("data", "check", path, "--set", f"model.base={model}", *extra)


# ---------------------------------------------------------------- the corpus itself


def test_corpus_matches_readme_and_cases():
    """Every file is a case here and a row of the README; nothing is large; the odd bytes survived checkout."""
    entries = {p.name for p in BAD.iterdir()} - {"README.md", ".gitattributes"}
    assert entries == set(ERRORS) | set(WARNINGS) | set(ACCEPTED)
    assert len(ERRORS) + len(WARNINGS) + len(ACCEPTED) >= 30
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    for name in entries:
        assert f"`{name}" in readme, f"{name} is not described in {BAD / 'README.md'}"
    for path in BAD.rglob("*"):
        assert not path.is_file() or path.stat().st_size < 100_000, path
    raw = lambda name: (BAD / name).read_bytes()
    assert raw("bom.jsonl").startswith(b"\xef\xbb\xbf") and raw("crlf.jsonl").count(b"\r\n") == 3
    assert b"Fara\xe7\xe3o" in raw("latin1.jsonl") and b"\x00" in raw("nul_bytes.jsonl")
    assert raw("binary.png").startswith(b"\x89PNG") and raw("compressed.jsonl.gz").startswith(b"\x1f\x8b")
    assert raw("empty.jsonl") == b""


# ---------------------------------------------------------------- afinar data check


@pytest.mark.parametrize("name", list(ERRORS))
def test_data_check_rejects(name, tiny_model):
    line, needles = ERRORS[name]
    result = check(BAD / name, tiny_model)
    assert_clean_error(result, where(name, line), *needles)
    assert result.stdout == ""


def test_data_check_missing_path_suggests_the_near_name(tiny_model):
    result = check(BAD / "broken_jsn.jsonl", tiny_model)
    assert_clean_error(result, f"not found: {BAD / 'broken_jsn.jsonl'}", f"Did you mean {BAD / 'broken_json.jsonl'}?")


@pytest.mark.parametrize("name", list(WARNINGS))
def test_data_check_warns(name, tiny_model):
    result = check(BAD / name, tiny_model)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    out = squash(result.stdout)
    assert "warning:" in out
    for needle in WARNINGS[name]:
        assert squash(needle) in out, f"{needle!r} not in {result.stdout!r}"


@pytest.mark.parametrize("name", ACCEPTED)
def test_data_check_accepts(name, tiny_model, tmp_path):
    from afinar.data import read_jsonl

    plain = tmp_path / "plain.jsonl"
    text = (BAD / name).read_bytes().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    plain.write_text(text, encoding="utf-8")
    got, want = read_jsonl(BAD / name), read_jsonl(plain)
    assert [(e.messages, e.keywords) for e in got] == [(e.messages, e.keywords) for e in want]
    assert [e.source.rsplit(":", 1)[1] for e in got] == ["1", "2", "3"]
    result = check(BAD / name, tiny_model, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"][str(BAD / name)]["examples"] == 3
    # and `data split` writes the same examples as clean UTF-8 / LF lines (U+2028 inside a string stays)
    result = invoke("data", "split", BAD / name, "--out-dir", tmp_path / "split")
    assert result.exit_code == 0, result.output
    back = []
    for part in ("train.jsonl", "val.jsonl"):
        written = (tmp_path / "split" / part).read_bytes()
        assert b"\r" not in written and not written.startswith(b"\xef\xbb\xbf")
        back += read_jsonl(tmp_path / "split" / part)
    assert sorted(e.answer for e in back) == sorted(e.answer for e in want)


def test_data_check_survives_a_10mb_line(tiny_model, tmp_path):
    """One valid example whose answer is 10 MB of text: a truncation warning, no crash, no hang."""
    path = tmp_path / "huge.jsonl"
    answer = "O Farense é de Faro. " * (10 * 2**20 // 22)
    rows = [{"question": "Conta tudo sobre o Farense.", "answer": answer}, {"question": "Onde?", "answer": "Em Faro."}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert path.stat().st_size > 10 * 2**20
    result = check(path, tiny_model)
    assert result.exit_code == 0, result.output[-2000:]
    out = squash(result.stdout)
    assert squash("1 example is longer than train.max_seq_length=512") in out and squash(f"{path}:1") in out
    assert len(result.stdout) < 5000  # the answer is not echoed


# ---------------------------------------------------------------- afinar train

# (data.train, data.val, substrings of the message); the file named by the message is the bad one
TRAIN_ERRORS = [
    ("broken_json.jsonl", None, [where("broken_json.jsonl", 3), "not valid JSON"]),
    ("latin1.jsonl", None, [where("latin1.jsonl", 2), "not UTF-8", "iconv"]),
    ("binary.png", None, [where("binary.png", None), "PNG image"]),
    ("nul_bytes.jsonl", None, [where("nul_bytes.jsonl", 3), "NUL byte"]),
    ("missing_answer.jsonl", None, [where("missing_answer.jsonl", 3), '"question" needs "answer"']),
    ("unknown_role.jsonl", None, [where("unknown_role.jsonl", 2), 'Rename it to "assistant"']),
    ("mixed_shapes.jsonl", None, [where("mixed_shapes.jsonl", 3), "one shape"]),
    ("lone_surrogate.jsonl", None, [where("lone_surrogate.jsonl", 2), "unpaired surrogate"]),
    ("empty.jsonl", None, [where("empty.jsonl", None), "no examples"]),
    ("directory_instead_of_file", None, [where("directory_instead_of_file", None), "is a folder, not a data file", "train.csv"]),
    ("json_bad_item.json", None, [f"{BAD / 'json_bad_item.json'} item 2", '"answer" is empty']),
    ("nope.jsonl", None, ["Data file not found", where("nope.jsonl", None), "data.train"]),
    ("crlf.jsonl", "question_null.jsonl", [where("question_null.jsonl", 3), '"question" is null']),
    # these two fail after the model is loaded, inside the run: the .partial folder must go too
    ("assistant_first.jsonl", None, [where("assistant_first.jsonl", 1), "chat template refuses"]),
    ("prompt_too_long_all.jsonl", None, ["no training example has an answer token left", "train.max_seq_length=512"]),
]


def train(model, out, train_file, val_file=None):
    return invoke(
        "train", "--output", out, "--set", f"model.base={model}", "--set", f"data.train={train_file}",
        "--set", f"data.val={val_file or 'null'}", "--set", "model.quantization=none",
        "--set", "train.max_steps=1", "--set", "train.grad_accumulation=1",
    )


@pytest.mark.parametrize("train_file, val_file, needles", TRAIN_ERRORS, ids=[f"{t}+{v}" if v else t for t, v, _ in TRAIN_ERRORS])
def test_train_refuses_bad_data_and_leaves_no_folder(train_file, val_file, needles, tiny_model, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_model, out, BAD / train_file, val_file and BAD / val_file)
    assert_clean_error(result, *needles)
    assert not out.exists() and not out.with_name("run.partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_train_drops_examples_without_answer_tokens(tiny_model, tmp_path):
    """Prompts longer than train.max_seq_length leave no answer token: dropped with a count, training goes on."""
    out = tmp_path / "run"
    result = train(tiny_model, out, BAD / "prompt_too_long_some.jsonl")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "3 examples" in said and "2 dropped (no answer token left)" in said
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["examples_dropped"] == 2
