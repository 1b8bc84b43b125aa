"""Load test of `afinar serve` through HTTP with the official openai client: the engine against the old ways.

Starts `afinar serve RUN --port 0` once per engine (`serve.engine`): `continuous` (the default,
afinar/engine/), `static` (the earlier whole-batch batcher) and `transformers` (the same batcher
through plain transformers generate), and sends the same requests to each with AsyncOpenAI,
streamed, at every concurrency level. The prompts are a fixed mix: the bundled validation
questions, and every `--long-every`-th request a prompt of `--long-tokens` tokens.

Per engine and level: aggregate generated tokens/s (completion tokens / wall time; and, with
`--level-seconds`, `steady_tokens_per_s`: only while the clients kept the level's concurrency), time to
first token p50/p95 (first streamed content), inter-token latency p50/p95 (per request: the
time after its first token divided by its other tokens), request latency, errors, and the
server's RSS from /metrics after the warm-up and at the end. Then the head-of-line case: the
p95 latency of short requests at `--hol-concurrency`, alone and with one `--long-tokens` prompt
sent first in every round.

An engine name may carry settings of its own after a `+` (`continuous+serve.switch_interval_ms=5`:
the same engine with Python's default thread switch interval, an A/B in one run). `--client-procs`
spreads each level's requests over several client processes, so that parsing the streamed chunks
in one Python process does not become the limit; per level the continuous engine's own steps
(from /metrics) give its milliseconds per step as the server saw them.

On a shared CPU all servers run at once and the rounds alternate between them, so background
load falls on each alike; on a GPU (`--one-at-a-time`) they run one after the other.

    # CPU, tiny random model (the committed result):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --concurrency 16 --requests 1000 \\
        --out benchmarks/results/serve-load-cpu.json
    # H200, random Mistral-7B shape, bf16 merged adapter (8-10 minutes; the JSON is rewritten after each engine):
    python benchmarks/serve_load.py --shape mistral-7b --tokenizer .bench/tok --one-at-a-time \\
        --concurrency 1,8,32,64 --requests 2000 --level-seconds 10 --warmup 8 --max-tokens 128 \\
        --long-tokens 1500 --hol-rounds 3 --set serve.max_batch_size=64 --out benchmarks/results/serve-load-h200.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- the run and its prompts


def make_run(shape: str, work: Path, tokenizer: str | None) -> Path:
    """A run folder to serve: the tiny test run, or a random 7B-shaped model (bf16) with a random adapter."""
    from afinar.synthetic import make_tiny_run

    if shape == "tiny":
        return make_tiny_run(work / "tiny-run")
    run = work / f"{shape}-run"
    if (run / "training_config.json").is_file():
        return run
    import torch

    from afinar import atomic
    from afinar.config import load_config
    from afinar.runs import file_sha256
    from benchmarks import random_7b as R
    from benchmarks.generate_throughput import random_adapter

    tok = R.tokenizer(tokenizer)
    model_dir = work / f"{shape}-model"
    base = R.build_base(shape, tok, quantize=False)  # in GPU memory, bf16
    with atomic.folder(run) as tmp:
        random_adapter(base, tmp, scale=0.02)  # leaves `base` as it was
        cfg = load_config(None, [f"model.base={model_dir}", "model.quantization=none", "model.compute_dtype=bfloat16",
                                 "lora.target_modules=[q_proj,k_proj,v_proj]"])
        atomic.write_json(tmp / "training_config.json", cfg.model_dump(mode="json"))
        adapter = tmp / "adapter_model.safetensors"  # what `afinar serve` verifies before it loads (afinar/verify.py)
        atomic.write_json(tmp / "metadata.json", {"method": "lora", "note": "random adapter for benchmarks/serve_load.py",
                                                  "adapter": {"file": adapter.name, "bytes": adapter.stat().st_size,
                                                              "sha256": file_sha256(adapter)}})
        if not (model_dir / "config.json").is_file():
            with atomic.folder(model_dir) as m:
                base.save_pretrained(m)
                tok.save_pretrained(m)
    del base
    torch.cuda.empty_cache()
    return run


def prompts(run: Path, long_tokens: int) -> tuple[list[list[dict]], list[dict]]:
    """(short chats: the bundled validation questions, one long chat of about `long_tokens` tokens)."""
    from transformers import AutoTokenizer

    from afinar import data
    from afinar.runs import load_run

    with open(REPO / "data" / "farense" / "val.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    with open(REPO / "data" / "farense" / "train.jsonl", encoding="utf-8") as f:
        facts = [json.loads(line)["answer"] for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(load_run(run)[0].model.base)
    context, i = [], 0
    while len(data.prompt_ids(tok, " ".join(context) + "\n\n" + questions[0])) < long_tokens:
        context.append(facts[i % len(facts)])
        i += 1
    long = [{"role": "user", "content": " ".join(context) + "\n\n" + questions[0]}]
    return [[{"role": "user", "content": q}] for q in questions], long


# ---------------------------------------------------------------- measuring


class Tally:
    """What one engine's requests at one level gave, summed over rounds."""

    def __init__(self):
        self.ttft, self.itl, self.latency, self.tokens, self.errors, self.wall, self.sent = [], [], [], 0, [], 0.0, 0
        self.cut = 0  # requests not sent: the level's --level-seconds ran out
        self.ttft_short = []  # time to first token of the short prompts only
        self.streams = []  # per request: (completion tokens, wall-clock times of its content chunks)
        self.windows = []  # per client process and round: (start, end) of its sending window, wall clock

    def steady(self) -> dict:
        """Generated tokens/s while every client process was still sending (the level held its
        concurrency): the level's wall time above also counts the tail, when the last requests finish
        with fewer and fewer in flight. Each request's tokens are spread over its streamed chunks
        (one chunk per token, but a token whose text is not complete yet waits for the next)."""
        windows = [(a, b) for a, b in self.windows if b > a]  # rounds run one after the other: no overlap
        length = sum(b - a for a, b in windows)
        if length <= 0:
            return {}
        tokens = sum(n * sum(any(a <= t <= b for a, b in windows) for t in times) / len(times)
                     for n, times in self.streams if times)
        return {"steady_tokens_per_s": round(tokens / length, 1), "steady_window_s": round(length, 2)}

    def summary(self) -> dict:
        def pct(values, p):
            v = sorted(values)
            return round(1000 * v[min(len(v) - 1, int(p * len(v)))], 1) if v else None

        ok = len(self.latency)
        return {"requests": self.sent, "not_sent_time_limit": self.cut, "ok": ok, "errors": len(self.errors),
                "error_samples": self.errors[:5],
                "wall_s": round(self.wall, 2), "requests_per_s": round(ok / self.wall, 2) if self.wall else None,
                "generated_tokens": self.tokens,
                "generated_tokens_per_s": round(self.tokens / self.wall, 1) if self.wall else None,
                **self.steady(),
                "ttft_ms": {"p50": pct(self.ttft, 0.5), "p95": pct(self.ttft, 0.95)},
                "ttft_short_prompts_ms": {"p50": pct(self.ttft_short, 0.5), "p95": pct(self.ttft_short, 0.95)},
                "itl_ms": {"p50": pct(self.itl, 0.5), "p95": pct(self.itl, 0.95)},
                "latency_ms": {"p50": pct(self.latency, 0.5), "p95": pct(self.latency, 0.95),
                               "mean": round(1000 * statistics.fmean(self.latency), 1) if ok else None}}


