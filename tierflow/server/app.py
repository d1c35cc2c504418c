"""The OpenAI-compatible HTTP API over one ``Engine``: a Starlette application.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and
``/v1/models/{id}``), ``GET /health``, ``GET /metrics`` (Prometheus text format). Every
request is one engine request; concurrent HTTP requests share each weight sweep, as concurrent
``engine.generate`` calls do.

A completion request is checked (``checks.py``) before anything reaches the engine, then run by
a ``Call`` (``call.py``: the whole reply or the SSE stream, cancelled when the client goes
away); every error is answered in the OpenAI shape (``replies.py``).

The engine is opened by the application's lifespan (``open_engine``), in the server's event loop
— an engine belongs to the loop it was opened on — and closed when the server shuts down.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tierflow.engine.api import Engine
from tierflow.server.call import Call
from tierflow.server.checks import authorize, check_request, known_model
from tierflow.server.replies import APIError, outcome_of
from tierflow.server.schema import ChatCompletionRequest, CompletionRequest
from tierflow.server.state import ServerConfig, State

log = logging.getLogger("tierflow.server")


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
        if (refused := authorize(request, state)) is not None:
            return refused.response()
        return JSONResponse({"object": "list", "data": [_model_card(config)]})

    async def model(request: Request) -> Response:
        if (refused := authorize(request, state) or known_model(request.path_params["model"], state)) is not None:
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


async def _complete(request: Request, state: State, schema: type[ChatCompletionRequest] | type[CompletionRequest],
                    kind: str) -> Response:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    endpoint = "chat" if kind == "chat" else "completions"
    checked = await check_request(request, state, schema)
    if isinstance(checked, APIError):
        state.metrics.finished(endpoint, outcome_of(checked.status))
        return checked.response(rid)
    body, params, prompt = checked
    log.info("%s: %s request (user %s)", rid, endpoint, getattr(body, "user", None))
    call = Call(state, rid, kind, body, params, prompt, endpoint)
    if body.stream:
        return await call.streamed(request)
    return await call.whole(request)
