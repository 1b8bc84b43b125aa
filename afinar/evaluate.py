"""How good and how fast a run is, measured the same way for every run: `afinar eval`.

Answer quality needs no model of its own:
- fact recall: an answer recalls the fact when it contains every keyword of the example,
  compared lower-case, without accents and with whitespace collapsed ("São Luís" matches
  "sao luis"); examples without keywords are not counted;
- chrF (sacrebleu) of the answers against the reference answers;
- the share of empty answers, and of answers cut by `max_tokens` before the model ended them.

Validation loss goes through the very encoding and loss of training (`schedule.encode_all` with
the run's settings, `schedule.validation_loss`, the backend's `eval_loss`), so it is comparable
with the `val_loss` in the run's metrics. Latency is measured one question at a time, as a
user asking sees it; quality on batched greedy answers.

Without `--data`, a run is scored on its validation file and, apart, on its held-out test file
(`data.test`): the validation file took part in training (best checkpoint, early stopping) and
possibly in choosing settings; only the test figures are untouched by both.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

from afinar import atomic, data, oserrors, schedule
from afinar.data import Example
from afinar.errors import AfinarError
from afinar.stats import percentile
from afinar.status import status

# ---------------------------------------------------------------- answer quality


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


def recalls(answer: str, keywords: list[str]) -> bool:
    folded = fold(answer)
    return all(fold(k) in folded for k in keywords)


def fact_recall(examples: list[Example], answers: list[str]) -> dict:
    """{'fact_recall': share, 'hits': n, 'scored': n} over examples that carry keywords."""
    scored = [(ex, a) for ex, a in zip(examples, answers) if ex.keywords]
    hits = sum(recalls(a, ex.keywords) for ex, a in scored)
    return {"fact_recall": hits / len(scored) if scored else None, "hits": hits, "scored": len(scored)}


def recall_on(predictor, examples: list[Example], batch_size: int = 16, max_tokens: int = 96) -> tuple[dict, list[dict]]:
    """Generate greedy answers for `examples` with a Predictor and score them."""
    answers = answer_all(predictor, [ex.question for ex in examples], batch_size, max_tokens)
    score = fact_recall(examples, [a["answer"] for a in answers])
    return score, answers


def answer_all(predictor, questions: list[str], batch_size: int = 16, max_tokens: int = 96,
               label: str = "") -> list[dict]:
    """Greedy answers, `batch_size` questions per generate call (a status line counts them: `label`)."""
    answers: list[dict] = []
    with status(f"{label}Answering {len(questions)} questions, {batch_size} at a time") as stage:
        for i in range(0, len(questions), batch_size):
            answers += predictor.ask_many(questions[i : i + batch_size], max_tokens=max_tokens)
            stage.update(len(answers), len(questions))
    return answers


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF (0-100) of one answer against one reference."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hypothesis, [reference]).score


def corpus_chrf(hypotheses: list[str], references: list[str]) -> float | None:
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(hypotheses, [references]).score if hypotheses else None


def answer_quality(examples: list[Example], answers: list[dict], max_tokens: int) -> dict:
    """Fact recall, chrF, and the shares of empty and truncated answers."""
    texts = [a["answer"] for a in answers]
    n = len(texts)
    refs = [(reference(ex), t) for ex, t in zip(examples, texts) if reference(ex)]
    return {
        **fact_recall(examples, texts),
        "chrf": _round(corpus_chrf([t for _, t in refs], [r for r, _ in refs]), 2),
        "empty_share": sum(not t.strip() for t in texts) / n if n else None,
        # No EOS within the limit: the answer was cut, not finished.
        "truncated_share": sum(a["completion_tokens"] >= max_tokens for a in answers) / n if n else None,
    }


# ---------------------------------------------------------------- loss and speed


def validation(predictor, examples: list[Example]) -> dict | None:
    """Loss per answer token and perplexity, encoded exactly as the run was trained."""
    cfg = predictor.cfg
    with status(f"Loss on {len(examples)} examples"):
        kept = [e for e in schedule.encode_all(cfg, predictor.tokenizer, examples) if e.n_targets > 0]
        loss = schedule.validation_loss(predictor.backend, kept, schedule.eval_batch_size(cfg))
    if loss is None:
        return None
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 700)), 4), "examples": len(kept),
            "target_tokens": sum(e.n_targets for e in kept)}


def speed(predictor, questions: list[str], max_tokens: int) -> dict:
    """Latency and tokens/s of single questions (one generate call each, like `afinar ask`)."""
    latencies, rates, tokens = [], [], 0
    with status(f"Latency: {len(questions)} questions asked one at a time") as stage:
        for q in questions:
            a = predictor.ask(q, max_tokens=max_tokens)
            latencies.append(a["latency_ms"])
            tokens += a["completion_tokens"]
            if a["completion_tokens"]:
                rates.append(a["completion_tokens"] / (a["latency_ms"] / 1000))
            stage.update(len(latencies), len(questions))
    total_s = sum(latencies) / 1000
    return {
        "questions": len(questions),
        "latency_ms_p50": _round(percentile(latencies, 50), 1),
        "latency_ms_p95": _round(percentile(latencies, 95), 1),
        "tokens_per_s": round(tokens / total_s, 1) if total_s > 0 else None,
        "tokens_per_s_p50": _round(percentile(rates, 50), 1),
    }


# ---------------------------------------------------------------- the whole evaluation


def read_questions(path: str | Path) -> list[Example]:
    """A data file in any training shape (.jsonl), or a plain list of questions (.txt, one a line)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise AfinarError(f"Prompts file not found: {path}.")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise AfinarError(f"{path} holds no question: write one question per line.")
        return [Example([{"role": "user", "content": q}], None, source=f"{path}:{i}") for i, q in enumerate(lines, 1)]
    return data.read_jsonl(path)


