"""The torch runner for every other model: the model's own forward, one row at a time, a cache per row.

For what `TorchRunner` does not take: other architectures, Apple's MPS, 4-bit weights with the
adapter kept apart (a GPU without room for dense weights), or a model still being trained. Each
row has its own transformers `DynamicCache`; each step prefills the chunks the `PrefillQueue`
hands out and decodes one token per running row, each through `model(...)` with batch 1. Slower
than one batched forward, but exact (no padding, no shared shapes) and isolated: a failure in a
row's forward is that row's alone.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from afinar.engine.plan import PrefillQueue, RowError
from afinar.engine.request import SamplingParams
from afinar.engine.torch_sampling import choose, vocab_hashes


class _Row:
    def __init__(self, handle, params: SamplingParams, cache):
        self.handle, self.params, self.cache = handle, params, cache
        self.next: int | None = None  # the token to feed at `pos` once the prompt is in
        self.pos = 0


class GenericRunner:
    """`plan.Runner` through `model(input_ids, past_key_values=...)`; see the module docstring."""

    def __init__(self, model, max_rows: int, max_len: int, prefill_chunk: int):
        self.model = model
        self.device = next(model.parameters()).device
        context = getattr(model.config, "max_position_embeddings", None)
        self.max_len = min(max_len, context) if context else max_len
        self.max_rows = max_rows
        self.rows: dict[int, _Row] = {}
        self.prefill = PrefillQueue(prefill_chunk)
        self._vocab_hash = None
        # transformers 5 renames `past_key_values` to `cache` (the old name warns until 5.40)
        import inspect

        params = inspect.signature(getattr(model, "get_base_model", lambda: model)().forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def add(self, handle, slot: int, prompt: list[int], params: SamplingParams) -> None:
        from transformers import DynamicCache

        self.rows[slot] = _Row(handle, params, DynamicCache(config=self.model.config))
        self.prefill.add(slot, prompt)

    def remove(self, slot: int) -> None:
        self.rows.pop(slot, None)
        self.prefill.remove(slot)

    def busy(self) -> bool:
        return bool(self.rows)

    def reset(self) -> None:
        for slot in list(self.rows):
            self.remove(slot)

    def warm_up(self, say: Callable[[str], None]) -> None:
        pass  # nothing is captured; the first forward pays its own start-up

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, int]]:
        was_training = self.model.training
        self.model.eval()
        out, failed, cause = [], [], None
        try:
            for chunk in self.prefill.next():
                row = self.rows[chunk.slot]
                try:
                    logits = self._forward(row, chunk.tokens)
                except Exception as e:  # noqa: BLE001 - this row's forward: it fails, the others go on
                    failed.append(row.handle)
                    cause = e
                    continue
                if chunk.last:
                    row.pos = chunk.start + len(chunk.tokens)
                    row.next = self._choose(row, logits, row.pos)
                    out.append((row.handle, row.next))
            for row in self.rows.values():
                if row.next is not None and row.pos < self.max_len and row.handle not in failed:
                    try:
                        logits = self._forward(row, [row.next])
                    except Exception as e:  # noqa: BLE001
                        failed.append(row.handle)
                        cause = e
                        continue
                    row.pos += 1
                    row.next = self._choose(row, logits, row.pos)
                    out.append((row.handle, row.next))
        finally:
            self.model.train(was_training)
        if failed:
            raise RowError(failed, cause, out)
        return out

    def _forward(self, row: _Row, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.device)
        return self.model(input_ids=ids, use_cache=True, **{self._cache_arg: row.cache}).logits[:, -1].float()

    def _choose(self, row: _Row, logits: torch.Tensor, position: int) -> int:
        if self._vocab_hash is None:
            self._vocab_hash = vocab_hashes(logits.shape[-1], logits.device)
        p, dev = row.params, logits.device
        token = choose(logits, torch.tensor([p.temperature], device=dev), torch.tensor([p.top_p], device=dev),
                       torch.tensor([p.seed - 2**64 if p.seed >= 2**63 else p.seed], device=dev),
                       torch.tensor([position], device=dev), self._vocab_hash, rows=[] if p.greedy else [0])
        return int(token)
