"""The next serving lever, measured before it is built: decode attention that reads only each row's own keys.

`afinar serve`'s decode step attends every row over the key bucket of its *longest* row
(afinar/engine/torch_runner.py): with one 1,500-token request among 32 short ones, all 32 rows
read 2,048 keys per layer. This script times, for one decode step's 32 layers of attention on
the 7B shape (32 query heads, 8 KV heads, head dim 128, bf16), each in its own CUDA graph:

- `sdpa_longest_bucket`: what the engine does now (SDPA, boolean mask, every row over the
  longest row's bucket);
- `sdpa_short_bucket`: the same with no long row in the batch (every row over 256 keys): the
  floor the mix is measured against;
- `flex_per_row`: FlexAttention (`torch.compile`d) with a block mask built from each row's
  length (`BlockMask.from_kv_blocks`), so a row reads only the 128-key blocks it has.

- `flash_varlen_per_row` (CUDA): what `serve.step: flat` runs (afinar/engine/torch_varlen.py):
  PyTorch's FlashAttention-2 varlen kernel over the cache laid out [rows x keys, kv heads, d],
  each row its own length (`seqused_k`): no padding read, but one thread block per (row, KV
  head) walks all of a long row's keys;
- `flash_varlen_split` (CUDA): the same kernel with every row cut into `--split`-key pieces, each
  piece a sequence of its own (the row's query repeated), merged by their log-sum-exps: split-KV
  decoding (FlashDecoding) from the stock kernel, the next lever.
It checks that every variant agrees with SDPA on the same inputs (max |difference|) before timing.

    python benchmarks/decode_attention.py --out benchmarks/results/DATE-h200-decode-attention.json
    python benchmarks/decode_attention.py --rows 4 --layers 2    # CPU smoke run (eager, no graphs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 128


def sdpa(q, k, v, mask, scale):
    """The engine's decode attention (fast_decode.DecoderStack.attend, one query per row): the query heads
    that share a KV head become that head's query rows."""
    b, heads, _, d = q.shape
    kv = k.shape[1]
    o = F.scaled_dot_product_attention(q.reshape(b, kv, heads // kv, d), k, v, attn_mask=mask, scale=scale)
    return o.reshape(b, 1, heads * d)


def make_flex(lengths: torch.Tensor, n_keys: int, compiled: bool):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    b = lengths.shape[0]
    blocks = n_keys // BLOCK
    kv_indices = torch.arange(blocks, device=lengths.device, dtype=torch.int32).view(1, 1, 1, blocks).expand(
        b, 1, 1, blocks).contiguous()

    def mask_mod(batch, head, q_idx, kv_idx):
        return kv_idx < lengths[batch]

    def attend(q, k, v, scale):
        kv_num = ((lengths + BLOCK - 1) // BLOCK).to(torch.int32).view(b, 1, 1)
        kwargs = dict(BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(1, n_keys))
        try:
            mask = BlockMask.from_kv_blocks(kv_num, kv_indices, compute_q_blocks=False, **kwargs)
        except TypeError:  # an older torch without compute_q_blocks
            mask = BlockMask.from_kv_blocks(kv_num, kv_indices, **kwargs)
        o = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        return o.reshape(q.shape[0], 1, -1)

    return attend


def timed(step, calls: int = 20) -> float:
    """ms per call of `step` (a CUDA graph replay on CUDA): median of 3 windows."""
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return round(1000 * statistics.median(times), 4)


def graphed(fn):
    if not torch.cuda.is_available():
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main(argv=None) -> None:
    from benchmarks import random_7b as R

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--long-rows", type=int, default=2, help="Rows holding a long request.")
    p.add_argument("--long-keys", type=int, default=1700)
    p.add_argument("--short-keys", type=int, default=200)
    p.add_argument("--bucket", type=int, default=2048, help="The longest row's key bucket.")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--split", type=int, default=256, help="Keys per piece in flash_varlen_split.")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    heads, kv, d, scale = 32, 8, 128, 128 ** -0.5
    b, n = args.rows, args.bucket
    torch.manual_seed(0)
    q = torch.randn(b, heads, 1, d, device=dev, dtype=dtype)
    ks = [torch.randn(b, kv, n, d, device=dev, dtype=dtype) for _ in range(args.layers)]
    vs = [torch.randn(b, kv, n, d, device=dev, dtype=dtype) for _ in range(args.layers)]
    lengths = torch.full((b,), args.short_keys, device=dev, dtype=torch.int32)
    lengths[b - args.long_rows:] = args.long_keys
    key_idx = torch.arange(n, device=dev)
    mask = (key_idx[None, :] < lengths[:, None])[:, None, None, :]
    short = 256
    mask_short = mask[..., :short]
    out = torch.empty(b, 1, heads * d, device=dev, dtype=dtype)
    result = {"rows": b, "long_rows": args.long_rows, "long_keys": args.long_keys, "short_keys": args.short_keys,
              "bucket": n, "layers": args.layers, "dtype": str(dtype), "ms_per_step": {}}
    if cuda:
        result["environment"] = R.environment(sys.argv)

    def longest():
        for k, v in zip(ks, vs):
            out.copy_(sdpa(q, k, v, mask, scale))

    def shortest():
        for k, v in zip(ks, vs):
            out.copy_(sdpa(q, k[:, :, :short], v[:, :, :short], mask_short, scale))

    result["ms_per_step"]["sdpa_longest_bucket"] = timed(graphed(longest))
    result["ms_per_step"]["sdpa_short_bucket"] = timed(graphed(shortest))
    try:
        attend = make_flex(lengths, n, compiled=cuda)
        got, want = attend(q, ks[0], vs[0], scale), sdpa(q, ks[0], vs[0], mask, scale)
        result["flex_vs_sdpa_max_abs_diff"] = float((got.float() - want.float()).abs().max())

        def flex():
            for k, v in zip(ks, vs):
                out.copy_(attend(q, k, v, scale))

        result["ms_per_step"]["flex_per_row"] = timed(graphed(flex))
    except Exception as e:  # noqa: BLE001 - the lever's own failure is a result too
        result["flex_error"] = f"{type(e).__name__}: {str(e)[:800]}"
    if cuda:
        from afinar.engine import torch_varlen

        flat_k = [k.transpose(1, 2).reshape(b * n, kv, d).contiguous() for k in ks]
        flat_v = [v.transpose(1, 2).reshape(b * n, kv, d).contiguous() for v in vs]
        q3 = q[:, :, 0].contiguous()  # [rows, heads, d]
        i32 = dict(device=dev, dtype=torch.int32)
        cu_q, cu_k = torch.arange(b + 1, **i32), torch.arange(b + 1, **i32) * n
        want = sdpa(q, ks[0], vs[0], mask, scale).float()

        def per_row(i):
            return torch_varlen.flash(q3, flat_k[i], flat_v[i], cu_q, cu_k, lengths, 1, n, scale)

        try:
            result["flash_varlen_vs_sdpa_max_abs_diff"] = float((per_row(0).reshape(b, 1, -1).float() - want).abs().max())

            def flash_rows():
                for i in range(args.layers):
                    out.copy_(per_row(i).reshape(b, 1, -1))
            result["ms_per_step"]["flash_varlen_per_row"] = timed(graphed(flash_rows))
        except Exception as e:  # noqa: BLE001
            result["flash_varlen_error"] = f"{type(e).__name__}: {str(e)[:800]}"
        c = args.split
        J = n // c
        qs = q3.repeat_interleave(J, dim=0)  # [rows x pieces, heads, d]
        cu_qs = torch.arange(b * J + 1, **i32)
        piece = torch.arange(J, device=dev)
        starts = (torch.arange(b, device=dev)[:, None] * n + piece[None, :] * c).reshape(-1)
        cu_ks = torch.cat([starts, starts[-1:]]).to(torch.int32)
        used = (lengths[:, None] - piece[None, :] * c).clamp(0, c).reshape(-1).to(torch.int32)
        empty = (used == 0).view(1, b, J)

        def split_row(i):
            o, lse = torch.ops.aten._flash_attention_forward(
                qs, flat_k[i], flat_v[i], cu_qs, cu_ks, 1, c, 0.0, True, False, scale=scale, seqused_k=used)[:2]
            lse = lse.reshape(heads, b, J).masked_fill(empty, float("-inf"))  # empty pieces weigh nothing
            w = torch.softmax(lse, dim=-1)  # [heads, rows, pieces]
            o = o.view(b, J, heads, d).float()
            return torch.einsum("hbj,bjhd->bhd", w, o).to(dtype)

        try:
            result["flash_varlen_split_vs_sdpa_max_abs_diff"] = float(
                (split_row(0).reshape(b, 1, -1).float() - want).abs().max())

            def flash_split():
                for i in range(args.layers):
                    out.copy_(split_row(i).reshape(b, 1, -1))
            result["ms_per_step"][f"flash_varlen_split{c}"] = timed(graphed(flash_split))
        except Exception as e:  # noqa: BLE001
            result["flash_varlen_split_error"] = f"{type(e).__name__}: {str(e)[:800]}"
    kv_bytes = lambda keys: 2 * args.layers * kv * keys * d * torch.finfo(dtype).bits // 8  # noqa: E731
    result["kv_bytes_read"] = {"longest_bucket": b * kv_bytes(n),
                               "own_blocks": int(sum(kv_bytes(-(-int(x) // BLOCK) * BLOCK) for x in lengths.tolist()))}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"decode_attention": result}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
