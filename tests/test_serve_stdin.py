"""`afinar ask RUN --stdin`, the line protocol of a long-lived backend process: one line out per line in, in order."""

from __future__ import annotations

import json
import queue
import threading

import pytest

from afinar.ask_lines import answer_lines
from afinar.inference import Predictor

DEFAULTS = dict(max_tokens=5, temperature=0.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from afinar.synthetic import make_tiny_run

    return Predictor(make_tiny_run(tmp_path_factory.getbasetemp() / "serving" / "run"))


class Pipe:
    """stdin and stdout of the protocol as a client sees them: write a line, read a line."""

    def __init__(self, predictor):
        self.lines_in, self.lines_out, self.result = queue.Queue(), queue.Queue(), []
        self.thread = threading.Thread(target=lambda: self.result.append(
            answer_lines(predictor, DEFAULTS, iter(self.lines_in.get, None), self)), daemon=True)
        self.thread.start()

    def write(self, text: str) -> None:  # the protocol's stdout
        for line in text.splitlines():
            self.lines_out.put(line)

    def flush(self) -> None:
        pass

    def ask(self, line: str) -> dict:
        self.lines_in.put(line + "\n")
        return json.loads(self.lines_out.get(timeout=60))

    def close(self) -> bool:
        self.lines_in.put(None)
        self.thread.join(60)
        return self.result[0]


def test_write_one_read_one_with_ids_errors_and_order(predictor):
    pipe = Pipe(predictor)
    first = pipe.ask(json.dumps({"id": "q1", "question": "Onde joga o Farense?"}))  # the client waits for it
    assert first["id"] == "q1" and first == {"id": "q1", **first}
    assert first["answer"] == predictor.ask("Onde joga o Farense?", max_tokens=5)["answer"]
    bad = {
        "not json": ("invalid_json", "stdin:2"),
        "": ("invalid_json", "empty line"),
        json.dumps([1, 2]): ("invalid_json", "got list"),
        json.dumps({"id": 7, "q": "x"}): ("invalid_field", "question"),
        json.dumps({"id": 8, "question": "x", "temperature": 5}): ("invalid_field", "temperature"),
        json.dumps({"id": 9, "question": "x", "seed": 2**64}): ("invalid_field", "seed"),
        '{"id": 10, "question": "a \\ud800 b"}': ("invalid_field", "question"),  # not encodable text
        json.dumps({"id": 11, "question": "palavra " * 2100}): ("context_length_exceeded", "tokens"),
    }
    for line, (code, needle) in bad.items():
        reply = pipe.ask(line)
        assert reply["error"]["code"] == code and needle in reply["error"]["message"], reply
        if '"id"' in line:
            assert reply["id"] == json.loads(line.replace("\\ud800", ""))["id"]
    # many lines at once: answered in order, batched by the engine
    questions = [f"Pergunta {i}?" for i in range(12)]
    for i, q in enumerate(questions):
        pipe.lines_in.put(json.dumps({"id": i, "question": q, "max_tokens": 3 + i % 4}) + "\n")
    replies = [json.loads(pipe.lines_out.get(timeout=60)) for _ in questions]
    assert [r["id"] for r in replies] == list(range(12))
    expected = [predictor.ask(q, max_tokens=3 + i % 4)["answer"] for i, q in enumerate(questions)]
    assert [r["answer"] for r in replies] == expected
    assert pipe.close() is True  # some lines failed: the command exits 2 at the end of its input
