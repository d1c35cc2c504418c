"""The OpenAI-compatible HTTP API over one ``Engine``: a Starlette application.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and
``/v1/models/{id}``), ``GET /health``, ``GET /metrics`` (Prometheus text format). Every
request is one engine request; concurrent HTTP requests share each weight sweep, as concurrent
``engine.generate`` calls do.

Bodies are read up to ``ServerConfig.max_body_bytes`` (413 past it) and validated by the pydantic
models of ``schema.py`` before anything reaches the engine. Errors have the OpenAI shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad body (tierflow's prompt,
sampling and capacity errors included), 401 for a missing or wrong API key, 404 for an unknown
model or route, 413 for an oversized body, 429 when ``max_queue`` requests already wait, 503
while the server drains for shutdown, 500 when the engine fails a request.

A client that goes away cancels its request: a streamed response's generator is closed by the
ASGI server, which cancels the engine request; a non-streamed request is watched for the
client's disconnect while it waits. Either way the engine frees the request's KV at its next
sweep.

The engine is opened by the application's lifespan (``open_engine``), in the server's event loop
— an engine belongs to the loop it was opened on — and closed when the server shuts down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tierflow.engine.api import Engine
from tierflow.errors import (ConfigError, EngineClosedError, PromptError, SamplingError, TierCapacityError,
                             TierflowError)
from tierflow.errors import UnsupportedRequestError as Unsupported
from tierflow.outputs import Completion, StreamChunk, TokenLogprob
from tierflow.server.metrics import ServerMetrics
from tierflow.server.schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("tierflow.server")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """served_model_name: the model id clients send and ``/v1/models`` lists. api_key: when set,
    every ``/v1`` request needs ``Authorization: Bearer <key>``. max_queue: requests that may
    wait beyond the ``max_num_seqs`` the engine runs at once (more get 429). max_body_bytes:
    the largest request body (413 past it). default_max_tokens: the generation limit of a chat
    request that sets neither ``max_tokens`` nor ``max_completion_tokens``."""

    served_model_name: str
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 2**20
    default_max_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("the served model name must not be empty")
        for name in ("max_queue", "max_body_bytes", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                raise ConfigError(f"ServerConfig.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, slots=True)
class APIError:
    """An error response in the OpenAI shape (a value the routes return, not an exception)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {"x-request-id": request_id} if request_id else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def engine_error(exc: TierflowError) -> APIError:
    if isinstance(exc, Unsupported):
        return APIError(400, str(exc), param=exc.param, code="unsupported_parameter")
    """The HTTP status and OpenAI error of a tierflow error raised for one request."""
    if isinstance(exc, PromptError):
        return APIError(400, str(exc), param="messages", code="invalid_prompt")
    if isinstance(exc, (SamplingError, ConfigError)):
        return APIError(400, str(exc), code="invalid_parameter")
    if isinstance(exc, TierCapacityError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, EngineClosedError):
        return APIError(503, "the server is shutting down", type="service_unavailable")
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error")


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}: tierflow does not support it", param=param,
                        code="unsupported_parameter")
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return APIError(400, f"{param or 'body'}: {first['msg']}{more}", param=param, code="invalid_parameter")


