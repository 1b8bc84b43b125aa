"""Load test of `afinar serve`: N requests at concurrency C, batched versus one at a time.

Starts two `afinar serve RUN --port 0` servers on loopback: one with the default dynamic
batching, one with `--set serve.max_batch_size=1` (one request per generate call, as a server
without batching). Both are warmed up; then N chat completions each (greedy, `max_tokens` M,
the bundled validation questions in turn) go out with C in flight, in rounds alternating
between the two servers so that whatever else runs on the machine weighs on both alike.
Reported per mode: requests/s, p50/p95/max latency, generated tokens/s, errors, the server's
RSS after warm-up and at the end (from its /metrics), and the batch sizes it ran. The
batching gain is the ratio of the two throughputs, measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --requests 1000 --concurrency 16 \\
        --out benchmarks/results/serve-load-cpu.json

Without --run it serves the tiny test run (random 2-layer Mistral, real tokenizer; built by
`afinar.synthetic.make_tiny_run` under --work). With --url it measures a server you started
(one mode). Bounded: at most --requests per mode and --time-limit seconds per mode.
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


def questions() -> list[str]:
    with open(REPO / "data" / "farense" / "val.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f if line.strip()]


class Tally:
    """What one mode's requests gave, summed over its rounds."""

    def __init__(self):
        self.latencies, self.tokens, self.errors, self.sent, self.wall = [], 0, [], 0, 0.0

    def summary(self, n: int) -> dict:
        ms = sorted(x * 1000 for x in self.latencies)
        pct = lambda p: round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else None  # noqa: E731
        return {
            "requests_sent": self.sent, "ok": len(ms), "errors": len(self.errors), "error_samples": self.errors[:5],
            "wall_s": round(self.wall, 2), "requests_per_s": round(len(ms) / self.wall, 2),
            "generated_tokens": self.tokens, "generated_tokens_per_s": round(self.tokens / self.wall, 1),
            "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "max": round(ms[-1], 1) if ms else None,
                           "mean": round(statistics.fmean(ms), 1) if ms else None},
            "hit_time_limit": self.sent < n,
        }


async def load(url: str, n: int, concurrency: int, max_tokens: int, time_limit: float, key: str | None,
               tally: Tally) -> None:
    """Send `n` requests with `concurrency` in flight (stop sending after `time_limit` s) into `tally`."""
    qs = questions()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    next_i = 0
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient):
        nonlocal next_i
        while next_i < n and time.perf_counter() - t0 < time_limit:
            i, next_i = next_i, next_i + 1
            body = {"model": "run", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": qs[(tally.sent + i) % len(qs)]}]}
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                if r.status_code == 200:
                    tally.tokens += r.json()["usage"]["completion_tokens"]
                    tally.latencies.append(time.perf_counter() - start)
                else:
                    tally.errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                tally.errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    tally.wall += time.perf_counter() - t0
    tally.sent += next_i


def metrics(url: str, key: str | None) -> dict:
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}).json()


