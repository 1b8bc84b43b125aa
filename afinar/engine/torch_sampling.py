"""Per-row token choice on the device: greedy, or a draw from a stream owned by the row.

A sampled row's randomness is a counter-based hash of (its seed, the position of the token it
draws, the vocabulary index): no generator state is shared between rows or carried between
steps, so what one request draws depends on nothing but its own seed and its own progress.
The draw is the Gumbel-max trick (argmax of logits / T + Gumbel noise samples the softmax
exactly), after the top-p cut; greedy rows take the plain argmax. Everything is tensor ops
of fixed shape, so it runs inside a captured CUDA graph with no host work.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64, no overflow anywhere


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche, on int64 tensors holding values below 2**32."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def vocab_hashes(vocab: int, device) -> torch.Tensor:
    """mix32 of every vocabulary index: constant, computed once per runner."""
    return mix32(torch.arange(vocab, device=device, dtype=torch.int64))


def uniforms(seed: torch.Tensor, counter: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] float32 in (0, 1): a function of each row's (seed, counter) and the vocabulary index only.

    `seed`: int64 per row (any 64-bit pattern); `counter`: int64 per row (the drawn token's position).
    24-bit mantissas, so every value is exact in float32 and never 0 or 1.
    """
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = mix32(mix32(lo) ^ hi)
    key = mix32(key ^ mix32(counter & _MASK32))
    bits = mix32(key[:, None] ^ vocab_hash[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24


def choose(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
           counter: torch.Tensor, vocab_hash: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """The next token of every row: argmax where temperature is 0, else a top-p draw from the row's stream.

    `logits` [rows, vocab] float32; the others one value per row. `rows=None` (a CUDA graph):
    every row computes both, fixed shapes, no host work. Eager callers pass `rows`, the indices
    of the sampled rows (known on the host): only those pay for sampling.
    """
    greedy = logits.argmax(-1)
    if rows is None:
        drawn = _draw(logits, temperature, top_p, seed, counter, vocab_hash, eager=False)
        return torch.where(temperature > 0, drawn, greedy)
    if not rows:
        return greedy
    idx = torch.tensor(rows, device=logits.device)
    drawn = _draw(logits[idx], temperature[idx], top_p[idx], seed[idx], counter[idx], vocab_hash, eager=True)
    return greedy.index_copy(0, idx, drawn)


def _draw(logits, temperature, top_p, seed, counter, vocab_hash, eager: bool) -> torch.Tensor:
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / t[:, None]
    drop = _outside_nucleus(scaled.softmax(-1), top_p, eager)
    gumbel = -torch.log(-torch.log(uniforms(seed, counter, vocab_hash)))
    return (scaled.masked_fill(drop, float("-inf")) + gumbel).argmax(-1)


def _outside_nucleus(probs: torch.Tensor, top_p: torch.Tensor, eager: bool) -> torch.Tensor:
    """Tokens outside each row's nucleus: beyond the likeliest ones whose mass first reaches top_p.

    The most likely token always stays; top_p = 1 drops nothing. Eagerly, a row whose nucleus
    lies within its 256 likeliest tokens (nearly always) is cut from a top-k, not a full sort
    of the vocabulary (milliseconds per row on a CPU); each row's path depends on it alone.
    """
    cut = top_p[:, None] < 1
    if not eager:
        return _sorted_cut(probs, top_p) & cut
    vals, idx = probs.topk(min(256, probs.shape[-1]), dim=-1)
    before = vals.cumsum(-1) - vals
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, before < top_p[:, None])
    keep.scatter_(-1, idx[:, :1], True)  # a top_p below float32's range (1e-46) is 0 here: keep the likeliest
    drop = ~keep & cut
    wide = ((vals.sum(-1) < top_p) & cut[:, 0]).nonzero()[:, 0]
    if len(wide):
        drop[wide] = _sorted_cut(probs[wide], top_p[wide])
    return drop


def _sorted_cut(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    drop = before >= top_p[:, None]
    drop[:, 0] = False  # the likeliest stays, even for a top_p that float32 rounds to 0
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, drop)