async def one(client, messages, max_tokens: int, is_long: bool, tally: Tally) -> float | None:
    """One streamed chat completion; returns its latency (None on error)."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    times = []
    try:
        stream = await client.chat.completions.create(model="run", messages=messages, max_tokens=max_tokens,
                                                      stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.time())
                if first is None:
                    first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 - every failure counts as an error of the engine measured
        tally.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
        return None
    end = time.perf_counter()
    tally.latency.append(end - t0)
    tally.tokens += tokens
    tally.streams.append((tokens, times))
    if first is not None:
        tally.ttft.append(first - t0)
        if not is_long:
            tally.ttft_short.append(first - t0)
        if tokens > 1:
            tally.itl.append((end - first) / (tokens - 1))
    return end - t0


async def load(url: str, bodies: list[tuple[list[dict], int, bool]], concurrency: int, tally: Tally | None,
               seconds: float = 0) -> list:
    """Send `bodies` (messages, max_tokens, is_long) with `concurrency` in flight, in order; latencies in order.

    With `seconds` > 0 no request starts after that long (the rest are not sent, not counted).
    """
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=os.environ.get("AFINAR_API_KEY", "none"), max_retries=0,
                         timeout=900)
    tally = tally or Tally()
    results: list = [None] * len(bodies)
    queue = list(enumerate(bodies))
    t0 = time.perf_counter()
    window = [time.time(), None]  # from the start until the first worker has nothing more to send
    sent = 0

    async def worker():
        nonlocal sent
        while queue and not (seconds and time.perf_counter() - t0 > seconds):
            i, (messages, n, is_long) = queue.pop(0)
            sent += 1
            results[i] = await one(client, messages, n, is_long, tally)
        window[1] = window[1] or time.time()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    tally.wall += time.perf_counter() - t0
    tally.windows.append(tuple(window))
    tally.sent += sent
    tally.cut += len(queue)
    await client.close()
    return results


def _load_part(url: str, bodies: list, concurrency: int, seconds: float) -> dict:
    """One client process's share of a level (see `load_split`): its Tally's fields."""
    tally = Tally()
    asyncio.run(load(url, bodies, concurrency, tally, seconds))
    return vars(tally)


def load_split(url: str, bodies: list, concurrency: int, tally: Tally, seconds: float, procs: int) -> None:
    """`load` with the requests and the concurrency spread over `procs` client processes.

    One Python process parsing every streamed chunk (httpx + the openai client's pydantic models)
    can itself become the limit at thousands of chunks per second; several processes keep the
    client out of the measurement. The level's wall time is the slowest process's.
    """
    procs = max(1, min(procs, concurrency))
    if procs == 1:
        asyncio.run(load(url, bodies, concurrency, tally, seconds))
        return
    import multiprocessing

    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    parts = [bodies[i::procs] for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        done = pool.starmap(_load_part, [(url, part, share, seconds) for part, share in zip(parts, shares)])
    for d in done:
        for key in ("ttft", "itl", "latency", "errors", "ttft_short", "streams"):
            getattr(tally, key).extend(d[key])
        tally.tokens += d["tokens"]
        tally.sent += d["sent"]
        tally.cut += d["cut"]
    # the round held its concurrency while every process did
    tally.windows.append((max(d["windows"][0][0] for d in done), min(d["windows"][0][1] for d in done)))
    tally.wall += max(d["wall"] for d in done)


def engine_counters(url: str) -> tuple[int, int]:
    m = metrics(url)
    return m.get("steps") or 0, m.get("generated_tokens") or 0


def mix(shorts, long, n: int, offset: int, max_tokens: int, long_every: int) -> list:
    out = []
    for i in range(n):
        is_long = bool(long_every) and (offset + i) % long_every == long_every - 1
        out.append((long if is_long else shorts[(offset + i) % len(shorts)], max_tokens, is_long))
    return out


def metrics(url: str) -> dict:
    key = os.environ.get("AFINAR_API_KEY")
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30).json()


def measure(urls: dict[str, str], args, shorts, long) -> dict:
    """Every level, then the head-of-line case, for every engine (rounds alternate between engines)."""
    out = {e: {"levels": {}, "rss_mb": {}} for e in urls}
    for c in args.levels:
        for e, url in urls.items():  # warm-up at this level (graph capture, allocator), not counted
            asyncio.run(load(url, mix(shorts, long, max(args.warmup, c), 0, args.max_tokens, args.long_every), c, None,
                             args.level_seconds))
            out[e]["rss_mb"].setdefault("after_warmup", metrics(url)["rss_mb"])
        tallies = {e: Tally() for e in urls}
        before = {e: engine_counters(url) for e, url in urls.items()}
        per_round = -(-args.requests // args.rounds)
        for r in range(args.rounds):
            for e in (list(urls) if r % 2 == 0 else list(reversed(urls))):
                n = min(per_round, args.requests - tallies[e].sent)
                left = args.level_seconds - tallies[e].wall if args.level_seconds else 0
                if n > 0 and left >= 0:
                    load_split(urls[e], mix(shorts, long, n, tallies[e].sent, args.max_tokens, args.long_every),
                               c, tallies[e], left if args.level_seconds else 0, args.client_procs)
        for e in urls:
            out[e]["levels"][str(c)] = tallies[e].summary()
            steps, tokens = (a - b for a, b in zip(engine_counters(urls[e]), before[e]))
            if steps:  # the continuous engine: its steps during the level, seen from the server
                wall = tallies[e].wall
                out[e]["levels"][str(c)]["server"] = {"steps": steps, "ms_per_step": round(1000 * wall / steps, 2),
                                                      "tokens_per_step": round(tokens / steps, 2)}
            print(f"{e:13} c={c:<3} {json.dumps(out[e]['levels'][str(c)])}", file=sys.stderr, flush=True)
    hol = args.hol_concurrency
    alone, mixed = {e: [] for e in urls}, {e: [] for e in urls}
    for r in range(args.hol_rounds):  # rounds alternate between the engines, as the levels do
        for e in (list(urls) if r % 2 == 0 else list(reversed(urls))):
            alone[e] += asyncio.run(load(urls[e], [(s, args.max_tokens, False) for s in shorts[:hol]], hol, None))
            bodies = [(long, args.max_tokens, True)] + [(s, args.max_tokens, False) for s in shorts[:hol]]
            mixed[e] += asyncio.run(load(urls[e], bodies, hol + 1, None))[1:]  # the long prompt goes first
    p95 = lambda xs: round(1000 * sorted(xs)[min(len(xs) - 1, int(0.95 * len(xs)))], 1) if xs else None  # noqa: E731
    for e, url in urls.items():
        a, m = [x for x in alone[e] if x is not None], [x for x in mixed[e] if x is not None]
        out[e]["head_of_line"] = {"short_p95_ms_alone": p95(a), "short_p95_ms_with_one_long_prompt": p95(m),
                                  "ratio": round(p95(m) / p95(a), 2) if a and m else None,
                                  "short_requests": len(a), "concurrency": hol}
        after = metrics(url)
        out[e]["rss_mb"]["end"] = after["rss_mb"]
        first = out[e]["rss_mb"]["after_warmup"]
        out[e]["rss_mb"]["growth_pct"] = round(100 * (after["rss_mb"] - first) / first, 2)
        out[e]["server_metrics"] = {k: after.get(k) for k in ("engine", "steps", "rows_per_step_mean", "rows_per_step_max",
                                                              "batches", "batch_size_mean", "errors", "queue_wait_ms",
                                                              "ttft_ms", "itl_ms")}
    return out


# ---------------------------------------------------------------- servers


def start_server(run: Path, engine: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    # The interpreter running this script, so the server gets the same packages (no console script needed).
    # An engine may carry its own settings: "continuous+serve.switch_interval_ms=5" (an A/B within one run).
    engine, *own = engine.split("+")
    args = [sys.executable, "-m", "afinar.cli", "serve", str(run), "--port", "0", "--set", f"serve.engine={engine}"]
    for s in [*extra, *own]:
        args += ["--set", s]
    out = open(log, "w")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"listening on (http://\S+)", log.read_text())
        if m:
            try:
                if httpx.get(f"{m.group(1)}/health", timeout=10).status_code == 200:
                    return proc, m.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"afinar serve ({engine}) did not become ready; log:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    return proc.wait(timeout=120)


def versions() -> dict:
    import fastapi
    import openai
    import torch
    import transformers
    import uvicorn

    import afinar

    return {"python": platform.python_version(), "afinar": afinar.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "openai": openai.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="Run folder to serve (default: build one of --shape under --work).")
    ap.add_argument("--shape", default="tiny", help="tiny (CPU) or mistral-7b (GPU) when no --run is given.")
    ap.add_argument("--tokenizer", help="With --shape mistral-7b: a saved Mistral tokenizer folder (see random_7b.py).")
    ap.add_argument("--url", help="Measure this running server instead (one engine, whatever it runs).")
    ap.add_argument("--engines", default="continuous,static,transformers")
    ap.add_argument("--concurrency", default="16", help="Levels, comma-separated (1,8,32,64 on a GPU).")
    ap.add_argument("--requests", type=int, default=1000, help="Measured requests per engine and level.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=1500, help="Tokens of the long prompt of the mix.")
    ap.add_argument("--long-every", type=int, default=16, help="Every Nth request is the long prompt (0: none).")
    ap.add_argument("--warmup", type=int, default=64, help="Requests sent per level before measuring.")
    ap.add_argument("--rounds", type=int, default=10, help="Rounds alternating between the engines, per level.")
    ap.add_argument("--level-seconds", type=float, default=0,
                    help="Per engine and level, stop starting requests (warm-up and measured) after this long (0: never).")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="Client processes per level (the concurrency is spread over them); 1: one asyncio loop.")
    ap.add_argument("--hol-concurrency", type=int, default=8)
    ap.add_argument("--hol-rounds", type=int, default=10)
    ap.add_argument("--one-at-a-time", action="store_true", help="One server at a time (a GPU holds one 7B server).")
    ap.add_argument("--set", dest="settings", action="append", default=[], help="A serve.* setting for every server.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/afinar-serve-load"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="", help="Free text kept in the result (what else ran on the machine).")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python " + shlex.join(
            [os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_1m_at_start": os.getloadavg()[0]},
        "versions": versions(), "note": args.note,
        "how": "AsyncOpenAI (the official client), streamed chat completions over loopback; client and servers share "
               "the machine. tokens/s = completion tokens (from usage) / wall time of the level; TTFT = first non-empty "
               "streamed content; ITL = per request, (end - first token) / (completion tokens - 1). RSS from /metrics.",
        "settings": {k: getattr(args, k) for k in ("shape", "engines", "levels", "requests", "max_tokens", "long_tokens",
                                                   "long_every", "warmup", "rounds", "level_seconds", "client_procs", "hol_concurrency",
                                                   "hol_rounds", "one_at_a_time", "settings")},
    }
    run = args.run or make_run(args.shape, args.work, args.tokenizer)
    result["run"] = str(run)
    shorts, long = prompts(run, args.long_tokens)
    if args.url:
        result["engines"] = measure({"external": args.url.rstrip("/")}, args, shorts, long)
    else:
        engines = args.engines.split(",")
        result["engines"] = {}
        groups = [[e] for e in engines] if args.one_at_a_time else [engines]
        for group in groups:
            servers = {e: start_server(run, e, args.settings, args.work / f"serve-{e}.log") for e in group}
            try:
                result["engines"].update(measure({e: url for e, (_, url) in servers.items()}, args, shorts, long))
            finally:
                for e, (proc, _) in servers.items():
                    result["engines"].setdefault(e, {})["exit_code_after_sigterm"] = stop(proc)
            write(result, args.out)  # what is measured so far survives a later failure or time limit
        if "continuous" in result["engines"]:
            base = result["engines"]["continuous"]["levels"]
            result["continuous_vs"] = {
                e: {c: round(base[c]["generated_tokens_per_s"] / r["generated_tokens_per_s"], 2)
                    for c, r in result["engines"][e]["levels"].items() if r["generated_tokens_per_s"]}
                for e in result["engines"] if e != "continuous"}
    write(result, args.out)
    print(json.dumps(result, indent=1, ensure_ascii=False))


def write(result: dict, out: Path | None) -> None:
    if out:
        from afinar import atomic

        atomic.write_text(out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