def measure(urls: dict[str, str], args, key: str | None) -> dict:
    """Warm every server up, then send the requests in rounds that alternate between them.

    Interleaving puts the modes under the same background load (this machine is shared):
    round r sends N/rounds requests to each server, the first server alternating per round.
    """
    for url in urls.values():
        asyncio.run(load(url, args.warmup, args.concurrency, args.max_tokens, args.time_limit, key, Tally()))
    before = {m: metrics(url, key) for m, url in urls.items()}
    tallies = {m: Tally() for m in urls}
    loads = {m: [] for m in urls}
    per_round = -(-args.requests // args.rounds)
    for r in range(args.rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for m in order:
            n = min(per_round, args.requests - tallies[m].sent)
            loads[m].append(round(os.getloadavg()[0], 2))
            left = args.time_limit - tallies[m].wall
            if n > 0 and left > 0:
                asyncio.run(load(urls[m], n, args.concurrency, args.max_tokens, left, key, tallies[m]))
    results = {}
    for m, url in urls.items():
        after = metrics(url, key)
        b = before[m]
        hist = {k: v - b["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
        batches = after["batches"] - b["batches"]
        results[m] = {**tallies[m].summary(args.requests), "warmup_requests": args.warmup,
            "server_rss_mb": {"after_warmup": b["rss_mb"], "end": after["rss_mb"],
                              "growth_pct": round(100 * (after["rss_mb"] - b["rss_mb"]) / b["rss_mb"], 2)},
            "server_batches": batches,
            "server_batch_size_mean": round(sum(int(k) * v for k, v in hist.items()) / batches, 2) if batches else None,
            "server_batch_size_histogram": {k: v for k, v in hist.items() if v},
            "load_average_1m_at_each_round": loads[m],
        }
    return results


def start_server(run: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    afinar = Path(sys.executable).with_name("afinar")
    out = open(log, "w")
    proc = subprocess.Popen([str(afinar), "serve", str(run), "--port", "0", *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"listening on (http://\S+)", log.read_text())
        if m:
            url = m.group(1)
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"afinar serve did not become ready; log:\n{log.read_text()[-3000:]}")


def versions() -> dict:
    import fastapi
    import torch
    import transformers
    import uvicorn

    import afinar

    return {"python": platform.python_version(), "afinar": afinar.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="Run folder to serve (default: build the tiny test run).")
    ap.add_argument("--url", help="Measure this running server instead (one mode, no RSS comparison of modes).")
    ap.add_argument("--api-key", default=os.environ.get("AFINAR_API_KEY"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=64, help="Requests sent before measuring (not counted).")
    ap.add_argument("--time-limit", type=float, default=900, help="Seconds per mode before it stops sending.")
    ap.add_argument("--modes", default="batched,sequential", help="batched, sequential or both.")
    ap.add_argument("--rounds", type=int, default=10, help="Rounds alternating between the modes.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/afinar-serve-load"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="", help="Free text kept in the result (what else ran on the machine).")
    args = ap.parse_args()

    result = {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)") + " python " + shlex.join(
            [os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": versions(),
        "note": args.note,
        "how": "Client and servers on the same machine over loopback (the client's CPU time competes with the server's). "
               "Sequential = the same server with serve.max_batch_size=1. Both servers run at once; the requests go in "
               "rounds alternating between them, so background load falls on both alike. Wall time and rates count "
               "only the measured rounds. RSS from each server's /metrics: growth is from after the warm-up to the end.",
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                     "warmup": args.warmup, "rounds": args.rounds, "decoding": "greedy", "stream": False},
    }
    if args.url:
        result["modes"] = {"external": measure({"external": args.url.rstrip("/")}, args, args.api_key)["external"]}
    else:
        from afinar.synthetic import make_tiny_run

        args.work.mkdir(parents=True, exist_ok=True)
        run = args.run or make_tiny_run(args.work / "tiny-run")
        result["run"] = str(run) if args.run else "afinar.synthetic.make_tiny_run (random 2-layer Mistral, hidden 64, Mistral tokenizer)"
        extra = {"batched": [], "sequential": ["--set", "serve.max_batch_size=1"]}
        servers = {}
        try:  # both servers stay up; the idle one waits on a socket while the other is measured
            for mode in args.modes.split(","):
                servers[mode] = start_server(run, extra[mode], args.work / f"serve-{mode}.log")
            measured = measure({m: url for m, (_, url) in servers.items()}, args, None)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)
        result["modes"] = {m: {"server_args": extra[m], **r} for m, r in measured.items()}
        if {"batched", "sequential"} <= set(result["modes"]):
            b, s = result["modes"]["batched"], result["modes"]["sequential"]
            result["batching_gain"] = {
                "requests_per_s": round(b["requests_per_s"] / s["requests_per_s"], 2),
                "generated_tokens_per_s": round(b["generated_tokens_per_s"] / s["generated_tokens_per_s"], 2),
                "p50_latency": round(s["latency_ms"]["p50"] / b["latency_ms"]["p50"], 2),
            }
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
