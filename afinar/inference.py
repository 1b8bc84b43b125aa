"""Answer questions with a trained run: the one code path behind `ask`, the demo and evaluation."""

from __future__ import annotations

import time
from pathlib import Path

from afinar import data, models
from afinar.backends import get_backend
from afinar.runs import load_run


class Predictor:
    """Loads a run's base model and adapter once; `ask()` returns the JSON-ready answer dict."""

    def __init__(self, run: str | Path):
        self.run = Path(run)
        self.cfg, self.metadata = load_run(self.run)
        self.backend = get_backend(self.cfg)
        self.tokenizer = self.backend.load(models.resolve(self.cfg.model.base), adapter_dir=self.run, trainable=False)

    def ask_many(self, questions: list[str], max_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[dict]:
        """Answer a batch of questions in one generate call; latency is the batch's wall time."""
        prompts = [data.prompt_ids(self.tokenizer, q, self.cfg.data.system_prompt) for q in questions]
        t0 = time.perf_counter()
        outputs = self.backend.generate(prompts, max_tokens, temperature, top_p, seed)
        seconds = time.perf_counter() - t0
        results = []
        for prompt, out in zip(prompts, outputs):
            results.append({
                "answer": self.tokenizer.decode(out, skip_special_tokens=True).strip(),
                "model": self.cfg.model.base,
                "adapter": str(self.run),
                "prompt_tokens": len(prompt),
                "completion_tokens": len(out),
                "latency_ms": round(seconds * 1000, 1),
                "tokens_per_s": round(len(out) / seconds, 1) if seconds > 0 else None,
            })
        return results

    def ask(self, question: str, **kwargs) -> dict:
        return self.ask_many([question], **kwargs)[0]
