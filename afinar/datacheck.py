"""`afinar data check`: what the data looks like to the model before any training.

Errors (a record that cannot be read) are `AfinarError`s from `data.read_examples`. What training
survives is reported and turned into warnings: examples longer than train.max_seq_length
(cut), examples whose prompt alone fills it (skipped: no answer token left), duplicates,
special-token text inside the data, and questions in both train and val.
"""

from __future__ import annotations

import difflib
import re
import statistics
from collections import Counter
from pathlib import Path

from afinar import data
from afinar.config import Config
from afinar.datafiles import DATA_SUFFIXES, is_hf_dataset
from afinar.errors import AfinarError
from afinar.stats import percentile


def find_files(path: str | Path) -> dict[str, Path]:
    """Split name -> path: one data file or saved dataset, or a folder holding train and val data.

    A folder may hold train / val as .jsonl, .json or .parquet files or saved Hugging Face
    datasets; a saved DatasetDict gives its train split and its validation split, if any.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            val = next((path / n for n in ("validation", "val") if is_hf_dataset(path / n)), None)
            return {"train": path, **({"val": val} if val else {})}
        if is_hf_dataset(path):
            return {path.name: path}
        files = {}
        for name in ("train", "val"):
            found = [path / f"{name}{s}" for s in DATA_SUFFIXES if (path / f"{name}{s}").is_file()]
            found += [path / name] if is_hf_dataset(path / name) else []
            if len(found) > 1:
                raise AfinarError(f"{path} holds {' and '.join(p.name for p in found)}: keep one {name} file, "
                                  "or pass the file to use.")
            if found:
                files[name] = found[0]
        if not files:
            inside = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
            held = f" (it holds: {', '.join(inside[:6])}{', ...' if len(inside) > 6 else ''})" if inside else " (it is empty)"
            raise AfinarError(f"{path} holds no train.jsonl or val.jsonl, nor train / val as .json, .parquet or a saved "
                              f"Hugging Face dataset{held}. Pass a data file, or a folder holding them.")
        return files
    if not path.exists():
        near = []
        if path.parent.is_dir():
            near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.6)
        mean = f" Did you mean {path.parent / near[0]}?" if near else ""
        raise AfinarError(f"Data path not found: {path}.{mean} Pass a data file or a folder holding train.jsonl / val.jsonl.")
    if not path.is_file():
        raise AfinarError(f"{path} is not a regular file. Pass a data file or a folder holding train.jsonl / val.jsonl.")
    return {path.stem: path}


def _special_text(example: data.Example, specials: list[str]) -> str | None:
    """The first special-token string (e.g. '</s>') written inside the example's text, if any."""
    texts = [m["content"] for m in example.messages] if example.messages else [example.text or ""]
    return next((s for s in specials for t in texts if s in t), None)


def _position(source: str) -> str:
    """ "FILE:3" -> "line 3"; "FILE item 3" -> "item 3"; "FILE row 3" -> "row 3"."""
    m = re.search(r"(?::(\d+)| (item|row) (\d+))$", source)
    return (f"line {m[1]}" if m[1] else f"{m[2]} {m[3]}") if m else source


