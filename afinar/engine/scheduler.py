"""The continuous-batching engine: requests join the running batch at the next step and leave it when done.

Framework-free: the model work is a `Runner`'s (plan.py). One thread loops: admit waiting
requests into free rows, run one step (prefill chunks of new prompts, one decode token for every
running row), hand each token to its request (stop tokens, stop strings, max_tokens), free the
rows that ended. A row never waits for another: a finished row frees its slot at once, and a
long prompt is prefilled a chunk per step while the other rows keep decoding.

Failures stay with their rows: an error the runner pins on some rows (`RowError`) fails those
requests only; any other error in a step fails the rows of that step, resets the runner and the
engine keeps serving. `drain()` stops admitting, lets the running requests finish within a
deadline, then ends the rest with an error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from typing import Callable

from afinar.engine.plan import RowError, Runner
from afinar.engine.request import Request, SamplingParams, deliver
from afinar.errors import AfinarError

log = logging.getLogger("afinar.engine")
WINDOW = 4096  # latency samples kept for the percentiles of /metrics


class QueueFull(Exception):
    """`queue_size` requests wait already; `retry_after` is a guess, in seconds, of when one frees."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The engine is shutting down and takes no new request."""


class Engine:
    """Requests in, tokens out, one shared batch. See the module docstring."""

    def __init__(self, runner: Runner, decode: Callable[[list[int]], str], stop_ids, queue_size: int = 256):
        self.runner = runner
        self.decode = decode
        self.stop_ids = frozenset(stop_ids)
        self.queue_size = queue_size
        self.max_rows, self.max_len = runner.max_rows, runner.max_len
        self._waiting: deque[Request] = deque()
        self._rows: list[Request | None] = [None] * self.max_rows
        self._cv = threading.Condition()
        self._drive = threading.Lock()  # one thread steps the runner at a time
        self._thread: threading.Thread | None = None
        self._stopping = self._draining = False
        self._abort: tuple[str, int] | None = None
        self._deadline = float("inf")  # of a drain under way
        self._outbox: list = []
        self._started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.samples = {k: deque(maxlen=WINDOW) for k in ("queue_wait_s", "ttft_s", "itl_s", "step_rows")}

    # ------------------------------------------------ life cycle

    def start(self) -> "Engine":
        """Run the loop in a background thread (the server); without it, `generate` drives the loop itself."""
        self._thread = threading.Thread(target=self._loop, name="afinar-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every request now (cancelled) and the loop with it."""
        with self._cv:
            self._stopping = True
            for req in [*self._waiting, *self._rows]:
                if req is not None:
                    req.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def drain(self, seconds: float, message: str = "The server is shutting down; retry on another instance.") -> int:
        """Take no new request; wait up to `seconds` for those in flight, then end the rest with `message`.

        Returns how many were ended that way.
        """
        with self._cv:
            self._deadline = time.monotonic() + seconds
            self._draining = True
            while self._in_flight() and time.monotonic() < self._deadline:
                self._cv.wait(min(0.1, max(self._deadline - time.monotonic(), 0)))
            left = self._in_flight()
            if left:
                self._abort = (message, 503)
                self._cv.notify_all()
        if left and self._thread is None:
            self._iterate(block=False)
        with self._cv:
            while self._in_flight() and self._thread is not None and self._thread.is_alive():
                self._cv.wait(0.1)
        return left

    def hurry(self) -> None:
        """A drain under way (another thread) ends what is still in flight now: a second signal."""
        with self._cv:
            self._deadline = 0.0
            self._cv.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def stopped(self) -> bool:
        return self._stopping

    # ------------------------------------------------ submitting

    def submit(self, req: Request, limit_queue: bool = True) -> Request:
        """Queue a request (any thread). Raises QueueFull, Draining, or ValueError for a prompt too long."""
        if len(req.prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(req.prompt)} tokens; a request holds at most {self.max_len} "
                             "(prompt + answer)")
        with self._cv:
            if self._draining or self._stopping:
                raise Draining()
            if limit_queue and len(self._waiting) >= self.queue_size:
                self.counts["rejected"] += 1
                raise QueueFull(self._retry_after())
            self._waiting.append(req)
            self.counts["requests"] += 1
            self._cv.notify_all()
        return req

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = 0,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None) -> list[list[int]]:
        """Blocking batch generation through the engine (`ask`, `eval`): new token ids per prompt, no stop token.

        The signature of `Backend.generate`: `on_token(row, token)` sees each token as it is
        made; a row for which `should_stop(row)` turns True ends there.
        """
        requests = []
        for row, prompt in enumerate(prompts):
            if len(prompt) >= self.max_len:
                raise AfinarError(f"Prompt {row} has {len(prompt)} tokens; this model answers prompts of at most "
                                  f"{self.max_len - 1} (serve.max_context, capped by the model's context).")
            params = SamplingParams(min(max_new_tokens, self.max_len - len(prompt)), temperature, top_p, seed)
            hook = (lambda t, row=row: on_token(row, t)) if on_token is not None else None
            stop = (lambda row=row: should_stop(row)) if should_stop is not None else None
            requests.append(Request(prompt, params, hook, stop))
        for req in requests:
            self.submit(req, limit_queue=False)
        if self._thread is None:
            with self._drive:
                while not all(r.done for r in requests):
                    self._iterate(block=False)
        for req in requests:
            req.wait()
        failed = next((r for r in requests if r.finish_reason == "error"), None)
        if failed is not None:
            raise RuntimeError(failed.error)
        return [r.tokens for r in requests]

    # ------------------------------------------------ reporting

    def metrics(self) -> dict:
        """Counters, rows and KV slots in use, and p50/p95 of queue wait, time to first token, inter-token latency."""
        with self._cv:
            running = [r for r in self._rows if r is not None]
            queued = len(self._waiting)
        out = {
            "engine": "continuous",
            "requests": self.counts["requests"], "queued": queued, "running_rows": len(running),
            "kv_slots_in_use": len(running), "kv_slots": self.max_rows,
            "kv_tokens_in_use": sum(len(r.prompt) + len(r.tokens) for r in running),
            "kv_tokens": self.max_rows * self.max_len,
            "steps": self.counts["steps"], "generated_tokens": self.counts["tokens"],
            "rejected_queue_full": self.counts["rejected"], "cancelled": self.counts["cancelled"],
            "errors": self.counts["errors"],
        }
        for key, values in self.samples.items():
            data = sorted(values)
            if key == "step_rows":
                out["rows_per_step_mean"] = round(sum(data) / len(data), 2) if data else 0
                out["rows_per_step_max"] = data[-1] if data else 0
                continue
            name = key.removesuffix("_s") + "_ms"
            out[name] = {p: round(1000 * data[min(len(data) - 1, int(q * len(data)))], 2) if data else None
                         for p, q in (("p50", 0.50), ("p95", 0.95))}
        return out

    # ------------------------------------------------ the loop (one thread at a time)

    def _in_flight(self) -> int:
        return len(self._waiting) + sum(r is not None for r in self._rows)

    def _retry_after(self) -> int:
        rate = self.counts["finished"] / max(time.monotonic() - self._started, 1e-3) if self.counts["finished"] else 0
        return min(60, max(1, math.ceil(len(self._waiting) / rate))) if rate else 5

    def _loop(self) -> None:
        while self._iterate(block=True):
            pass

    def _iterate(self, block: bool) -> bool:
        with self._cv:
            while block and not self._stopping and self._abort is None and not self._waiting \
                    and not self.runner.busy() and not any(self._rows):
                self._cv.wait()
            if self._stopping:
                self._end_all("cancelled", None, 0)
                return False
            if self._abort is not None:
                message, status = self._abort
                self._abort = None
                self._end_all("error", message, status)
                self._cv.notify_all()
                return True
            admitted = self._admit()
        for req in admitted:
            try:
                self.runner.add(req, req.slot, req.prompt, req.params)
            except Exception as e:  # noqa: BLE001 - this request's fault or not, it alone fails
                log.exception("admitting a request failed")
                self._fail([req], e)
        self._reap()
        if self.runner.busy():
            self._step()
        elif any(self._rows):  # rows the runner no longer holds would wait forever (and this loop spin)
            self._fail([r for r in self._rows if r is not None], RuntimeError("the runner lost these rows"))
        deliver(self._outbox)
        with self._cv:
            self._cv.notify_all()  # drain() and generate() wait on it
        return True

    def _admit(self) -> list[Request]:
        admitted = []
        free = [i for i, r in enumerate(self._rows) if r is None]
        while self._waiting and free:
            req = self._waiting.popleft()
            if req.cancelled:
                self._close(req, "cancelled")
                continue
            slot = free.pop(0)
            self._rows[slot] = req
            req._start(self.decode, slot)
            self.samples["queue_wait_s"].append(req.timing.admitted - req.timing.submitted)
            admitted.append(req)
        return admitted

    def _reap(self) -> None:
        for req in self._rows:
            if req is not None and req.cancelled:
                self._close(req, "cancelled")

    def _step(self) -> None:
        try:
            produced = self.runner.step()
        except RowError as e:
            log.error("generation failed for %d row(s): %s", len(e.handles), e)
            self._fail([h for h in e.handles if isinstance(h, Request) and not h.done], e.cause)
            produced = e.produced
        except Exception as e:  # noqa: BLE001 - a bug or the device out of memory: fail these rows, keep serving
            log.exception("an engine step failed")
            running = [r for r in self._rows if r is not None]
            self._fail(running, e)
            self.runner.reset()
            return
        self.counts["steps"] += 1
        if produced:  # a row may bring two tokens (its first, from the prefill, and the next)
            self.samples["step_rows"].append(len({id(h) for h, _ in produced}))
        for req, token in produced:
            if req.done:
                continue  # a token of a step launched before its request ended
            try:
                self._feed(req, token)
            except Exception as e:  # noqa: BLE001 - e.g. the tokenizer cannot decode it: this row only
                log.exception("handling a token failed")
                self._fail([req], e)

    def _feed(self, req: Request, token: int) -> None:
        now = time.monotonic()
        t = req.timing
        if t.first_token is None:
            t.first_token = now
            self.samples["ttft_s"].append(now - t.submitted)
        else:
            self.samples["itl_s"].append(now - t.last_token)
        t.last_token = now
        if token in self.stop_ids or token in req.params.stop_token_ids:
            self._close(req, "stop")
            return
        self.counts["tokens"] += 1
        if req._push_token(token, self._outbox) or (req.should_stop is not None and req.should_stop()):
            self._close(req, "stop")
        elif len(req.tokens) >= req.params.max_tokens:
            self._close(req, "length")

    def _close(self, req: Request, reason: str, error: str | None = None, status: int = 500) -> None:
        if req.slot is not None and self._rows[req.slot] is req:
            self._rows[req.slot] = None
            try:
                self.runner.remove(req.slot)
            except Exception:  # noqa: BLE001 - the request is over either way
                log.exception("freeing row %d failed", req.slot)
        if reason == "cancelled":
            self.counts["cancelled"] += 1
        self.counts["finished"] += 1
        req._finish(reason, self._outbox, error, status)

    def _fail(self, requests: list[Request], cause: BaseException) -> None:
        self.counts["errors"] += len(requests)
        for req in requests:
            self._close(req, "error", f"generation failed: {type(cause).__name__}: {cause}", 500)

    def _end_all(self, reason: str, error: str | None, status: int) -> None:
        for req in [*self._waiting, *(r for r in self._rows if r is not None)]:
            self._close(req, reason, error, status)
        self._waiting.clear()
        self.runner.reset()
        deliver(self._outbox)
