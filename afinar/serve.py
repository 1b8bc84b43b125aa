"""`afinar serve`: a run behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: POST /v1/chat/completions (plain or server-sent events), POST /v1/ask (the object
`afinar ask` prints), GET /v1/models, GET /health, GET /metrics, and /openapi.json.
Generation goes through the continuous-batching engine (afinar/engine/), or with
`serve.engine=static|transformers` through the earlier whole-batch batcher (afinar/batching.py).
Every error, bad input included, is one JSON shape: {"error": {"message", "type", "param",
"code"}}; 500 is kept for real bugs and failed generations. The routes are in serve_routes.py.

On SIGTERM/SIGINT the server drains (`Server.handle_exit`): new requests get 503 with
Retry-After and /health says 'draining'; requests in flight get serve.drain_seconds to finish,
then end with a clean error (a 503 body, or an SSE error event and `data: [DONE]`); then it
exits 0. A second signal ends the requests still in flight at once (the same clean errors), a
third stops without waiting for anything. Connections that send no request head in time, or
beyond serve.max_connections, are closed (serve_conn.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from afinar import __version__
from afinar.config import ServeConfig
from afinar.errors import AfinarError
from afinar.schemas import describe_errors

log = logging.getLogger("afinar.serve")
PROTECTED = ("/v1/", "/metrics")  # /health and the OpenAPI spec stay open for probes and tooling


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, type_: str, code: str, headers: dict | None = None,
                 param: str | None = None):
        super().__init__(status, message, headers)
        self.type, self.code, self.param = type_, code, param


HTTP_ERRORS = {  # status -> (type, code) for errors raised by the framework itself
    400: ("invalid_request_error", "bad_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "body_timeout"),
    413: ("invalid_request_error", "body_too_large"),
}


def error_response(status: int, message: str, type_: str, code: str, headers: dict | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


class Guard:
    """ASGI middleware: draining, API key (before the body is read), body size limit, slow-body timeout."""

    def __init__(self, app, state: "State", api_key: str | None, max_body: int, body_timeout: float):
        self.app, self.state, self.max_body, self.body_timeout = app, state, max_body, body_timeout
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.state.status == "draining" and scope["path"].startswith("/v1/"):
            reply = error_response(503, "The server is shutting down; retry on another instance.",
                                   "server_unavailable", "draining", {"Retry-After": "5"})
            return await reply(scope, receive, send)
        if self.key_digest and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED):
            scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
            given = hashlib.sha256(token.strip()).digest()  # a hash: the comparison's time says nothing of the key
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, self.key_digest):  # scheme: any case (RFC 7235)
                reply = error_response(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                                       "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await reply(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            status, what = (413, f"{int(length)} bytes") if length.isdigit() else (400, f"Content-Length {length!r}")
            reply = error_response(status, f"Request body of {what}: the limit is {self.max_body} bytes.",
                                   "invalid_request_error", "body_too_large" if status == 413 else "bad_request")
            return await reply(scope, receive, send)
        seen, complete, deadline = 0, False, None

        async def limited_receive():  # chunked bodies carry no Content-Length: count as they arrive
            nonlocal seen, complete, deadline
            if complete:  # after the body: only http.disconnect comes, whenever the client leaves
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:  # one deadline for the whole body, not for each piece of it
                deadline = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise HTTPException(408, f"The request body did not arrive within serve.body_timeout_s="
                                         f"{self.body_timeout} s.") from None
            complete = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, f"Request body over the limit of {self.max_body} bytes.")
            return message

        await self.app(scope, limited_receive, send)


def say(message: str) -> None:
    """Start-up progress on stderr (the CLI's log)."""
    print(f"afinar serve: {message}", file=sys.stderr, flush=True)


class State:
    """What the routes share: the predictor and engine once loaded, and the loading / draining status."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.status, self.error = "loading", None
        self.stage, self.stage_started, self.stages = "starting", time.monotonic(), {}
        self.predictor = None
        self.engine = None  # engine.Engine, or batching.Batcher for serve.engine=static|transformers
        self.open = 0  # answers being sent (drain waits for them)
        self.loading_thread: threading.Thread | None = None
        self.started = time.time()
        self.on_failure = lambda: None  # `run` stops the CLI's server: a model that cannot load serves nothing

    @contextlib.contextmanager
    def step(self, name: str):
        """A loading stage: shown by /health while it runs, logged with its time to stderr."""
        self.stage, self.stage_started = name, time.monotonic()
        say(f"{name} ...")
        yield
        self.stages[name] = round(time.monotonic() - self.stage_started, 2)
        say(f"{name}: {self.stages[name]:.1f} s")

    def attach(self, predictor) -> None:
        backend = predictor.backend
        if self.cfg.engine == "continuous":
            from afinar.engine import build

            engine = build(backend.model, backend.tokenizer, self.cfg, backend.name)
            engine.model, backend._engine = backend.model, engine  # `Predictor.ask` in this process shares it
            with self.step(f"warm-up ({type(engine.runner).__name__}, {engine.max_rows} rows x {engine.max_len} tokens)"):
                engine.runner.warm_up(say)
        else:
            from afinar.batching import Batcher

            if backend.name != "torch":
                raise AfinarError(f"serve.engine={self.cfg.engine} needs the torch backend; this run uses "
                                  f"{backend.name}. Use serve.engine=continuous.")
            generate = lambda *a, **k: backend.generate_static(*a, plain=self.cfg.engine == "transformers", **k)  # noqa: E731
            decode = lambda ids: predictor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            engine = Batcher(generate, decode, self.cfg, predictor.context_length)
        # The engine thread and the event loop share the GIL. When the engine comes back from the
        # device (a step's tokens) while the loop is busy writing streamed chunks, CPython hands it
        # the GIL only after the switch interval (5 ms by default: as long as a 7B decode step).
        # 0.5 ms (serve.switch_interval_ms) keeps that wait far below a step, for a few more thread switches.
        sys.setswitchinterval(self.cfg.switch_interval_ms / 1000)
        self.engine = engine.start()
        self.predictor, self.status, self.stage = predictor, "ready", None
        say(f"ready in {time.time() - self.started:.1f} s")

    def load(self, run: Path, verify: bool = True) -> None:
        from afinar.inference import Predictor

        try:
            with self.step("loading model + adapter (merged where faster)"):
                predictor = Predictor(run, serve=self.cfg, verify=verify)
            self.attach(predictor)
        except Exception as e:  # noqa: BLE001 - reported by /health and every request, not a silent dead thread
            if not isinstance(e, AfinarError):
                log.exception("loading %s failed", run)
            self.status, self.error = "failed", str(e)
            self.on_failure()

    def ready(self):
        if self.status != "ready":
            message = f"Model {self.status}" + (f": {self.error}" if self.error else "; retry shortly.")
            raise ApiError(503, message, "server_unavailable", self.status, {"Retry-After": "5"})
        return self.predictor

    def drain(self) -> None:
        """Refuse new requests; give those in flight serve.drain_seconds, then end them cleanly."""
        if self.status == "ready":
            self.status = "draining"
        if self.engine is not None:
            left = self.engine.drain(self.cfg.drain_seconds)
            if left:
                say(f"drain: {left} request(s) not finished within serve.drain_seconds={self.cfg.drain_seconds}; ended")
        deadline = time.monotonic() + 5
        while self.open and time.monotonic() < deadline:  # the last answers' bytes
            time.sleep(0.02)


def create_app(run: str | Path | None = None, predictor=None, cfg: ServeConfig | None = None,
               api_key: str | None = None, cors_origins: list[str] | tuple[str, ...] = (),
               verify: bool = True) -> FastAPI:
    """The app for a run folder (loaded in the background; /health says when) or a loaded Predictor."""
    if (run is None) == (predictor is None):
        raise ValueError("create_app needs a run folder or a Predictor, not both")
    cfg = cfg or (predictor.cfg.serve if predictor is not None else ServeConfig())
    state = State(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if predictor is not None:
            await asyncio.to_thread(state.attach, predictor)
        else:
            state.loading_thread = threading.Thread(target=state.load, args=(Path(run), verify), name="afinar-load",
                                                    daemon=True)
            state.loading_thread.start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="afinar", version=__version__, lifespan=lifespan,
                  description="An afinar run served with OpenAI's chat completions API.")
    app.state.afinar = state
    app.add_middleware(Guard, state=state, api_key=api_key, max_body=cfg.max_body_kb * 1024,
                       body_timeout=cfg.body_timeout_s)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_error_handlers(app)
    from afinar.serve_routes import add_routes

    add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(isinstance(e.get("input"), bytes) for e in errors):  # a body FastAPI did not read as JSON
            return error_response(400, "The body must be a JSON object sent with 'Content-Type: application/json'.",
                                  "invalid_request_error", "invalid_json")
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = errors[0].get("ctx", {})
            return error_response(400, f"Malformed JSON body: {ctx.get('error', 'not valid JSON')}.",
                                  "invalid_request_error", "invalid_json")
        message, param = describe_errors(errors)
        return error_response(400, message, "invalid_request_error", "invalid_field", param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc, ApiError):
            return error_response(exc.status_code, exc.detail, exc.type, exc.code, exc.headers, exc.param)
        type_, code = HTTP_ERRORS.get(exc.status_code, ("invalid_request_error", str(exc.status_code)))
        return error_response(exc.status_code, str(exc.detail), type_, code, exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"Internal error: {type(exc).__name__}.", "server_error", "internal_error")


# ---------------------------------------------------------------- running it


class Server(uvicorn.Server):
    """uvicorn's server, which says where it listens once bound (port 0 picks a free port) and drains on a signal."""

    announce = False

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.announce and self.started:
            print(f"afinar serve: listening on {self.url}", file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's: it would stop accepting at once and re-raise the signal after shutdown
        # (exit status 128+n). Here the first signal drains, then the server exits 0; a second ends
        # the requests in flight now, each with its clean error (uvicorn's force_exit would cancel
        # their tasks: bare 500s and streams cut without [DONE]); a third forces the exit.
        state: State | None = getattr(getattr(self.config.app, "state", None), "afinar", None)
        draining = getattr(self, "_draining", False)
        if state is None or getattr(self, "_hurried", False) or (self.should_exit and not draining):
            self.force_exit = self.should_exit = True
            return
        if draining:
            self._hurried = True
            say(f"signal {sig} again: ending the requests in flight now")
            if state.engine is not None:
                state.engine.hurry()
            return
        self._draining = True
        say(f"signal {sig}: draining (new requests get 503; up to serve.drain_seconds={state.cfg.drain_seconds} s "
            "for those in flight)")

        def drain():
            state.drain()
            self.should_exit = True

        threading.Thread(target=drain, name="afinar-drain", daemon=True).start()


def config(app: FastAPI, cfg: ServeConfig, host: str, port: int, log_level: str) -> uvicorn.Config:
    from afinar.serve_conn import protocol

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                          timeout_keep_alive=cfg.keep_alive_s, http=protocol(cfg.header_timeout_s, cfg.max_connections))


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not listening yet), or an AfinarError saying why not and what to do."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # in use, not this machine's address, or a host name that does not resolve
        sock.close()
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            fix = "Give --host an address of this machine (127.0.0.1, or 0.0.0.0 for every one)."
        else:
            fix = "Stop what holds it, or use another --port (--port 0 picks a free one)."
        raise AfinarError(f"Cannot listen on {host}:{port}: {e.strerror or e}. {fix}") from None
    sock.set_inheritable(True)
    return sock


def run(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve until a signal, printing the bound URL (the CLI's path)."""
    state: State = app.state.afinar
    sock = bind(host, port)  # before the model loads: a port in use is a clean error, not a load to abort
    server = Server(config(app, state.cfg, host, port, log_level))
    server.announce = True
    state.on_failure = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    if state.engine is not None:  # a forced exit skips the lifespan's shutdown: the engine thread must not
        state.engine.stop()       # be inside torch when the interpreter finalizes
    if state.loading_thread is not None and state.loading_thread.is_alive():
        # A signal during loading: the loading thread is inside torch or safetensors, and an
        # interpreter that finalizes under it can abort (std::terminate, exit status 134). Nothing
        # was served and nothing is to be saved: leave now.
        say("stopped while loading")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if state.status == "failed":
        raise AfinarError(f"Could not load the model: {state.error}")
    if not server.started:
        raise AfinarError(f"Could not listen on {host}:{port} (in use, or not an address of this machine).")


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", timeout: float = 60):
    """Run `app` on a free port in a background thread (tests, notebooks); yields the base URL."""
    server = Server(config(app, app.state.afinar.cfg, host, 0, "warning"))
    thread = threading.Thread(target=server.run, name="afinar-uvicorn", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
