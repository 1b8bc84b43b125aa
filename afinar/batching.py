"""The earlier whole-batch batcher (`serve.engine=static|transformers`), kept to compare with the engine.

The default is the continuous-batching engine (afinar/engine/); this one is selectable so that
benchmarks/serve_load.py can measure both behind the same HTTP layer.

One worker thread owns the backend. It takes the oldest waiting request, waits up to
`batch_window_ms` for more that can share its sampling settings (up to `max_batch_size`),
and generates them in one `Backend.generate` call. Tokens flow back to each request's
asyncio queue as they are produced, through the backend's `on_token` hook; a request whose
client left, whose stop string appeared or whose own `max_tokens` is reached ends its row
through `should_stop`. The batch itself is static: a finished row idles until the longest
row of its batch ends, so new requests wait for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from typing import Callable

from afinar.config import ServeConfig
from afinar.engine.scheduler import Draining, QueueFull

log = logging.getLogger("afinar.serve")

_END = None  # the event that closes a job's stream


class Job:
    """One request: its prompt and settings, then (filled by the worker) its tokens and text.

    `text` is always the concatenation of the deltas streamed so far, so a streamed and an
    unstreamed answer to the same request are identical.
    """

    def __init__(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stops: tuple[str, ...] = ()):
        self.prompt, self.max_tokens = prompt, max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string appeared
        self.cancelled = False  # the client left or timed out: free the row
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_status = 500
        self.batch_size = 0
        self.seconds = 0.0  # wall time of the generate call that answered it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue | None = None

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a generate call (greedy ignores top_p and seed)."""
        return (0.0,) if self.temperature <= 0 else (self.temperature, self.top_p, self.seed)

    def cancel(self) -> None:
        self.cancelled = True

    async def deltas(self, deadline: float):
        """Yield text deltas until the answer ends; raises TimeoutError at `deadline` (loop time)."""
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                item = await asyncio.wait_for(self._events.get(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise TimeoutError from None
            if item is _END:
                return
            yield item

    # ------------------------------------------------ worker side (runs in the worker thread)

    def _emit(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening
            pass

    def _advance(self, target: str) -> None:
        delta = target[len(self.text):]
        if delta:
            self.text += delta
            self._emit(delta)

    def _feed(self, token: int, decode: Callable[[list[int]], str]) -> None:
        """Add one token; stream the text that can no longer change or turn into a stop string."""
        self.tokens.append(token)
        full = decode(self.tokens)
        safe = len(full)
        if self.stops:
            hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                self._advance(full[: min(hits)])
                return
            # Hold back a tail that could still grow into a stop string.
            safe -= max(len(s) for s in self.stops) - 1
        if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            safe = min(safe, len(full) - 1)
        self._advance(full[:max(safe, 0)])

    def _finish(self, decode: Callable[[list[int]], str] | None, error: str | None = None, status: int = 500) -> None:
        if self.finish_reason is not None:
            return
        if error is not None:
            self.error, self.finish_reason, self.error_status = error, "error", status
        elif self.cancelled:
            self.finish_reason = "cancelled"
        else:
            if not self.stopped:
                self._advance(decode(self.tokens))
            self.finish_reason = "length" if len(self.tokens) >= self.max_tokens and not self.stopped else "stop"
        self._emit(_END)


class Batcher:
    """The queue and worker thread between HTTP handlers and `generate`."""

    def __init__(self, generate: Callable, decode: Callable[[list[int]], str], cfg: ServeConfig,
                 context: int | None = None):
        self.generate, self.decode, self.cfg = generate, decode, cfg
        self.max_len = context  # prompt + answer tokens a request may hold (None: the model does not say)
        self._draining = False
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running: list[Job] = []
        self._last_batch_s = 1.0
        self.batch_sizes: Counter[int] = Counter()
        self.counts: Counter[str] = Counter()  # requests, tokens, rejected, cancelled, errors

    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._work, name="afinar-batcher", daemon=True)
        self._thread.start()
        return self

    def drain(self, seconds: float, message: str = "The server is shutting down; retry on another instance.") -> int:
        """Take no new job; wait up to `seconds` for those in flight, then end the rest with `message`."""
        self._deadline = time.monotonic() + seconds
        with self._cv:
            self._draining = True
        while (self._pending or self._running) and time.monotonic() < self._deadline:
            time.sleep(0.05)
        with self._cv:
            left = [*self._pending, *self._running]
            self._pending.clear()
        for job in left:
            job.cancel()  # the running batch drops its rows at the next token
            job._finish(None, message, 503)
        return len(left)

    def hurry(self) -> None:
        """A drain under way (another thread) ends what is still in flight now: a second signal."""
        self._deadline = 0.0

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for job in [*self._pending, *self._running]:  # end every row now; nobody will read them
                job.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        """Queue a job (call from the event loop); raises QueueFull when `queue_size` jobs wait."""
        with self._cv:
            if self._draining:
                raise Draining()
            if len(self._pending) >= self.cfg.queue_size:
                self.counts["rejected"] += 1
                batches_ahead = len(self._pending) / self.cfg.max_batch_size
                raise QueueFull(min(60, max(1, math.ceil(batches_ahead * self._last_batch_s))))
            job._loop = asyncio.get_running_loop()
            job._events = asyncio.Queue()
            self._pending.append(job)
            self.counts["requests"] += 1
            self._cv.notify()
        return job

    def metrics(self) -> dict:
        with self._cv:
            queued = len(self._pending)
        batches = sum(self.batch_sizes.values())
        return {
            "engine": "static",
            "requests": self.counts["requests"],
            "batches": batches,
            "batch_size_max": max(self.batch_sizes, default=0),
            "batch_size_mean": round(sum(k * v for k, v in self.batch_sizes.items()) / batches, 2) if batches else 0,
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queued": queued,
            "generated_tokens": self.counts["tokens"],
            "rejected_queue_full": self.counts["rejected"],
            "cancelled": self.counts["cancelled"],
            "errors": self.counts["errors"],
        }

    # ------------------------------------------------ worker thread

    def _take(self) -> list[Job]:
        """The next batch: the oldest job plus compatible ones arriving within the window."""
        with self._cv:
            while True:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return []
                first = self._pending.popleft()
                if not first.cancelled:
                    break
                self._drop(first)
            batch = [first]
            deadline = time.monotonic() + self.cfg.batch_window_ms / 1000
            while len(batch) < self.cfg.max_batch_size:
                for job in list(self._pending):
                    if len(batch) >= self.cfg.max_batch_size:
                        break
                    if job.cancelled:
                        self._pending.remove(job)
                        self._drop(job)
                    elif job.key == first.key:
                        self._pending.remove(job)
                        batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.cfg.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._cv.wait(remaining)
            return batch

    def _drop(self, job: Job) -> None:
        self.counts["cancelled"] += 1
        job._finish(None)

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()

        def close(job: Job, error: str | None = None) -> None:
            job.batch_size, job.seconds = len(batch), time.perf_counter() - t0
            self.counts["tokens"] += len(job.tokens)
            if job.cancelled and error is None:
                self.counts["cancelled"] += 1
            job._finish(self.decode, error)

        def on_token(row: int, token: int) -> None:
            if batch[row].finish_reason is None:
                batch[row]._feed(token, self.decode)

        def should_stop(row: int) -> bool:
            job = batch[row]
            if job.finish_reason is None and (job.cancelled or job.stopped or len(job.tokens) >= job.max_tokens):
                close(job)  # answer now: a short request need not wait for the batch's longest row
            return job.finish_reason is not None

        first = batch[0]
        self._running = batch
        try:
            self.generate([j.prompt for j in batch], max(j.max_tokens for j in batch), first.temperature,
                          first.top_p, first.seed, on_token=on_token, should_stop=should_stop)
            error = None
        except Exception as e:  # a bug or the device out of memory: fail this batch, keep serving
            log.exception("generate failed for a batch of %d", len(batch))
            error = f"generation failed: {type(e).__name__}: {e}"
            self.counts["errors"] += len(batch)
        self._running = []
        self._last_batch_s = time.perf_counter() - t0
        self.batch_sizes[len(batch)] += 1
        for job in batch:
            if job.finish_reason is None:  # ended by EOS, or by the batch's max_new_tokens
                close(job, error)
