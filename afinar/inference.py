"""Answer questions with a trained run: the one code path behind `ask`, `serve`, the demo and evaluation."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from afinar import data, models
from afinar.backends import answering_backend
from afinar.config import ServeConfig
from afinar.runs import load_run


class Predictor:
    """Loads a run's base model and adapter once; `ask()` returns the JSON-ready answer dict.

    `serve`: serving settings other than the run's own (`afinar serve --set serve.*`); `verify=False`
    (--no-verify) accepts a run whose files changed after training (verify.py).
    """

    def __init__(self, run: str | Path, serve: ServeConfig | None = None, verify: bool = True):
        self.run = Path(run)
        self.cfg, self.metadata = load_run(self.run, verify=verify)
        if serve is not None:
            self.cfg = self.cfg.model_copy(update={"serve": serve})
        self.backend = answering_backend(self.cfg)
        self.resolved = models.resolve(self.cfg.model.base)
        self.tokenizer = self.backend.load(self.resolved, self.run)

    @functools.cached_property
    def context_length(self) -> int | None:
        """Most tokens (prompt + answer) the base model takes, from its config; None if it does not say."""
        from transformers import AutoConfig

        try:
            return getattr(AutoConfig.from_pretrained(self.resolved.path), "max_position_embeddings", None)
        except (OSError, ValueError):
            return None

    @property
    def name(self) -> str:
        """The run folder's name: the model id `afinar serve` reports."""
        return self.run.resolve().name

    def prompt(self, question: str | list[dict]) -> list[int]:
        """Token ids of a question (or chat messages) formatted as in training, with the run's system prompt."""
        return data.prompt_ids(self.tokenizer, question, self.cfg.data.system_prompt)

    def answer(self, prompt: list[int], out: list[int], seconds: float) -> dict:
        """The JSON object `afinar ask` prints for one generated answer."""
        return {
            "answer": data.clean_answer(self.tokenizer.decode(out, skip_special_tokens=True)),  # h5: no empty think block
            "model": self.cfg.model.base,
            "adapter": str(self.run),
            "prompt_tokens": len(prompt),
            "completion_tokens": len(out),
            "latency_ms": round(seconds * 1000, 1),
            "tokens_per_s": round(len(out) / seconds, 1) if seconds > 0 else None,
        }

    def ask_many(self, questions: list[str], max_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> list[dict]:
        """Answer a batch of questions in one generate call; latency is the batch's wall time."""
        prompts = [self.prompt(q) for q in questions]
        t0 = time.perf_counter()
        outputs = self.backend.generate(prompts, max_tokens, temperature, top_p, seed)
        seconds = time.perf_counter() - t0
        return [self.answer(prompt, out, seconds) for prompt, out in zip(prompts, outputs)]

    def ask(self, question: str, **kwargs) -> dict:
        return self.ask_many([question], **kwargs)[0]
