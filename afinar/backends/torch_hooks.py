"""Per-row streaming and early stop for transformers' `generate` (the serving hooks of `Backend.generate`)."""

from __future__ import annotations

import torch
from transformers.generation import BaseStreamer, StoppingCriteria


class RowHooks(BaseStreamer, StoppingCriteria):
    """Per-row `on_token` / `should_stop` hooks of `generate`, as a transformers streamer and stopping criterion.

    transformers hands the streamer the prompt first, then each step's new token of every row
    (finished rows get padding); the stopping criterion returns one bool per row. The streamer
    runs after the criterion of the same step (two steps after on MPS), so a stopped row keeps
    exactly the tokens `on_token` had delivered when `should_stop` said yes, and later ones are dropped.
    """

    def __init__(self, n: int, eos: int | list[int], on_token, should_stop):
        self.stops = {eos} if isinstance(eos, int) else set(eos)  # h5: any of the model's end tokens
        self.on_token, self.should_stop = on_token, should_stop
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.ended = [False] * n  # EOS seen
        self.keep = [None] * n  # tokens kept by a row stopped through should_stop
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row] or (self.keep[row] is not None and len(self.tokens[row]) >= self.keep[row]):
                continue
            if token in self.stops:
                self.ended[row] = True
                continue
            self.tokens[row].append(token)
            if self.on_token is not None:
                self.on_token(row, token)

    def end(self) -> None:
        pass

    def __call__(self, input_ids, scores, **kwargs):
        if self.should_stop is not None:
            for row in range(len(self.tokens)):
                if self.keep[row] is None and not self.ended[row] and self.should_stop(row):
                    self.keep[row] = len(self.tokens[row])
        return torch.tensor([k is not None for k in self.keep], dtype=torch.bool, device=input_ids.device)
