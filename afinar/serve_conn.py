"""Connection limits that uvicorn lacks: a deadline for the request head, and a cap on open connections.

uvicorn's keep-alive timer starts only after a response, so a client that connects and then
sends nothing, or its headers a byte at a time (slowloris), holds a socket for ever; enough of
them exhaust the process's file descriptors, and then asyncio's accept loop fails on every
new socket (and logs each failure, thousands a second) while nothing else gets in. Here:

- a connection must send a complete request head within `serve.header_timeout_s` of opening,
  and again of each response it was sent (keep-alive); else it is closed;
- beyond `serve.max_connections` open connections (capped below the process's file limit,
  whose soft value is raised to its hard one at start-up) a new connection is closed at once.
"""

from __future__ import annotations

import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("afinar.serve")
SPARE_FILES = 64  # descriptors kept for the model's files, pipes and the log, beyond the connections


def file_limit() -> int | None:
    """Raise the soft limit on open files to the hard one; return it (None where unknown: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit the kernel will not grant (macOS: unlimited): keep the soft one
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with these limits (pass as uvicorn.Config(http=...))."""
    files = file_limit()
    if files is not None:
        max_connections = max(1, min(max_connections, files - SPARE_FILES))

    class Limited(H11Protocol):
        _refused_logged = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = None
            self._served = None  # the request-response cycle answered last; a new one means a new head
            if len(self.connections) > max_connections:
                now = time.monotonic()
                if now - Limited._refused_logged > 10:  # a flood: one line every 10 s, not one a socket
                    Limited._refused_logged = now
                    log.warning("%d connections open (serve.max_connections=%d): closing new ones",
                                len(self.connections) - 1, max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._served = self.cycle
            self._head_timer = self.loop.call_later(header_timeout, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.cycle is self._served and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._served:
                self._disarm()  # a request head arrived; serve.body_timeout_s and request_timeout_s take over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._disarm()
                self._arm()

        def connection_lost(self, exc) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._disarm()
            super().connection_lost(exc)

    return Limited
