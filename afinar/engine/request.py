"""One request of the engine: its sampling settings, its tokens and text, and how it reaches its reader.

Framework-free. A `Request` is filled by the engine's thread (`_push_token`, `_finish`) and read
either by an asyncio reader (`deltas()`, the HTTP server) or by a blocking one (`wait()`,
`Engine.generate`). Its `text` is always the concatenation of the deltas streamed so far, so a
streamed and an unstreamed answer to the same request are identical.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

# Below this a temperature only magnifies rounding (1e-300 turns logits into inf/nan): such
# temperatures are taken as 0, greedy, which is their limit. Documented in schemas.py and the README.
TEMPERATURE_FLOOR = 1e-2
# Any top_p at or below the likeliest token's probability (>= 1/vocab, far above this) keeps that
# token alone; below float32's range (1e-46) a top_p would round to 0 on the device and keep nothing.
TOP_P_FLOOR = 1e-30
SEED_BITS = 64  # a seed is used modulo 2**64: any int64 (the API's range) maps to itself


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; nothing here depends on the other requests of its batch.

    temperature 0 (or below TEMPERATURE_FLOOR) is greedy. A sampled request draws from its own
    stream, a function of `seed` and the token's position only. `seed=None` draws a fresh seed.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature >= 0:  # also refuses nan
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < TEMPERATURE_FLOOR:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_p < TOP_P_FLOOR:
            object.__setattr__(self, "top_p", TOP_P_FLOOR)
        seed = secrets.randbits(SEED_BITS) if self.seed is None else self.seed % 2**SEED_BITS
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TextStream:
    """Incremental detokenisation: each token's new text, from a short window of tokens.

    Decoding the whole answer at every token costs O(n) per token; decoding from a window that
    starts a few tokens back keeps the tokenizer's spacing rules right at O(1) per token (the
    method of text-generation-inference and vLLM). A token that ends mid-character (U+FFFD) waits.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix:self.read])
        after = self.decode(self.tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return after[len(before):]
        return ""


_END = object()  # closes a request's stream of deltas


@dataclass
class Timing:
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Request:
    """A prompt and its settings, then (filled by the engine) its tokens, text and how it ended.

    `finish_reason`: 'stop' (EOS, a stop token or string), 'length', 'cancelled' or 'error';
    with 'error', `error` is the message and `error_status` the HTTP status it maps to
    (500 a failure in generation, 503 the server shutting down).
    """

    def __init__(self, prompt: list[int], params: SamplingParams,
                 on_token: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None):
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        self.prompt, self.params = list(prompt), params
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_status = 500
        self.cancelled = False
        self.slot: int | None = None
        self.timing = Timing()
        self.on_token, self.should_stop = on_token, should_stop  # Engine.generate's per-row hooks
        self._stream: TextStream | None = None
        self._decoded = ""  # all text decoded so far; `text` lags it by what a stop string could still claim
        self._cut = False  # a stop string ended the answer: `text` is final
        self._done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue | None = None

    # ------------------------------------------------ reader side

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def seconds(self) -> float:
        """Wall time from submission to the end (or to now)."""
        return (self.timing.finished or time.monotonic()) - self.timing.submitted

    def cancel(self) -> None:
        """The reader left or gave up: the engine frees the row at its next step."""
        self.cancelled = True

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stream to an asyncio reader on `loop` (call on that loop before submitting)."""
        self._loop, self._events = loop, asyncio.Queue()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request ends; False if `timeout` passed first."""
        return self._done.wait(timeout)

    async def deltas(self, deadline: float):
        """Text deltas until the answer ends; raises TimeoutError at `deadline` (loop time).

        Deltas waiting together are joined: a reader that falls behind gets fewer, larger chunks.
        """
        while True:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                items = [await asyncio.wait_for(self._events.get(), remaining)]
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise TimeoutError from None
            while not self._events.empty() and items[-1] is not _END:
                items.append(self._events.get_nowait())
            ended = items[-1] is _END
            text = "".join(items[:-1] if ended else items)
            if text:
                yield text
            if ended:
                return

    # ------------------------------------------------ engine side (the engine's thread)

    def _start(self, decode: Callable[[list[int]], str], slot: int | None) -> None:
        self._stream = TextStream(decode)
        self.slot = slot
        self.timing.admitted = time.monotonic()

    def _push_token(self, token: int, outbox: list) -> bool:
        """Add one generated token (not a stop token); returns True when a stop string ended the answer."""
        self.tokens.append(token)
        self._decoded += self._stream.push(token)
        if self.on_token is not None:
            self.on_token(token)
        stops = self.params.stop
        safe = len(self._decoded)
        if stops:
            start = max(0, len(self.text) - max(len(s) for s in stops))
            hits = [i for i in (self._decoded.find(s, start) for s in stops) if i >= 0]
            if hits:
                self._advance(self._decoded[: min(hits)], outbox)
                self._cut = True
                return True
            safe -= max(len(s) for s in stops) - 1  # hold back a tail that could still become a stop string
        self._advance(self._decoded[:max(safe, 0)], outbox)
        return False

    def _advance(self, target: str, outbox: list) -> None:
        if len(target) > len(self.text):
            outbox.append((self, target[len(self.text):]))
            self.text = target

    def _finish(self, reason: str, outbox: list, error: str | None = None, status: int = 500) -> None:
        if self.done:
            return
        if reason in ("stop", "length") and self._stream is not None and not self._cut:
            # The last tokens' text: what the window held back, and any tail the full decode differs in.
            full = self._stream.decode(self.tokens)
            self._advance(full if full.startswith(self.text) else self._decoded, outbox)
        self.finish_reason, self.error, self.error_status = reason, error, status
        self.timing.finished = time.monotonic()
        outbox.append((self, _END))
        self._done.set()


def deliver(outbox: list) -> None:
    """Hand the deltas of one engine step to their readers: one wake-up per event loop, not per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for request, item in outbox:
        if request._loop is not None:
            by_loop.setdefault(request._loop, []).append((request._events, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            pass
    outbox.clear()


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)
