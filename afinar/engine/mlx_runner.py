"""The MLX runner: mlx-lm's own continuous batching (`BatchGenerator`) behind the engine's `Runner`.

mlx-lm 0.32 already inserts and removes rows between decode steps, prefills new prompts in
steps of `prefill_step_size` tokens between them, and takes one sampler per request: this
runner maps slots to its uids and gives every sampled request a sampler with its own stream
(a key from the request's seed and the position of the token drawn, never MLX's global key).
Greedy requests share mlx-lm's greedy sampler, so an all-greedy batch samples in one call.
"""

from __future__ import annotations

from typing import Any, Callable

from afinar.engine.request import SamplingParams

_M64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def row_sampler(params: SamplingParams, first_position: int):
    """A sampler for one request: top-p, then a categorical draw keyed by (seed, token position)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    if params.greedy:
        return None
    position = [first_position]
    seed_key = _splitmix64(params.seed)

    def sample(logprobs):
        key = mx.random.key(_splitmix64(seed_key ^ position[0]))
        position[0] += 1
        if params.top_p < 1:
            logprobs = apply_top_p(logprobs, params.top_p)
        return mx.random.categorical(logprobs * (1 / params.temperature), key=key)

    return sample


class MLXRunner:
    """`plan.Runner` over `mlx_lm.generate.BatchGenerator`; see the module docstring."""

    def __init__(self, model, max_rows: int, max_len: int, prefill_chunk: int, context: int | None = None):
        from mlx_lm.generate import BatchGenerator

        self.model = model
        self.max_rows = max_rows
        self.max_len = min(max_len, context) if context else max_len
        self.gen = BatchGenerator(model, max_tokens=self.max_len, completion_batch_size=max_rows,
                                  prefill_batch_size=max_rows, prefill_step_size=prefill_chunk)
        self.uids: dict[int, int] = {}  # slot -> uid
        self.handles: dict[int, Any] = {}  # uid -> handle

    def add(self, handle, slot: int, prompt: list[int], params: SamplingParams) -> None:
        uid = self.gen.insert([list(prompt)], [params.max_tokens], samplers=[row_sampler(params, len(prompt))])[0]
        self.uids[slot], self.handles[uid] = uid, handle

    def remove(self, slot: int) -> None:
        uid = self.uids.pop(slot, None)
        if uid is not None:
            self.handles.pop(uid, None)
            self.gen.remove([uid])  # a row mlx-lm already ended (its max_tokens) is simply not found

    def busy(self) -> bool:
        return bool(self.uids)

    def reset(self) -> None:
        for slot in list(self.uids):
            self.remove(slot)

    def warm_up(self, say: Callable[[str], None]) -> None:
        pass

    def step(self) -> list[tuple[Any, int]]:
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            responses = self.gen.next_generated()
        finally:
            if was_training:
                self.model.train()
        return [(self.handles[r.uid], r.token) for r in responses if r.uid in self.handles]

    def close(self) -> None:
        self.gen.close()
