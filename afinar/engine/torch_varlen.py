"""Attention for a flat list of tokens from many rows, each row over its own keys in a shared KV cache.

The cache of one layer is [rows x stride, kv heads, head dim]: row r's position p at r x stride + p.
A step's queries are packed back to back ([tokens, heads, head dim]); sequence i owns queries
cu_q[i]:cu_q[i+1], reads keys from cu_k[i] on, `used_k[i]` of them, and its last query sees them
all (bottom-right causal: a prefill chunk at positions start..end-1 sees keys < its own position + 1).
So decode rows of very different lengths each read only their own keys, and the rows of a prefill
chunk and the decoding rows share one call.

`flash` is PyTorch's own FlashAttention-2 varlen kernel (`seqused_k` gives per-row key lengths on a
padded cache; fixed shapes, so it runs inside a CUDA graph). `reference` is the same arithmetic with
hand in fp32, one sequence at a time, reading the metadata on the host: CPU and the tests.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("afinar.engine")


def flash(q, k_cache, v_cache, cu_q, cu_k, used_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """q [tokens, heads, d] (bf16/fp16, CUDA); cu_q [n + 1], cu_k [n + 1], used_k [n] int32. Returns [tokens, heads, d]."""
    out = torch.ops.aten._flash_attention_forward(
        q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale, seqused_k=used_k)[0]
    return out


def flash_lse(q, k_cache, v_cache, cu_q, cu_k, used_k, max_q: int, max_k: int, scale: float):
    """`flash`, and the log-sum-exp of each query's scores: [heads, tokens] float32."""
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale, seqused_k=used_k)[:2]
    return out, lse


