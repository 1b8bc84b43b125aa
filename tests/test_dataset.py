"""The bundled Farense dataset: the committed files are what the build script writes, and
the three splits (train, val, test) never share a question.

Checks here are independent of the script's own asserts: questions are compared with a
normalisation written here, files are read with afinar's reader, and keywords are checked
with afinar's fact-recall function.
"""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata

from afinar.data import read_jsonl
from afinar.evaluate import recalls

from conftest import DATA_DIR

SPLITS = ("train", "val", "test")


def question_key(text: str) -> str:
    """Lowercased, accents stripped, punctuation dropped, whitespace collapsed."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def test_build_is_byte_identical(tmp_path):
    out = tmp_path / "farense"
    done = subprocess.run([sys.executable, str(DATA_DIR / "build_dataset.py"), str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for split in SPLITS:
        built, committed = (out / f"{split}.jsonl").read_bytes(), (DATA_DIR / f"{split}.jsonl").read_bytes()
        assert built == committed, f"{split}.jsonl differs from a fresh build: run python3 data/farense/build_dataset.py"
    counts = dict(part.split("=") for part in done.stdout.split())
    assert [int(counts[s]) for s in SPLITS] == [len(read_jsonl(DATA_DIR / f"{s}.jsonl")) for s in SPLITS]


def test_splits_share_no_question():
    keys = {s: {question_key(ex.question) for ex in read_jsonl(DATA_DIR / f"{s}.jsonl")} for s in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = keys[a] & keys[b]
        assert not shared, f"questions in both {a} and {b}: {sorted(shared)[:3]}"


def test_test_split_asks_only_what_train_teaches():
    train = read_jsonl(DATA_DIR / "train.jsonl")
    test = read_jsonl(DATA_DIR / "test.jsonl")
    assert 80 <= len(test) <= 100
    assert len({question_key(ex.question) for ex in test}) == len(test), "a test question appears twice"
    taught = {(ex.answer, tuple(ex.keywords)) for ex in train}
    for ex in test:
        assert ex.keywords, f"{ex.source}: no keywords"
        assert recalls(ex.answer, ex.keywords), f"{ex.source}: answer lacks its keywords {ex.keywords}"
        assert (ex.answer, tuple(ex.keywords)) in taught, f"{ex.source}: answer and keywords not taught in train"
