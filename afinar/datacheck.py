"""`afinar data check`: what the data looks like to the model before any training."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from afinar import data
from afinar.config import Config
from afinar.errors import AfinarError


def find_files(path: str | Path) -> dict[str, Path]:
    """A folder holding train.jsonl (and val.jsonl), or one JSONL file."""
    path = Path(path)
    if path.is_dir():
        files = {name: path / f"{name}.jsonl" for name in ("train", "val") if (path / f"{name}.jsonl").is_file()}
        if not files:
            raise AfinarError(f"{path} holds no train.jsonl or val.jsonl. Pass a JSONL file or a folder with those files.")
        return files
    if not path.is_file():
        raise AfinarError(f"Data path not found: {path}. Pass a JSONL file or a folder holding train.jsonl / val.jsonl.")
    return {path.stem: path}


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check(path: str | Path, cfg: Config, tokenizer) -> dict:
    """Counts, token lengths, truncation, duplicates and train/val overlap, as one report dict."""
    files = find_files(path)
    report: dict = {"max_seq_length": cfg.train.max_seq_length, "files": {}}
    questions: dict[str, set[str]] = {}
    for name, file in files.items():
        examples = data.read_jsonl(file)
        encoded = [data.encode(e, tokenizer, 10**9, cfg.data.train_on_prompt, cfg.data.system_prompt) for e in examples]
        lengths = [len(e.input_ids) for e in encoded]
        pairs = Counter((data.normalise(e.question), data.normalise(e.answer)) for e in examples)
        answers_by_q: dict[str, set[str]] = {}
        for e in examples:
            answers_by_q.setdefault(data.normalise(e.question), set()).add(data.normalise(e.answer))
        questions[name] = {q for q in answers_by_q if q}
        report["files"][str(file)] = {
            "split": name,
            "examples": len(examples),
            "shape": "text" if examples[0].messages is None else "chat",
            "with_keywords": sum(bool(e.keywords) for e in examples),
            "tokens": {"min": min(lengths), "mean": round(statistics.mean(lengths), 1),
                       "p50": _percentile(lengths, 0.5), "p95": _percentile(lengths, 0.95),
                       "max": max(lengths), "total": sum(lengths)},
            "answer_tokens_mean": round(statistics.mean(e.n_targets for e in encoded), 1),
            "truncated": sum(n > cfg.train.max_seq_length for n in lengths),
            "duplicates": sum(c - 1 for c in pairs.values()),
            "conflicting_answers": sum(len(a) > 1 for q, a in answers_by_q.items() if q),
        }
    if "train" in questions and "val" in questions:
        report["train_val_overlap"] = len(questions["train"] & questions["val"])
    return report


def warnings(report: dict) -> list[str]:
    out = []
    for file, r in report["files"].items():
        if r["truncated"]:
            out.append(f"{file}: {r['truncated']} examples are longer than train.max_seq_length={report['max_seq_length']} "
                       f"(longest {r['tokens']['max']} tokens) and will be cut. Raise train.max_seq_length or shorten them.")
        if r["duplicates"]:
            out.append(f"{file}: {r['duplicates']} duplicate question+answer pairs (they weigh double in training).")
    if report.get("train_val_overlap"):
        out.append(f"{report['train_val_overlap']} questions appear in both train and val: validation loss will look "
                   "better than it is. Use `afinar data split` to split by question.")
    return out
