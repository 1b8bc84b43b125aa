"""The serving engine's two step shapes side by side, in process, on a merged bf16 7B-shaped model.

`serve.step=split` (afinar/engine/torch_runner.py): a prefill forward for the prompt chunks, then a
decode step (a CUDA graph) attending every row over the longest row's key bucket. `serve.step=flat`
(torch_flat.py): prompt chunks and one token per decoding row in one forward (a CUDA graph per
(rows, prompt tokens)), each row over its own keys (FlashAttention varlen). Each runner in turn,
on the same random model (one process; the KV slots of one are freed before the next):

- `generate_b1`, `generate_b32`: `Engine.generate` of 32 prompts of 18-49 tokens (1 or all 32 at
  once), 128 new greedy tokens; one warm-up call, then the median of 3; tokens/s = generated tokens /
  wall time, prefill included (what `ask` and `eval` see; as `generate_throughput.py` times it).
- `mix_c32` (and other `--concurrency`): a closed loop in process, no HTTP: that many requests in
  flight at all times, each replaced by the next the moment it ends; 128 new tokens each; every
  `--long-every`-th prompt `--long-tokens` long, the others the short prompts above (the mix of
  `serve_load.py`). Generated tokens / seconds over `--seconds` after a warm-up of as long, and the
  engine's steps in that time (ms a step, tokens a step).
- `step_ms` (CUDA): where a step goes. The runner's captured greedy steps replayed back to back
  (median of 3 windows of 50), `--rows-measured` rows decoding at 200 keys, 2 of them at
  `--long-tokens` + 150 keys (the long request of the mix, decoding), and for the flat runner each
  prompt-token size with no prompt sequence in it (the padded tokens' matmuls, not their attention);
  `no_long`: the same with every row at 200 keys.
- `flat_split` (`--steps`): the flat runner with `serve.split_keys=--split-keys` (decode steps
  whose longest row holds 4+ pieces of keys split every row's keys, torch_varlen.split_decode);
  its `step_ms` adds `p0_split`.
- `agreement`: greedy tokens of the 32 prompts, flat against split (bf16: a near-tie may part them
  after some tokens; the CPU tests check exact equality in fp32).

    python benchmarks/engine_mix.py --tokenizer .bench/tok --out benchmarks/results/DATE-h200-engine-mix.json
    python benchmarks/engine_mix.py --shape tiny --seconds 2 --new-tokens 8 --concurrency 4   # CPU smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import random_7b as R  # noqa: E402
from benchmarks.decode_profile import median_window  # noqa: E402
from benchmarks.generate_throughput import prompts_for  # noqa: E402

WINDOWS = 3


def long_prompt(tok, n: int, seed: int = 7) -> list[int]:
    from afinar import data

    rng = random.Random(seed)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("▁") and w[1:].isalpha() and len(w) > 3)
    text = ""
    while True:
        text += " " + " ".join(rng.choices(words, k=64))
        ids = data.prompt_ids(tok, text + "?")
        if len(ids) >= n:
            return ids


def generate_row(engine, prompts, new_tokens: int) -> dict:
    engine.generate(prompts, new_tokens)
    times, out = [], None
    for _ in range(WINDOWS):
        R.sync()
        t0 = time.perf_counter()
        out = engine.generate(prompts, new_tokens)
        R.sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    made = sum(len(o) for o in out)
    return {"tokens_per_s": round(made / t, 1), "per_stream_tokens_per_s": round(made / t / len(prompts), 1),
            "seconds": [round(x, 3) for x in times], "tokens": made, "_out": out}


def closed_loop(engine, shorts, long, concurrency: int, new_tokens: int, long_every: int, seconds: float) -> dict:
    """`concurrency` requests always in flight through the started engine; counts over `seconds` after a warm-up."""
    from afinar.engine import Request, SamplingParams

    sent = 0
    lock = threading.Lock()
    counting = {"on": False, "tokens": 0, "long": 0, "done": 0}
    live: list = []

    def make():
        nonlocal sent
        is_long = bool(long_every) and sent % long_every == long_every - 1
        prompt = long if is_long else shorts[sent % len(shorts)]
        sent += 1

        def on_token(_t, _c=counting):
            if _c["on"]:
                with lock:
                    _c["tokens"] += 1
        req = Request(prompt, SamplingParams(max_tokens=new_tokens, stop_token_ids=()), on_token=on_token)
        req.is_long = is_long
        engine.submit(req, limit_queue=False)
        return req

    live = [make() for _ in range(concurrency)]
    phases = {}
    for phase in ("warm", "count"):
        if phase == "count":
            counting["on"] = True
            steps0 = engine.counts["steps"]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i, r in enumerate(live):
                if r.done:
                    if r.finish_reason == "error":
                        raise RuntimeError(r.error)
                    if counting["on"]:
                        counting["done"] += 1
                        counting["long"] += r.is_long
                    live[i] = make()
            time.sleep(0.0005)
        phases[phase] = time.perf_counter() - t0
    counting["on"] = False
    steps = engine.counts["steps"] - steps0
    for r in live:
        r.wait(600)
    t = phases["count"]
    return {"tokens_per_s": round(counting["tokens"] / t, 1), "seconds": round(t, 2), "tokens": counting["tokens"],
            "requests_done": counting["done"], "long_done": counting["long"], "steps": steps,
            "ms_per_step": round(1000 * t / max(steps, 1), 2), "tokens_per_step": round(counting["tokens"] / max(steps, 1), 1)}


@torch.inference_mode()
def step_costs(runner, b: int, long_keys: int, short_keys: int = 200, n_long: int = 2) -> dict:
    """ms per captured greedy step, rows [0, b) decoding (see the module docstring). Leaves the rows' state garbage:
    call it on a runner no request uses any more."""
    from afinar.engine.plan import bucket

    flat = hasattr(runner, "prompt_sizes")
    out = {}

    def place(with_long: bool):
        runner.pos[:b] = short_keys
        if with_long:
            runner.pos[:n_long] = long_keys
        if flat:
            runner.meta.zero_()
            runner.m["dest"].fill_(runner.max_len)
            runner.m["decoding"][:b] = 1
            runner.m["src"][:b] = torch.arange(b)
        else:
            runner.active[:b] = True

    for with_long in (True, False):
        if flat:
            for p in runner.prompt_sizes if with_long else (0,):
                place(with_long)
                out[f"p{p}" + ("" if with_long else "_no_long")] = median_window(
                    runner.graphs[(b, p, False, False)].replay, 50)
            if runner.piece:
                place(with_long)
                out["p0_split" + ("" if with_long else "_no_long")] = median_window(
                    runner.graphs[(b, 0, False, True)].replay, 50)
        else:
            place(with_long)
            keys = bucket((long_keys if with_long else short_keys) + 60, runner.len_sizes)
            out["decode" + ("" if with_long else "_no_long")] = median_window(runner.graphs[(b, keys)].replay, 50)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    prefix = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y))) for x, y in zip(a, b)]
    return {"identical": f"{same}/{len(a)}", "common_prefix_min": min(prefix),
            "common_prefix_median": statistics.median(prefix)}


def main(argv=None) -> None:
    from afinar.engine.scheduler import Engine
    from afinar.engine.torch_flat import FlatRunner
    from afinar.engine.torch_runner import TorchRunner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--steps", default="split,flat", help="Runners to measure, in order: split, flat, flat_split.")
    p.add_argument("--split-keys", type=int, default=256, help="serve.split_keys of the flat_split runner.")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=64, help="serve.max_batch_size: the engine's rows.")
    p.add_argument("--max-len", type=int, default=4096, help="serve.max_context.")
    p.add_argument("--chunk", type=int, default=512, help="serve.prefill_chunk.")
    p.add_argument("--concurrency", default="32")
    p.add_argument("--long-tokens", type=int, default=1500)
    p.add_argument("--long-every", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rows-measured", type=int, default=32, help="Rows decoding in step_ms.")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = R.environment(sys.argv)
    tok = R.tokenizer(args.tokenizer)
    model = R.build_base(args.shape, tok, quantize=False)
    shorts = prompts_for(tok, 32)
    long = long_prompt(tok, args.long_tokens)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = {"shape": args.shape, "new_tokens": args.new_tokens, "rows": args.rows, "max_len": args.max_len,
              "prefill_chunk": args.chunk, "short_prompt_tokens": [min(map(len, shorts)), max(map(len, shorts))],
              "long_prompt_tokens": len(long), "long_every": args.long_every, "steps": {}}
    outs = {}
    for kind in args.steps.split(","):
        R.free_gpu()
        t0 = time.perf_counter()
        if kind == "split":
            runner = TorchRunner(model, args.rows, args.max_len, args.chunk)
        else:  # flat, or flat_split: serve.split_keys=--split-keys
            runner = FlatRunner(model, args.rows, args.max_len, args.chunk,
                                split_keys=args.split_keys if kind == "flat_split" else 0)
        runner.warm_up(say)
        row = {"runner": type(runner).__name__, "warm_up_s": round(time.perf_counter() - t0, 1)}
        if kind != "split":
            row["attention"] = runner.attention.__name__
            row["split_keys"] = runner.piece
        engine = Engine(runner, decode, set())
        for b in (1, len(shorts)):
            r = generate_row(engine, shorts[:b], args.new_tokens)
            outs[(kind, b)] = r.pop("_out")
            row[f"generate_b{b}"] = r
            say(f"{kind} generate b{b}: {r['tokens_per_s']} tokens/s")
        engine.start()
        for c in [int(x) for x in args.concurrency.split(",")]:
            row[f"mix_c{c}"] = closed_loop(engine, shorts, long, c, args.new_tokens, args.long_every, args.seconds)
            say(f"{kind} mix c{c}: {row[f'mix_c{c}']}")
        engine.stop()
        row["peak_gib"] = R.peak_gib()
        if runner.graphs:
            row["step_ms"] = step_costs(runner, args.rows_measured, len(long) + 150)
            say(f"{kind} step_ms: {row['step_ms']}")
        result["steps"][kind] = row
        del engine, runner
    kinds = args.steps.split(",")
    if len(kinds) >= 2:
        result["agreement_b32"] = agreement(outs[(kinds[0], 32)], outs[(kinds[1], 32)])
        result["agreement_b1_vs_b32"] = {k: outs[(k, 1)][0] == outs[(k, 32)][0] for k in kinds}
    print(result)
    if args.out:
        R.merge_results(Path(args.out), "engine_mix", result, env)


if __name__ == "__main__":
    main()
