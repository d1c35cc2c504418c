"""Everything a completion request must pass before it reaches the engine: the server not
draining, the API key, the body's size, its validation, the model's name, what tierflow can
honour, and room in the queue.

Bodies are read up to ``ServerConfig.max_body_bytes`` (413 past it) and validated by the pydantic
models of ``schema.py`` before anything reaches the engine. Each check answers with an
``APIError`` reply rather than raising, so the route counts and returns it like any other reply.
"""

from __future__ import annotations

import hmac
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from tierflow.errors import TierflowError
from tierflow.server.replies import APIError, engine_error, validation_error
from tierflow.server.schema import ChatCompletionRequest, CompletionRequest
from tierflow.server.state import ServerConfig, State


def authorize(request: Request, state: State) -> APIError | None:
    key = state.config.api_key
    if key is None:
        return None
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return None


def known_model(name: str, state: State) -> APIError | None:
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


async def check_request(request: Request, state: State,
                        schema: type[ChatCompletionRequest] | type[CompletionRequest]) -> APIError | tuple[Any, Any, Any]:
    """The validated body and the engine's params and prompt, or the error reply; nothing here
    reaches the engine."""
    if state.draining or state.engine is None or state.engine.closed:
        return APIError(503, "the server is shutting down; retry on another instance", type="service_unavailable")
    if (refused := authorize(request, state)) is not None:
        return refused
    raw = await _read_body(request, state.config.max_body_bytes)
    if isinstance(raw, APIError):
        return raw
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as exc:
        return validation_error(exc)
    if (refused := known_model(body.model, state)) is not None:
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


def _engine_request(body: ChatCompletionRequest | CompletionRequest, config: ServerConfig) -> tuple[Any, Any]:
    if isinstance(body, ChatCompletionRequest):
        limit = body.max_new_tokens() or config.default_max_tokens
        return body.sampling(limit, body.logprobs_count()), body.chat()
    return body.sampling(body.max_tokens or 16, body.logprobs), body.engine_prompt()
