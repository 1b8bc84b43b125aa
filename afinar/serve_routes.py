"""The routes of `afinar serve` (see serve.py): health, metrics, models, /v1/ask and chat completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from afinar import hardware
from afinar.engine import Draining, QueueFull, SamplingParams
from afinar.engine import Request as EngineRequest
from afinar.errors import AfinarError
from afinar.schemas import AskRequest, ChatRequest
from afinar.serve import ApiError, State

ERROR_CODES = {500: ("server_error", "generation_failed"), 503: ("server_unavailable", "shutting_down")}


def add_routes(app: FastAPI, state: State) -> None:
    def budget(prompt: list[int], requested: int | None, field: str) -> int:
        """max_tokens capped by serve.max_tokens and by what a request may hold after the prompt."""
        tokens = min(requested or state.cfg.max_tokens, state.cfg.max_tokens)
        context = state.engine.max_len
        if context is not None:
            if len(prompt) >= context:
                raise ApiError(400, f"The prompt has {len(prompt)} tokens; a request holds at most {context} tokens, "
                               "prompt and answer (serve.max_context, capped by the model's context). "
                               f"Send a shorter {'question' if field == 'question' else 'conversation'}.",
                               "invalid_request_error", "context_length_exceeded", param=field)
            tokens = min(tokens, context - len(prompt))
        return tokens

    def submit(prompt: list[int], body, max_tokens: int, stop=(), stop_ids=()):
        """Queue one request on the engine; 429 when the queue is full, 503 when draining."""
        try:
            if state.cfg.engine == "continuous":
                job = EngineRequest(prompt, SamplingParams(max_tokens, body.temperature, body.top_p, body.seed,
                                                           tuple(stop), tuple(stop_ids)))
                job.bind(asyncio.get_running_loop())
                return state.engine.submit(job)
            if stop_ids:
                raise ApiError(400, "stop_token_ids needs serve.engine=continuous.", "invalid_request_error",
                               "invalid_field", param="stop_token_ids")
            from afinar.batching import Job

            return state.engine.submit(Job(prompt, max_tokens, body.temperature, body.top_p, body.seed or 0, tuple(stop)))
        except QueueFull as e:
            raise ApiError(429, f"All {state.cfg.queue_size} queue slots are taken; retry in {e.retry_after} s.",
                           "rate_limit_error", "queue_full", {"Retry-After": str(e.retry_after)}) from None
        except Draining:
            raise ApiError(503, "The server is shutting down; retry on another instance.", "server_unavailable",
                           "draining", {"Retry-After": "5"}) from None

    async def finish(job, request: Request, deadline: float):
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
        if job.finish_reason == "error":
            type_, code = ERROR_CODES.get(job.error_status, ERROR_CODES[500])
            raise ApiError(job.error_status, job.error, type_, code,
                           {"Retry-After": "5"} if job.error_status == 503 else None)
        return job

    def prompt_of(p, body: ChatRequest) -> list[int]:
        try:
            return p.prompt([m.plain() for m in body.messages])
        except AfinarError as e:  # the chat template refuses this conversation (roles, order)
            raise ApiError(400, f"messages: {e}", "invalid_request_error", "invalid_field", param="messages") from None

    @app.get("/health")
    async def health():
        body = {"status": state.status, "model": state.predictor.name if state.predictor else None}
        if state.status == "loading":
            body.update(stage=state.stage, stage_elapsed_s=round(time.monotonic() - state.stage_started, 1))
        if state.stages:
            body["stages_s"] = state.stages
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, 200 if state.status == "ready" else 503,
                            headers=None if state.status == "ready" else {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        rss, peak = hardware.process_memory_mb()
        engine = state.engine.metrics() if state.engine else {}
        return {"status": state.status, "uptime_s": round(time.time() - state.started, 1),
                "rss_mb": round(rss, 1), "peak_rss_mb": round(peak, 1), "open_responses": state.open, **engine}

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
        job = submit(prompt, body, budget(prompt, body.max_tokens, "question"))
        state.open += 1
        try:
            await finish(job, request, asyncio.get_running_loop().time() + state.cfg.request_timeout_s)
        finally:
            state.open -= 1
        return p.answer(prompt, job.tokens, job.seconds)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        """OpenAI chat completions: messages in, one choice out; `stream: true` sends server-sent events."""
        p = state.ready()
        prompt = prompt_of(p, body)
        max_tokens = budget(prompt, body.max_completion_tokens or body.max_tokens, "messages")
        job = submit(prompt, body, max_tokens, body.stop or (), body.stop_token_ids)
        deadline = asyncio.get_running_loop().time() + state.cfg.request_timeout_s
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": p.name}
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": len(job.tokens),  # noqa: E731
                         "total_tokens": len(prompt) + len(job.tokens)}
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(job, head, deadline, usage, with_usage, state),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        state.open += 1
        try:
            await finish(job, request, deadline)
        finally:
            state.open -= 1
        return {**head, "object": "chat.completion", "usage": usage(), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": job.text}, "finish_reason": job.finish_reason}]}


async def _events(job, head: dict, deadline: float, usage, with_usage: bool, state: State):
    """Server-sent events of one streamed answer, always ending in `data: [DONE]`."""
    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def error(message: str, type_: str, code: str) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'param': None, 'code': code}})}\n\n"

    state.open += 1
    try:  # closing this generator (client gone) lands in `finally`: the row stops at its next step
        yield chunk({"role": "assistant", "content": ""})
        async for delta in job.deltas(deadline):
            yield chunk({"content": delta})
        if job.finish_reason == "error":
            yield error(job.error, *ERROR_CODES.get(job.error_status, ERROR_CODES[500]))
        else:
            yield chunk({}, job.finish_reason)
            if with_usage:
                yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage()})}\n\n"
    except TimeoutError:
        yield error(f"Not finished within serve.request_timeout_s={state.cfg.request_timeout_s} s.",
                    "server_unavailable", "timeout")
    finally:
        job.cancel()
        state.open -= 1
    yield "data: [DONE]\n\n"
