"""Error replies in the OpenAI shape, and the outcome a reply's status is counted under.

Errors have the OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
body (tierflow's prompt, sampling and capacity errors included), 401 for a missing or wrong API
key, 404 for an unknown model or route, 413 for an oversized body, 429 when ``max_queue``
requests already wait, 503 while the server drains for shutdown, 500 when the engine fails a
request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from tierflow.errors import (ConfigError, EngineClosedError, PromptError, SamplingError, TierCapacityError,
                             TierflowError)
from tierflow.errors import UnsupportedRequestError as Unsupported


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
    """The HTTP status and OpenAI error of a tierflow error raised for one request."""
    if isinstance(exc, Unsupported):
        return APIError(400, str(exc), param=exc.param, code="unsupported_parameter")
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


def outcome_of(status: int) -> str:
    return {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
            429: "rejected", 503: "unavailable"}.get(status, "error")