class State:
    """What the routes share: the engine, the metrics, the count of live requests."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.metrics = ServerMetrics(self)
        self.live = 0
        self.draining = False

    def queue_length(self) -> int:
        if self.engine is None:
            return 0
        return max(0, self.live - self.engine.config.max_num_seqs)


def create_app(open_engine: Callable[[], Awaitable[Engine]], config: ServerConfig) -> Starlette:
    """The ASGI application. ``open_engine`` is awaited at startup, in the server's loop; the
    engine it returns is closed at shutdown. ``app.state.tierflow`` is the shared ``State``
    (``drain()`` sets it refusing new requests with 503)."""
    state = State(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.engine = await open_engine()
        log.info("serving %s as %r", state.engine.index.directory, config.served_model_name)
        try:
            yield
        finally:
            state.draining = True
            await state.engine.close()
            log.info("engine closed")

    async def health(request: Request) -> Response:
        if state.draining or state.engine is None or state.engine.closed:
            return APIError(503, "shutting down", type="service_unavailable").response()
        return JSONResponse({"status": "ok", "model": config.served_model_name, "live_requests": state.live})

    async def metrics(request: Request) -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    async def models(request: Request) -> Response:
        if (refused := _authorize(request, state)) is not None:
            return refused.response()
        return JSONResponse({"object": "list", "data": [_model_card(config)]})

    async def model(request: Request) -> Response:
        if (refused := _authorize(request, state) or _known_model(request.path_params["model"], state)) is not None:
            return refused.response()
        return JSONResponse(_model_card(config))

    async def chat(request: Request) -> Response:
        return await _complete(request, state, ChatCompletionRequest, "chat")

    async def completions(request: Request) -> Response:
        return await _complete(request, state, CompletionRequest, "text")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(status, str(exc.detail))
        return APIError(status, message, code="not_found" if status == 404 else None).response()

    routes = [Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
              Route("/v1/models/{model:path}", model), Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})
    app.state.tierflow = state
    return app


def _model_card(config: ServerConfig) -> dict[str, Any]:
    return {"id": config.served_model_name, "object": "model", "created": 0, "owned_by": "tierflow"}


def _authorize(request: Request, state: State) -> APIError | None:
    key = state.config.api_key
    if key is None:
        return None
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return None


def _known_model(name: str, state: State) -> APIError | None:
    if name == state.config.served_model_name:
        return None
    return APIError(404, f"the model {name!r} does not exist; this server serves {state.config.served_model_name!r}",
                    param="model", code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes | APIError:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return APIError(413, f"the body has {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return APIError(413, f"the body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        return APIError(400, "the client disconnected while sending the body")
    return b"".join(chunks)


async def _complete(request: Request, state: State, schema: type[ChatCompletionRequest] | type[CompletionRequest],
                    kind: str) -> Response:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    endpoint = "chat" if kind == "chat" else "completions"
    checked = await _checked(request, state, schema)
    if isinstance(checked, APIError):
        state.metrics.finished(endpoint, _outcome(checked.status))
        return checked.response(rid)
    body, params, prompt = checked
    log.info("%s: %s request (user %s)", rid, endpoint, getattr(body, "user", None))
    call = Call(state, rid, kind, body, params, prompt, endpoint)
    if body.stream:
        return await call.streamed(request)
    return await call.whole(request)


async def _checked(request: Request, state: State,
                   schema: type[ChatCompletionRequest] | type[CompletionRequest]) -> APIError | tuple[Any, Any, Any]:
    """The validated body and the engine's params and prompt, or the error reply; nothing here
    reaches the engine."""
    if state.draining or state.engine is None or state.engine.closed:
        return APIError(503, "the server is shutting down; retry on another instance", type="service_unavailable")
    if (refused := _authorize(request, state)) is not None:
        return refused
    raw = await _read_body(request, state.config.max_body_bytes)
    if isinstance(raw, APIError):
        return raw
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as exc:
        return validation_error(exc)
    if (refused := _known_model(body.model, state)) is not None:
        return refused
    try:
        body.refuse_unsupported()
        params, prompt = _engine_request(body, state.config)
    except TierflowError as exc:
        return engine_error(exc)
    if state.live >= state.engine.config.max_num_seqs + state.config.max_queue:
        return APIError(429, f"{state.queue_length()} requests are waiting (the limit is {state.config.max_queue}); "
                             "retry later", type="rate_limit_error", code="queue_full")
    return body, params, prompt


def _outcome(status: int) -> str:
    return {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
            429: "rejected", 503: "unavailable"}.get(status, "error")


def _engine_request(body: ChatCompletionRequest | CompletionRequest, config: ServerConfig) -> tuple[Any, Any]:
    if isinstance(body, ChatCompletionRequest):
        limit = body.max_new_tokens() or config.default_max_tokens
        return body.sampling(limit, body.logprobs_count()), body.chat()
    return body.sampling(body.max_tokens or 16, body.logprobs), body.engine_prompt()


class Call:
    """One HTTP completion request, from its validated body to the response."""

    def __init__(self, state: State, rid: str, kind: str, body: Any, params: Any, prompt: Any,
                 endpoint: str) -> None:
        self.state, self.rid, self.kind, self.body = state, rid, kind, body
        self.params, self.prompt, self.endpoint = params, prompt, endpoint
        self.engine: Engine = state.engine  # type: ignore[assignment]
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.first: float | None = None

    # ------------------------------------------------------------------------------- whole
    async def whole(self, request: Request) -> Response:
        self.state.live += 1
        try:
            done = await _until_disconnected(request, self.engine.generate(self.prompt, self.params))
            if done is DISCONNECTED:
                self._finished("disconnected", 0)
                return Response(status_code=499)
        except TierflowError as exc:
            error = engine_error(exc)
            self._finished(_outcome(error.status), 0)
            return error.response(self.rid)
        finally:
            self.state.live -= 1
        self.first = self.started + done.first_token_s
        self._finished("ok", len(done.token_ids), len(done.prompt_token_ids))
        return JSONResponse(self._whole_body(done), headers={"x-request-id": self.rid})

    def _whole_body(self, done: Completion) -> dict[str, Any]:
        usage = _usage(len(done.prompt_token_ids), len(done.token_ids), done.cached_tokens)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "logprobs": self._chat_logprobs(done.logprobs) if self.params.logprobs is not None else None,
                      "finish_reason": done.finish_reason}
            return {"id": self.rid, "object": "chat.completion", "created": self.created,
                    "model": self.state.config.served_model_name, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": done.text, "finish_reason": done.finish_reason,
                  "logprobs": self._text_logprobs(done.logprobs, 0) if self.params.logprobs is not None else None}
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.state.config.served_model_name, "choices": [choice], "usage": usage}

    # ------------------------------------------------------------------------------ stream
    async def streamed(self, request: Request) -> Response:
        """Wait for the first chunk before answering, so that a request the engine refuses gets
        its status (400, ...) rather than an error inside a 200 stream."""
        self.state.live += 1
        chunks = self.engine.stream(self.prompt, self.params)
        try:
            first = await _until_disconnected(request, anext(chunks))
            if first is DISCONNECTED:
                self.state.live -= 1
                await chunks.aclose()
                self._finished("disconnected", 0)
                return Response(status_code=499)
        except (StopAsyncIteration, TierflowError) as exc:
            self.state.live -= 1
            await chunks.aclose()
            if isinstance(exc, StopAsyncIteration):
                error = APIError(500, "the engine ended the request without a token", type="server_error")
            else:
                error = engine_error(exc)
            self._finished(_outcome(error.status), 0)
            return error.response(self.rid)
        self.first = time.perf_counter()
        return StreamingResponse(self._events(first, chunks), media_type="text/event-stream",
                                 headers={"x-request-id": self.rid, "cache-control": "no-cache"})

    async def _events(self, first: StreamChunk, chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[str]:
        generated, outcome, last = 0, "disconnected", first
        offset = 0
        try:
            if self.kind == "chat":
                yield _sse(self._chunk({"role": "assistant", "content": ""}, None, None))
            chunk: StreamChunk | None = first
            while chunk is not None:
                generated += len(chunk.token_ids)
                last = chunk
                if self.kind == "chat":
                    lp = self._chat_logprobs(chunk.logprobs) if self.params.logprobs is not None else None
                    yield _sse(self._chunk({"content": chunk.text}, lp, chunk.finish_reason))
                else:
                    lp = self._text_logprobs(chunk.logprobs, offset) if self.params.logprobs is not None else None
                    offset += len(chunk.text)
                    yield _sse(self._text_chunk(chunk.text, lp, chunk.finish_reason))
                if chunk.finish_reason is not None:
                    break
                chunk = await anext(chunks, None)
            options = self.body.stream_options
            if options is not None and options.include_usage:
                usage = _usage(last.prompt_tokens, generated, last.cached_tokens)
                yield _sse({"id": self.rid, "object": self._chunk_object(), "created": self.created,
                            "model": self.state.config.served_model_name, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            outcome = "ok"
        except TierflowError as exc:
            error = engine_error(exc)
            outcome = _outcome(error.status)
            log.warning("%s: failed after %d tokens: %s", self.rid, generated, exc)
            yield _sse(error.body())
            yield "data: [DONE]\n\n"
        finally:
            self.state.live -= 1
            await chunks.aclose()         # a client that left: the engine request is cancelled here
            self._finished(outcome, generated, last.prompt_tokens or None)

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _chunk(self, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.state.config.served_model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def _text_chunk(self, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.state.config.served_model_name,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    # ---------------------------------------------------------------------------- logprobs
    def _token(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"

    def _chat_logprobs(self, entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def _text_logprobs(self, entries: tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t): lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    # ----------------------------------------------------------------------------- records
    def _finished(self, outcome: str, generated: int, prompt_tokens: int | None = None) -> None:
        elapsed = time.perf_counter() - self.started
        first = None if self.first is None else self.first - self.started
        self.state.metrics.finished(self.endpoint, outcome, generated=generated, first_token_s=first,
                                    total_s=elapsed, prompt_tokens=prompt_tokens)
        log.info("%s: %s, %d tokens generated in %.2f s%s", self.rid, outcome, generated, elapsed,
                 "" if first is None else f" (first after {first:.2f} s)")


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


DISCONNECTED = object()     # what _until_disconnected returns when the client left first


async def _until_disconnected(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable``; when the client disconnects first, cancel it (which cancels the
    engine request) and return ``DISCONNECTED``."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if work.cancelled():
        return DISCONNECTED
    return work.result()


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
