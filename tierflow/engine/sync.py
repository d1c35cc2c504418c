"""A synchronous face for scripts and notebooks: the Engine runs on its own event loop in a
background thread, so this works whether or not the caller already has a running loop.

A SyncEngine that is never closed is closed anyway — its engine on its loop, then the loop —
when it is garbage collected or, at the latest, when the interpreter exits, so its files (the KV
spill file) do not outlive the script. At exit this runs from ``threading``'s exit hook, the one
``concurrent.futures`` uses to stop its pools: registered later, it runs first, while the pools
that closing needs still take work. Only a process killed outright skips it; the next engine in
the same ``kv_cache_dir`` removes what it left.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Coroutine, Iterator, TypeVar

from tierflow.config import EngineConfig, SamplingParams, engine_config_from
from tierflow.engine.api import Engine
from tierflow.engine.loop import new_event_loop
from tierflow.errors import EngineClosedError
from tierflow.outputs import Completion, EngineStats, StreamChunk
from tierflow.engine.requests import Prompt

T = TypeVar("T")


class SyncEngine:
    """``with SyncEngine(model, EngineConfig(...)) as engine: engine.generate(prompt, params)``

    ``config`` and ``params`` take what ``Engine.open`` and ``Engine.generate`` take: the record,
    a dict of its fields, or None. After ``close`` (which may be called again, to no effect)
    every request raises ``EngineClosedError``."""

    def __init__(self, model: str | Path, config: EngineConfig | Mapping[str, Any] | None = None) -> None:
        config = engine_config_from(config)        # a bad config fails before a thread starts
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tierflow-sync-loop", daemon=True)
        self._thread.start()
        try:
            self.engine: Engine = self._call(Engine.open(model, config))
        except BaseException:
            _stop_loop(self._loop, self._thread)
            raise
        self._finalizer = weakref.finalize(self, _shut_down, self.engine, self._loop, self._thread)
        # At exit, before the thread pools stop taking work: closing the engine needs them, and
        # concurrent.futures stops them from this same hook (weakref.finalize's atexit is later).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self._finalizer)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise EngineClosedError("the engine is closed; open a new SyncEngine")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: Prompt, params: SamplingParams | Mapping[str, Any] | None = None) -> Completion:
        return self._call(self.engine.generate(prompt, params))

    def stream(self, prompt: Prompt, params: SamplingParams | Mapping[str, Any] | None = None) -> Iterator[StreamChunk]:
        agen = self.engine.stream(prompt, params)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shut_down(engine: Engine, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Close ``engine`` on ``loop``, then stop the loop and its thread: on ``close``, when a
    SyncEngine is collected unclosed, or at interpreter exit (idempotent)."""
    if not thread.is_alive():
        return
    if threading.current_thread() is thread:     # collected on its own loop thread: it cannot wait for itself
        loop.create_task(_close_and_stop(engine, loop))
        return
    try:
        asyncio.run_coroutine_threadsafe(engine.close(), loop).result()
    finally:
        _stop_loop(loop, thread)


async def _close_and_stop(engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
    try:
        await engine.close()
    finally:
        loop.stop()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
