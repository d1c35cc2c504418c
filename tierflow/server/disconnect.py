"""Awaiting an engine call while watching the client: when the client disconnects first, the
call is cancelled (which cancels the engine request). It is separate because it speaks ASGI
messages, not the OpenAI API."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable

from starlette.requests import Request

DISCONNECTED = object()     # what until_disconnected returns when the client left first


async def until_disconnected(request: Request, awaitable: Awaitable[Any]) -> Any:
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
