"""Where a decode step of the serving engine goes, on a merged bf16 7B-shaped model (issue 17, part 3).

One process, one random Mistral-7B-shaped model in bf16 (what `afinar serve` decodes after merging),
the engine's own `TorchRunner` (static KV slots, one CUDA graph per (rows, keys) shape). For 1 and
32 rows it measures, each the median of 3 windows:

- `engine_ms_per_token`: `Engine.generate` of 128 new tokens (prefill included), wall time / 128;
  what `ask`, `eval` and a single stream of `serve` see.
- `graph_ms_per_step`: the captured decode step replayed back to back, synchronised once: the
  GPU time of one step with no host in the way. engine - graph = host and prefill time.
- `weights_floor_ms`: the bytes a step must read (every weight once, plus the KV cache it
  attends to) at the GPU's measured copy bandwidth (a device-to-device copy of 4 GiB): the
  bandwidth limit the issue's "~330 tokens/s" stands for.
- `linear_ms`: the step's matmuls alone (the layer's fused q/k/v, o, fused gate/up, down, times
  the layers, plus the LM head), each shape timed in its own CUDA graph of 50 back-to-back calls;
  with each shape's achieved bandwidth. What is left (graph - linear) is attention, norms,
  rotary, the residual adds and the sampling.
- `sampling_ms`: the engine's per-row token choice (`torch_sampling.choose`, both paths as the
  graph runs them) alone, in its own graph.
- an eager profile of the same step (`torch.profiler`, CUDA kernels by total time), written to
  `--profile` as a table.

    python benchmarks/decode_profile.py --tokenizer .bench/tok --out benchmarks/results/DATE-h200-decode-profile.json \\
        --profile benchmarks/results/DATE-h200-decode-profile.txt
    python benchmarks/decode_profile.py --shape tiny --new-tokens 8   # CPU smoke run (no graphs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import random_7b as R  # noqa: E402
from benchmarks.generate_throughput import prompts_for  # noqa: E402

WINDOWS = 3


def median_window(fn, calls: int) -> float:
    """Median over WINDOWS windows of `calls` back-to-back calls, synchronised per window: ms per call."""
    times = []
    for _ in range(WINDOWS):
        R.sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        R.sync()
        times.append((time.perf_counter() - t0) / calls)
    return round(1000 * statistics.median(times), 4)


def in_graph(fn, calls: int):
    """`fn` captured `calls` times back to back in one CUDA graph (launch cost out of the measurement)."""
    if not torch.cuda.is_available():
        return fn, 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g.replay, calls


def copy_bandwidth_gbs() -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")  # 4 GiB
    b = torch.empty_like(a)
    ms = median_window(lambda: b.copy_(a), 10)
    del a, b
    return round(2 * 2**32 / (ms / 1000) / 1e9, 1)  # read + write


def linear_costs(stack, rows: int) -> dict:
    """Each matmul shape of one decode step, timed alone; ms per step for all of them."""
    layer = stack.layers[0]
    shapes = {"qkv": stack.qkv[0][0], "o_proj": layer.self_attn.o_proj.weight, "gate_up": stack.gate_up[0][0],
              "down_proj": layer.mlp.down_proj.weight}
    out, total = {}, 0.0
    per_step = {k: len(stack.layers) for k in shapes}
    shapes["lm_head"], per_step["lm_head"] = stack.model.lm_head.weight, 1
    for name, w in shapes.items():
        x = torch.randn(rows, 1, w.shape[1], device=w.device, dtype=w.dtype)
        fn, calls = in_graph(lambda w=w, x=x: F.linear(x, w), 50)
        ms = median_window(fn, 3) / calls
        gbs = round(w.numel() * w.element_size() / (ms / 1000) / 1e9, 1)
        out[name] = {"shape": list(w.shape), "us": round(1000 * ms, 2), "achieved_gb_s": gbs, "per_step": per_step[name]}
        total += ms * per_step[name]
    out["total_ms_per_step"] = round(total, 3)
    return out


def sampling_cost(runner, rows: int) -> float:
    from afinar.engine.torch_sampling import choose

    vocab = runner.stack.model.lm_head.weight.shape[0]
    logits = torch.randn(rows, vocab, device=runner.device)
    fn = lambda: choose(logits, runner.temperature[:rows], runner.top_p[:rows], runner.seed[:rows],  # noqa: E731
                        runner.pos[:rows], runner.vocab_hash, None)
    g, calls = in_graph(fn, 20)
    return round(median_window(g, 3) / calls, 4)


def main(argv=None) -> None:
    from afinar.engine.scheduler import Engine
    from afinar.engine.torch_runner import TorchRunner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rows", default="1,32")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, help="Write the eager profile tables here.")
    args = p.parse_args(argv)
    env = R.environment(sys.argv)
    tok = R.tokenizer(args.tokenizer)
    sizes = [int(x) for x in args.rows.split(",")]
    model = R.build_base(args.shape, tok, quantize=False)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    t0 = time.perf_counter()
    runner = TorchRunner(model, max(sizes), args.max_len, 512)
    runner.warm_up(lambda s: print(s, file=sys.stderr, flush=True))
    warm_s = round(time.perf_counter() - t0, 1)
    engine = Engine(runner, lambda ids: tok.decode(ids, skip_special_tokens=True), set())
    prompts = prompts_for(tok, max(sizes))
    bandwidth = copy_bandwidth_gbs()
    result = {"shape": args.shape, "new_tokens": args.new_tokens, "max_len": args.max_len, "warm_up_s": warm_s,
              "weight_bytes_read_per_step": weight_bytes, "copy_bandwidth_gb_s": bandwidth, "rows": {}}
    tables = []
    for b in sizes:
        row: dict = {}
        engine.generate(prompts[:b], args.new_tokens)  # warm-up of this batch size
        times = []
        for _ in range(WINDOWS):
            R.sync()
            t0 = time.perf_counter()
            out = engine.generate(prompts[:b], args.new_tokens)
            R.sync()
            times.append(time.perf_counter() - t0)
        steps = max(len(o) for o in out)
        row["engine_ms_per_token"] = round(1000 * statistics.median(times) / steps, 3)
        row["engine_tokens_per_s"] = round(sum(len(o) for o in out) / statistics.median(times), 1)
        keys = 256
        runner.active[:b] = True  # rows decoding at position 100: attention over the first key bucket
        runner.pos[:b] = 100
        graph = runner.graphs.get((b, keys))
        step = graph.replay if graph is not None else (lambda: runner._decode(b, keys, []))
        row["graph_ms_per_step"] = median_window(step, 100)
        kv_bytes = 2 * len(runner.stack.layers) * b * runner.stack.n_kv * keys * runner.stack.head_dim * 2
        if bandwidth:
            row["weights_floor_ms"] = round(1000 * (weight_bytes + kv_bytes) / (bandwidth * 1e9), 3)
            row["graph_share_of_floor"] = round(row["weights_floor_ms"] / row["graph_ms_per_step"], 3)
        row["linear"] = linear_costs(runner.stack, b)
        row["sampling_ms"] = sampling_cost(runner, b)
        row["rest_ms"] = round(row["graph_ms_per_step"] - row["linear"]["total_ms_per_step"] - row["sampling_ms"], 3)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                runner._decode(b, keys, [])
            R.sync()
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        tables.append(f"== eager decode step, {b} row(s), {keys} keys, 5 steps ==\n"
                      + prof.key_averages().table(sort_by=sort, row_limit=40))
        runner.active.zero_()
        result["rows"][str(b)] = row
        print(b, row, file=sys.stderr, flush=True)
    if args.profile:
        Path(args.profile).write_text("\n\n".join(tables), encoding="utf-8")
    if args.out:
        R.merge_results(Path(args.out), "decode_profile", result, env)


if __name__ == "__main__":
    main()
