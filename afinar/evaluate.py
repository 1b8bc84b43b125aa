"""Answer-quality measures that need no model of their own.

Fact recall: an answer recalls the fact when it contains every keyword of the example,
compared lower-case, without accents and with whitespace collapsed ("São Luís" matches
"sao luis"). Examples without keywords are not counted.
"""

from __future__ import annotations

import unicodedata

from afinar.data import Example


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
    questions = [ex.question for ex in examples]
    answers: list[dict] = []
    for i in range(0, len(questions), batch_size):
        answers += predictor.ask_many(questions[i : i + batch_size], max_tokens=max_tokens)
    score = fact_recall(examples, [a["answer"] for a in answers])
    return score, answers