def reference_lse(q, k_cache, v_cache, cu_q, cu_k, used_k, max_q: int, max_k: int, scale: float):
    """`flash_lse` by hand in fp32, one sequence at a time (CPU, tests); a query with no keys gets 0 and -inf."""
    heads, kv = q.shape[1], k_cache.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((heads, q.shape[0]), float("-inf"), device=q.device, dtype=torch.float32)
    starts, ks, used = cu_q.tolist(), cu_k.tolist(), used_k.tolist()
    for i, n_k in enumerate(used):
        a, b = starts[i], starts[i + 1]
        if b <= a or n_k <= 0:
            continue
        n_q = b - a
        qi = q[a:b].float().transpose(0, 1)  # [heads, n_q, d]
        keys = k_cache[ks[i]:ks[i] + n_k].float().transpose(0, 1).repeat_interleave(heads // kv, 0)
        values = v_cache[ks[i]:ks[i] + n_k].float().transpose(0, 1).repeat_interleave(heads // kv, 0)
        scores = qi @ keys.transpose(1, 2) * scale  # [heads, n_q, n_k]
        allowed = torch.arange(n_k, device=q.device)[None, :] <= torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse[:, a:b] = torch.logsumexp(scores, -1)
        out[a:b] = (scores.softmax(-1) @ values).transpose(0, 1).to(q.dtype)
    return out, lse


def reference(q, k_cache, v_cache, cu_q, cu_k, used_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """`flash`'s result computed by hand in fp32, one sequence at a time (any device; syncs to read the metadata)."""
    return reference_lse(q, k_cache, v_cache, cu_q, cu_k, used_k, max_q, max_k, scale)[0]


def split_decode(attend_lse, q, k_cache, v_cache, cu_k, used_k, max_k: int, scale: float, piece: int) -> torch.Tensor:
    """Decode attention (one query per row) with every row's keys cut into pieces of `piece` keys.

    One thread block per (row, KV head) walks a row's keys alone, so one long row holds up a
    step that is otherwise done; here each piece is a sequence of its own (the row's query
    repeated), the pieces run in parallel, and their outputs are merged by their log-sum-exps:
    FlashDecoding's split-KV, from the same varlen kernel. Fixed shapes (max_k / piece pieces a
    row, empty ones cost nothing but a block that exits): capturable. `attend_lse`: `flash_lse`
    or `reference_lse`. q [rows, heads, d]; cu_k [>= rows], used_k [rows].
    """
    n, heads, d = q.shape
    pieces = -(-max_k // piece)
    j = torch.arange(pieces, device=q.device)
    starts = (cu_k[:n, None].long() + j * piece).reshape(-1)
    used = (used_k[:, None].long() - j * piece).clamp(0, piece).reshape(-1)
    cu_qs = torch.arange(n * pieces + 1, device=q.device, dtype=torch.int32)
    cu_ks = torch.cat([starts, starts[-1:]]).to(torch.int32)
    out, lse = attend_lse(q.repeat_interleave(pieces, 0), k_cache, v_cache, cu_qs, cu_ks, used.to(torch.int32), 1,
                          piece, scale)
    lse = lse.reshape(heads, n, pieces).masked_fill((used == 0).view(1, n, pieces), float("-inf"))
    weights = torch.nan_to_num(lse.softmax(-1), nan=0.0)  # a row with no keys at all: output 0
    return torch.einsum("hnj,njhd->nhd", weights, out.view(n, pieces, heads, d).float()).to(q.dtype)


def flash_works(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether `flash` runs here and agrees with `reference` on a small mixed case (a kernel this torch,
    GPU or shape does not have is a fallback to the earlier runner, not an error)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        stride = 300
        k = torch.randn((3 * stride, kv_heads, head_dim), device=device, dtype=dtype, generator=g)
        v = torch.randn((3 * stride, kv_heads, head_dim), device=device, dtype=dtype, generator=g)
        q = torch.randn((1 + 1 + 5, heads, head_dim), device=device, dtype=dtype, generator=g)
        i32 = dict(device=device, dtype=torch.int32)
        cu_q, cu_k = torch.tensor([0, 1, 2, 7], **i32), torch.tensor([0, stride, 2 * stride, 0], **i32)
        used = torch.tensor([17, 290, 9], **i32)
        got = flash(q, k, v, cu_q, cu_k, used, 5, stride, head_dim**-0.5)
        want = reference(q.float(), k.float(), v.float(), cu_q, cu_k, used, 5, stride, head_dim**-0.5)
        err = (got.float() - want).abs().max().item()
        if err > 2e-2:
            log.warning("flash varlen attention differs from the reference by %.3g; using the slot runner", err)
            return False
        return True
    except Exception as e:  # noqa: BLE001 - no such kernel on this build or GPU
        log.warning("flash varlen attention unavailable (%s: %s); using the slot runner", type(e).__name__, str(e)[:200])
        return False


def split_works(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                piece: int) -> bool:
    """Whether `split_decode` over `flash_lse` agrees with `reference` here (the layout of the kernel's
    log-sum-exp is not a documented API: checked, not assumed)."""
    try:
        g = torch.Generator(device=device).manual_seed(1)
        stride = 4 * piece + 1
        k = torch.randn((3 * stride, kv_heads, head_dim), device=device, dtype=dtype, generator=g)
        v = torch.randn((3 * stride, kv_heads, head_dim), device=device, dtype=dtype, generator=g)
        q = torch.randn((3, heads, head_dim), device=device, dtype=dtype, generator=g)
        i32 = dict(device=device, dtype=torch.int32)
        cu_k, used = torch.arange(4, **i32) * stride, torch.tensor([3 * piece + 7, 5, 0], **i32)
        got = split_decode(flash_lse, q, k, v, cu_k, used, stride, head_dim**-0.5, piece)
        want = reference(q.float(), k.float(), v.float(), torch.arange(4, **i32), cu_k, used, 1, stride, head_dim**-0.5)
        err = (got.float() - want).abs().max().item()
        if err > 2e-2:
            log.warning("split-key decode attention differs from the reference by %.3g; not splitting", err)
            return False
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("split-key decode attention unavailable (%s: %s); not splitting", type(e).__name__, str(e)[:200])
        return False
