"""`afinar serve`: a run behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: POST /v1/chat/completions (plain or server-sent events), POST /v1/ask (the object
`afinar ask` prints), GET /v1/models, GET /health, GET /metrics, and /openapi.json.
Generation goes through `Predictor` and the backend interface only (torch or MLX), batched
by `afinar.batching`. Every error, bad input included, is one JSON shape:
{"error": {"message", "type", "code"}}; 500 is kept for real bugs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import sys
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from afinar import __version__, hardware
from afinar.batching import Batcher, Job, QueueFull
from afinar.config import ServeConfig
from afinar.errors import AfinarError
from afinar.schemas import AskRequest, ChatRequest

log = logging.getLogger("afinar.serve")
PROTECTED = ("/v1/", "/metrics")  # /health and the OpenAPI spec stay open for probes and tooling


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, type_: str, code: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.type, self.code = type_, code


HTTP_ERRORS = {  # status -> (type, code) for errors raised by the framework itself
    400: ("invalid_request_error", "bad_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "body_too_large"),
}


def error_response(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status, headers=headers)


def _field_errors(errors: list[dict]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        got = f" (got {json.dumps(e['input'], default=str)[:80]})" if "input" in e and e.get("type") != "missing" else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


class Guard:
    """ASGI middleware: API key (before the body is read), then the body size limit."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key_digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key_digest and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED):
            given = hashlib.sha256(headers.get(b"authorization", b"")).digest()
            if not hmac.compare_digest(given, self.key_digest):  # constant time: no key prefix leaks
                reply = error_response(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                                       "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                return await reply(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            status, what = (413, f"{int(length)} bytes") if length.isdigit() else (400, f"Content-Length {length!r}")
            reply = error_response(status, f"Request body of {what}: the limit is {self.max_body} bytes.",
                                   "invalid_request_error", "body_too_large" if status == 413 else "bad_request")
            return await reply(scope, receive, send)
        seen = 0

        async def limited_receive():  # chunked bodies carry no Content-Length: count as they arrive
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, f"Request body over the limit of {self.max_body} bytes.")
            return message

        await self.app(scope, limited_receive, send)