def run_data_file(run: str | Path, cfg, metadata: dict, split: str) -> Path | None:
    """The run's `data.<split>` file: where metadata.json recorded it (absolute), else the setting itself."""
    recorded = ((metadata.get("data") or {}).get(split) or {}).get("path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    value = getattr(cfg.data, split)
    if not value:
        return None
    path = data.resolve_path(value)
    if not path.is_file():
        raise AfinarError(f"The {split} file of {run} is not found: {value} (relative paths are from the current "
                          "folder). Pass --data FILE, or run from the folder the run was trained in.")
    return path


def score_file(predictor, path: Path, batch_size: int, max_tokens: int) -> tuple[dict, float | None]:
    """(loss, answer quality and every answer of one data file; batched generation tokens/s)."""
    examples = read_questions(path)
    asked = [ex for ex in examples if ex.question]
    scored = [ex for ex in examples if ex.messages is None or reference(ex) is not None]  # text, or with an answer
    loss = validation(predictor, scored) if scored else None
    started = time.perf_counter()
    answers = answer_all(predictor, [ex.question for ex in asked], batch_size, max_tokens, label=f"{path.name}: ")
    seconds = time.perf_counter() - started
    rate = round(sum(a["completion_tokens"] for a in answers) / seconds, 1) if seconds > 0 else None
    return {
        "data": str(path),
        "examples": len(examples),
        "validation": loss,
        "quality": answer_quality(asked, answers, max_tokens),
        "answers": [{"question": ex.question, "reference": reference(ex),
                     "keywords": ex.keywords, "answer": a["answer"], "completion_tokens": a["completion_tokens"],
                     "recalled": recalls(a["answer"], ex.keywords) if ex.keywords else None,
                     "chrf": round(chrf(a["answer"], reference(ex)), 2) if reference(ex) else None}
                    for ex, a in zip(asked, answers)],
    }, rate


def evaluate_run(run: str | Path, data_file: str | Path | None = None, max_tokens: int = 128,
                 batch_size: int = 16, latency_samples: int = 10, verify: bool = True) -> dict:
    """Every measure of one run on `data_file` (default: the run's validation file), as a dict.

    Without `data_file`, the run's held-out test file (if it has one) is scored too, under "test".
    Memory is the backend's own measure (device memory on a GPU, process RSS on CPU): before
    loading, once the model is loaded for answering, and the peak of the whole evaluation.
    Run one evaluation per process for a meaningful peak (`afinar compare` does). Each slow
    stage shows on stderr (`afinar.status`).
    """
    from afinar.backends import answering_backend
    from afinar.inference import Predictor
    from afinar.runs import load_run

    cfg, metadata = load_run(run, verify=verify)
    if data_file is not None:
        main, test = Path(data_file), None
        if not main.is_file() and main.suffix != ".txt":
            raise AfinarError(f"Evaluation data not found: {data_file}. Pass --data FILE (JSONL, or .txt questions).")
    else:
        main, test = run_data_file(run, cfg, metadata, "val"), run_data_file(run, cfg, metadata, "test")
        if main is None:
            raise AfinarError(f"{run} was trained without a validation file: pass --data FILE (JSONL with questions "
                              "and answers).")
    for path in (main, test):  # a data mistake is said before the model loads, not after
        if path is not None:
            read_questions(path)
    before = answering_backend(cfg).memory()["memory_mb"]
    with status(f"Loading {cfg.model.base} with the adapter of {run}"):
        predictor = Predictor(run, verify=verify)
    loaded = predictor.backend.memory()["memory_mb"]
    primary, batched_rate = score_file(predictor, main, batch_size, max_tokens)
    held_out = score_file(predictor, test, batch_size, max_tokens)[0] if test is not None else None
    questions = [a["question"] for a in primary["answers"]]
    timing = {**speed(predictor, questions[:latency_samples], max_tokens), "batched_tokens_per_s": batched_rate,
              "batch_size": batch_size}
    memory = predictor.backend.memory()
    return {
        "run": str(run),
        **{k: primary[k] for k in ("data", "examples")},
        "base_model": cfg.model.base,
        "method": cfg.method,
        "quantization": cfg.model.quantization,
        "max_tokens": max_tokens,
        "validation": primary["validation"],
        "quality": primary["quality"],
        "test": held_out,
        "speed": timing,
        "memory": {"before_load_mb": round(before, 1), "loaded_mb": round(loaded, 1),
                   "model_mb": round(loaded - before, 1), "peak_mb": round(memory["peak_memory_mb"], 1)},
        "device": predictor.backend.describe(),
        "training": {k: metadata.get(k) for k in ("steps", "train_time_s", "tokens_per_s", "peak_memory_mb", "best_val_loss")},
        "adapter_sha256": (metadata.get("adapter") or {}).get("sha256"),  # what was measured (see write_results)
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "answers": primary["answers"],
    }


def check_output(path: str | Path) -> None:
    """Before the evaluation: an --output that could not be written fails now, not after minutes of answering."""
    oserrors.check_writable(path, file_name="eval.json")


def write_results(path: str | Path, result: dict) -> None:
    """Write the results to `path` (atomic). If the machine refuses (disk full, read-only), the error names
    `path` and where a copy of the results was kept: the evaluation they cost is not lost with the write.

    Results bound for the run folder itself are refused if the run was replaced while it was evaluated
    (`train --overwrite` finishing meanwhile): they measure an adapter that folder no longer holds."""
    run = Path(result.get("run", ""))
    if result.get("adapter_sha256") and Path(path).resolve().parent == run.resolve():
        try:
            now = (json.loads((run / "metadata.json").read_text(encoding="utf-8")).get("adapter") or {}).get("sha256")
        except (OSError, ValueError):
            now = None
        if now != result["adapter_sha256"]:
            raise AfinarError(f"{run} was replaced while it was evaluated (its adapter is now {str(now)[:12]}, the "
                              f"evaluated one {result['adapter_sha256'][:12]}): these results are not written into "
                              f"it. {_keep_elsewhere(result)} Evaluate the new run again: afinar eval {run}")
    try:
        with oserrors.writing(path):
            atomic.write_json(path, result)
    except oserrors.EnvironmentFailure as e:
        raise oserrors.EnvironmentFailure(f"{e} {_keep_elsewhere(result)}", e.reason, e.path, e.exit_code) from e.__cause__


def _keep_elsewhere(result: dict) -> str:
    kept = None
    try:
        fd, kept = tempfile.mkstemp(prefix="afinar-eval-", suffix=".json")
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False, default=str)
        return f"A copy of the results is kept in {kept}."
    except OSError as e:
        if kept is not None:
            Path(kept).unlink(missing_ok=True)
        return (f"The results could not be kept elsewhere either ({tempfile.gettempdir()}: {e.strerror or e}): "
                "run `afinar eval` again once fixed.")


def reference(ex: Example) -> str | None:
    """The reference answer of a question, or None (a bare question from a .txt prompts file)."""
    if not ex.messages or not any(m["role"] == "assistant" for m in ex.messages):
        return None
    return ex.answer


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
