"""One completion request on the engine, from its validated body to the response: the whole
JSON reply or the SSE stream, the OpenAI logprobs shapes, and what the metrics and the log record
when it finishes.

A client that goes away cancels its request: a streamed response's generator is closed by the
ASGI server, which cancels the engine request; a non-streamed request is watched for the
client's disconnect while it waits (``disconnect.py``). Either way the engine frees the request's
KV at its next sweep.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tierflow.engine.api import Engine
from tierflow.errors import TierflowError
from tierflow.outputs import Completion, StreamChunk, TokenLogprob
from tierflow.server.disconnect import DISCONNECTED, until_disconnected
from tierflow.server.replies import APIError, engine_error, outcome_of
from tierflow.server.state import State

log = logging.getLogger("tierflow.server")


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
            done = await until_disconnected(request, self.engine.generate(self.prompt, self.params))
            if done is DISCONNECTED:
                self._finished("disconnected", 0)
                return Response(status_code=499)
        except TierflowError as exc:
            error = engine_error(exc)
            self._finished(outcome_of(error.status), 0)
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
            first = await until_disconnected(request, anext(chunks))
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
            self._finished(outcome_of(error.status), 0)
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
            outcome = outcome_of(error.status)
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