class State:
    """What the routes share: the predictor once loaded, its batcher, and the loading status."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.status, self.error = "loading", None
        self.predictor = None
        self.batcher: Batcher | None = None
        self.started = time.time()
        self.on_failure = lambda: None  # `run` stops the CLI's server: a model that cannot load serves nothing

    def attach(self, predictor) -> None:
        decode = lambda ids: predictor.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        predictor.context_length  # read the model's config now, not in the first request
        self.batcher = Batcher(predictor.backend.generate, decode, self.cfg)
        self.batcher.start()
        self.predictor, self.status = predictor, "ready"

    def load(self, run: Path, verify: bool = True) -> None:
        from afinar.inference import Predictor

        try:
            self.attach(Predictor(run, serve=self.cfg, verify=verify))
            log.warning("afinar serve: %s loaded", run)
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
            state.attach(predictor)
        else:
            threading.Thread(target=state.load, args=(Path(run), verify), name="afinar-load", daemon=True).start()
        yield
        if state.batcher is not None:
            state.batcher.stop()

    app = FastAPI(title="afinar", version=__version__, lifespan=lifespan,
                  description="An afinar run served with OpenAI's chat completions API.")
    app.state.afinar = state
    app.add_middleware(Guard, api_key=api_key, max_body=cfg.max_body_kb * 1024)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _add_error_handlers(app)
    _add_routes(app, state)
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
        return error_response(422, _field_errors(errors), "invalid_request_error", "invalid_field")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if isinstance(exc, ApiError):
            return error_response(exc.status_code, exc.detail, exc.type, exc.code, exc.headers)
        type_, code = HTTP_ERRORS.get(exc.status_code, ("invalid_request_error", str(exc.status_code)))
        return error_response(exc.status_code, str(exc.detail), type_, code, exc.headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"Internal error: {type(exc).__name__}.", "server_error", "internal_error")


def _add_routes(app: FastAPI, state: State) -> None:
    def submit(job: Job) -> Job:
        try:
            return state.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"All {state.cfg.queue_size} queue slots are taken; retry in {e.retry_after} s.",
                           "rate_limit_error", "queue_full", {"Retry-After": str(e.retry_after)}) from None

    async def finish(job: Job, request: Request, deadline: float) -> Job:
        """Wait for a job; a client that leaves frees its row, one that waits too long gets a 503."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for _ in job.deltas(deadline):
                pass
        except TimeoutError:
            job.cancel()
            raise ApiError(503, f"Not answered within serve.request_timeout_s={state.cfg.request_timeout_s} s.",
                           "server_unavailable", "timeout", {"Retry-After": "5"}) from None
        finally:
            watcher.cancel()
        if job.error:
            raise ApiError(500, job.error, "server_error", "generation_failed")
        return job

    def budget(p, prompt: list[int], requested: int | None) -> int:
        """max_tokens capped by serve.max_tokens and by what the model's context leaves after the prompt."""
        tokens = min(requested or state.cfg.max_tokens, state.cfg.max_tokens)
        context = p.context_length
        if context is not None:
            if len(prompt) >= context:
                raise ApiError(422, f"The prompt has {len(prompt)} tokens; the model reads at most {context}. "
                               "Send a shorter conversation.", "invalid_request_error", "context_length_exceeded")
            tokens = min(tokens, context - len(prompt))
        return tokens

    @app.get("/health")
    async def health():
        body = {"status": state.status, "model": state.predictor.name if state.predictor else None}
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, 200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics():
        rss, peak = hardware.process_memory_mb()
        batching = state.batcher.metrics() if state.batcher else {}
        return {"status": state.status, "uptime_s": round(time.time() - state.started, 1),
                "rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1), **batching}

    @app.get("/v1/models")
    async def models():
        p = state.ready()
        return {"object": "list", "data": [{"id": p.name, "object": "model", "created": int(state.started),
                                            "owned_by": "afinar", "base_model": p.cfg.model.base}]}

    @app.post("/v1/ask")
    async def ask(body: AskRequest, request: Request):
        """The JSON object `afinar ask RUN QUESTION` prints."""
        p = state.ready()
        prompt = p.prompt(body.question)
        job = submit(Job(prompt, budget(p, prompt, body.max_tokens), body.temperature, body.top_p, body.seed or 0))
        await finish(job, request, asyncio.get_running_loop().time() + state.cfg.request_timeout_s)
        return p.answer(prompt, job.tokens, job.seconds)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        """OpenAI chat completions: messages in, one choice out; `stream: true` sends server-sent events."""
        p = state.ready()
        try:
            prompt = p.prompt([m.plain() for m in body.messages])
        except AfinarError as e:  # the chat template refuses this conversation (roles, order)
            raise ApiError(422, f"messages: {e}", "invalid_request_error", "invalid_field") from None
        max_tokens = budget(p, prompt, body.max_completion_tokens or body.max_tokens)
        job = submit(Job(prompt, max_tokens, body.temperature, body.top_p, body.seed or 0, tuple(body.stop or ())))
        deadline = asyncio.get_running_loop().time() + state.cfg.request_timeout_s
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": p.name}
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": len(job.tokens),  # noqa: E731
                         "total_tokens": len(prompt) + len(job.tokens)}
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(job, head, deadline, usage, with_usage, state.cfg),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await finish(job, request, deadline)
        return {**head, "object": "chat.completion", "usage": usage(), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": job.text}, "finish_reason": job.finish_reason}]}


async def _events(job: Job, head: dict, deadline: float, usage, with_usage: bool, cfg: ServeConfig):
    """Server-sent events of one streamed answer, ending in `data: [DONE]`."""
    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def error(message: str, type_: str, code: str) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'code': code}})}\n\n"

    try:  # closing this generator (client gone) lands in `finally`: the row stops at its next token
        yield chunk({"role": "assistant", "content": ""})
        async for delta in job.deltas(deadline):
            yield chunk({"content": delta})
        if job.error:
            yield error(job.error, "server_error", "generation_failed")
        else:
            yield chunk({}, job.finish_reason)
            if with_usage:
                yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage()})}\n\n"
    except TimeoutError:
        yield error(f"Not finished within serve.request_timeout_s={cfg.request_timeout_s} s.", "server_unavailable", "timeout")
    finally:
        job.cancel()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- running it


class Server(uvicorn.Server):
    """uvicorn's server, which says where it listens once bound (port 0 picks a free port)."""

    announce = False

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.announce and self.started:
            print(f"afinar serve: listening on {self.url}", file=sys.stderr, flush=True)


def run(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve until Ctrl-C, printing the bound URL (the CLI's path)."""
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    server.announce = True
    state: State = app.state.afinar
    state.on_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.status == "failed":
        raise AfinarError(f"Could not load the model: {state.error}")
    if not server.started:
        raise AfinarError(f"Could not listen on {host}:{port} (in use, or not an address of this machine).")


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", timeout: float = 60):
    """Run `app` on a free port in a background thread (tests, notebooks); yields the base URL."""
    server = Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
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
