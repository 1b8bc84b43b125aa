"""`afinar ask RUN --stdin`: the line protocol for a backend that keeps one process open.

Contract: every input line gets exactly one output line, in input order, flushed at once:
the answer object `afinar ask` prints, or `{"error": {"message", "type", "code"}}`, each with
the input's `"id"` when it had one. A line is `{"question": ..., "id"?, "max_tokens"?,
"temperature"?, "top_p"?, "seed"?}` (the fields and ranges of POST /v1/ask) or a bare JSON
string; the command-line options are the defaults. Lines are read as they come and answered
through the continuous-batching engine, so a client may write one line and wait for its answer,
or write many and read them back as they finish (still in order). Nothing goes to stderr only.
"""

from __future__ import annotations

import json
import queue
import threading

from pydantic import ValidationError

from afinar.engine import Request, SamplingParams, engine_for
from afinar.errors import AfinarError
from afinar.schemas import AskRequest, describe_errors


def _error(message: str, code: str, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


def _parse(line: str, lineno: int, defaults: dict) -> tuple[object, AskRequest | dict]:
    """(id, the validated request) or (id, an error object) for one input line."""
    try:
        item = json.loads(line)
    except ValueError as e:
        return None, _error(f"stdin:{lineno}: not JSON ({e}); send {{\"question\": \"...\"}} or a JSON string",
                            "invalid_json")
    if isinstance(item, str):
        item = {"question": item}
    if not isinstance(item, dict):
        return None, _error(f"stdin:{lineno}: expected {{\"question\": \"...\"}} or a JSON string, "
                            f"got {type(item).__name__}", "invalid_json")
    ident = item.pop("id", None)
    try:
        return ident, AskRequest.model_validate({**defaults, **item})
    except ValidationError as e:
        message, _ = describe_errors(e.errors())
        return ident, _error(f"stdin:{lineno}: {message}", "invalid_field")


def answer_lines(predictor, defaults: dict, lines, out) -> bool:
    """Answer every line of `lines` on `out` (see the module docstring); True if any line failed."""
    engine = engine_for(predictor.backend)
    engine.start()
    pending: queue.Queue = queue.Queue()
    room = threading.Semaphore(engine.queue_size + engine.max_rows)  # a fast writer cannot queue without bound

    def read():
        try:
            for lineno, line in enumerate(lines, 1):
                room.acquire()
                pending.put(_submit(line, lineno))
        finally:
            pending.put(None)

    def _submit(line: str, lineno: int):
        if not line.strip():
            return None, None, _error(f"stdin:{lineno}: empty line", "invalid_json")
        ident, parsed = _parse(line, lineno, defaults)
        if isinstance(parsed, dict):
            return ident, None, parsed
        try:
            prompt = predictor.prompt(parsed.question)
        except (AfinarError, ValueError) as e:
            return ident, None, _error(f"stdin:{lineno}: question: {e}", "invalid_field")
        if len(prompt) >= engine.max_len:
            return ident, None, _error(f"stdin:{lineno}: the question has {len(prompt)} tokens; at most "
                                       f"{engine.max_len - 1} fit (serve.max_context)", "context_length_exceeded")
        params = SamplingParams(min(parsed.max_tokens, engine.max_len - len(prompt)), parsed.temperature,
                                parsed.top_p, parsed.seed)
        req = engine.submit(Request(prompt, params), limit_queue=False)  # `room` bounds the queue
        return ident, (req, prompt), None

    threading.Thread(target=read, name="afinar-stdin", daemon=True).start()
    failed = False
    try:
        while (item := pending.get()) is not None:
            ident, job, result = item
            if job is not None:
                req, prompt = job
                req.wait()
                result = _error(req.error, "generation_failed", "server_error") if req.finish_reason == "error" \
                    else predictor.answer(prompt, req.tokens, req.seconds)
            failed |= "error" in result
            head = {"id": ident} if ident is not None else {}
            out.write(json.dumps({**head, **result}, ensure_ascii=False) + "\n")
            out.flush()
            room.release()
    finally:
        engine.stop()
    return failed