def check(read: dict[str, data.Dataset], cfg: Config, tokenizer) -> dict:
    """Counts, token lengths, truncation, duplicates and train/val overlap, as one report dict.

    `read` maps each split to its Dataset, as `find_files` + `data.read_examples` give them.
    """
    max_len = cfg.train.max_seq_length
    report: dict = {"max_seq_length": max_len, "files": {}}
    questions: dict[str, dict[str, str]] = {}  # split -> normalised question -> source
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and len(t) > 1}, key=len, reverse=True)
    for name, dataset in read.items():
        examples = dataset.examples
        encoded = [data.encode(e, tokenizer, 10**9, cfg.data.train_on_prompt, cfg.data.system_prompt) for e in examples]
        lengths = [len(e.input_ids) for e in encoded]
        # Training cuts at max_len and skips an example with no target token left (the first token is never one).
        no_answer = [ex.source for ex, e in zip(examples, encoded) if not any(e.loss_mask[1:max_len])]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        seen: dict[tuple[str, str], str] = {}
        pairs: Counter = Counter()
        first_duplicate = None
        for e in examples:
            pair = (data.normalise(e.question), data.normalise(e.answer))
            pairs[pair] += 1
            if pair in seen and first_duplicate is None:
                first_duplicate = f"{e.source} repeats {_position(seen[pair])}"
            seen.setdefault(pair, e.source)
        answers_by_q: dict[str, set[str]] = {}
        for e in examples:
            answers_by_q.setdefault(data.normalise(e.question), set()).add(data.normalise(e.answer))
        questions[name] = {}
        for e in examples:
            if data.normalise(e.question):
                questions[name].setdefault(data.normalise(e.question), e.source)
        special = [(e.source, s) for e in examples if (s := _special_text(e, specials))]
        report["files"][str(dataset.path)] = {
            "split": name,
            "format": dataset.format,
            "shape": data.SHAPE_NAMES[dataset.shape],
            "notices": dataset.notices,
            "examples": len(examples),
            "with_keywords": sum(bool(e.keywords) for e in examples),
            "tokens": {"min": min(lengths), "mean": round(statistics.mean(lengths), 1),
                       "p50": round(percentile(lengths, 50)), "p95": round(percentile(lengths, 95)),
                       "max": max(lengths), "total": sum(lengths)},
            "longest": examples[longest].source,
            "answer_tokens_mean": round(statistics.mean(e.n_targets for e in encoded), 1),
            "truncated": sum(n > max_len for n in lengths),
            "no_answer_within_max": len(no_answer),
            "first_no_answer": no_answer[0] if no_answer else None,
            "duplicates": sum(c - 1 for c in pairs.values()),
            "first_duplicate": first_duplicate,
            "conflicting_answers": sum(len(a) > 1 for q, a in answers_by_q.items() if q),
            "special_token_text": len(special),
            "first_special_token_text": f"{special[0][0]} ({special[0][1]})" if special else None,
        }
    if "train" in questions and "val" in questions:
        shared = [(q, questions["train"][q], src) for q, src in questions["val"].items() if q in questions["train"]]
        report["train_val_overlap"] = len(shared)
        if shared:
            q, train_src, val_src = shared[0]
            report["first_overlap"] = f"{train_src} and {val_src}"
    return report


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def warnings(report: dict) -> list[str]:
    out = []
    max_len = report["max_seq_length"]
    for file, r in report["files"].items():
        if r["truncated"]:
            out.append(f"{file}: {_n(r['truncated'], 'example')} {'is' if r['truncated'] == 1 else 'are'} longer than train.max_seq_length={max_len} "
                       f"(longest {r['tokens']['max']} tokens, at {r.get('longest', file)}) and will be cut. "
                       "Raise train.max_seq_length or shorten them.")
        if r.get("no_answer_within_max"):
            everything = r["no_answer_within_max"] == r["examples"]
            out.append(f"{file}: {_n(r['no_answer_within_max'], 'example')} (first: {r['first_no_answer']}) {'has' if r['no_answer_within_max'] == 1 else 'have'} a prompt that fills "
                       f"train.max_seq_length={max_len}, leaving no answer token: training skips them"
                       + (" (all of them: training would stop with an error)" if everything else "")
                       + ". Raise train.max_seq_length or shorten the prompts.")
        if r["duplicates"]:
            first = f" (first: {r['first_duplicate']})" if r.get("first_duplicate") else ""
            out.append(f"{file}: {_n(r['duplicates'], 'duplicate question+answer pair')}{first}: they weigh double in training. "
                       "Remove the repeats if they are not meant.")
        if r.get("special_token_text"):
            out.append(f"{file}: {_n(r['special_token_text'], 'example')} {'contains' if r['special_token_text'] == 1 else 'contain'} a special token's text (first: "
                       f"{r['first_special_token_text']}): the tokenizer reads it as a control token, which can end "
                       "an answer early. Remove or rephrase it.")
    if report.get("train_val_overlap"):
        first = f" (first: {report['first_overlap']})" if report.get("first_overlap") else ""
        out.append(f"{_n(report['train_val_overlap'], 'question')} {'appears' if report['train_val_overlap'] == 1 else 'appear'} in both train and val{first}: validation loss will look "
                   "better than it is. Use `afinar data split` to split by question.")
    return out
