"""A synchronous face for scripts and notebooks: the Engine runs on its own event loop in a
background thread, so this works whether or not the caller already has a running loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Coroutine, Iterator, TypeVar

from tierflow.config import EngineConfig, SamplingParams
from tierflow.engine.api import Engine
from tierflow.engine.loop import new_event_loop
from tierflow.errors import EngineClosedError
from tierflow.outputs import Completion, EngineStats, StreamChunk
from tierflow.engine.requests import Prompt

T = TypeVar("T")


class SyncEngine:
    """``with SyncEngine(model, EngineConfig(...)) as engine: engine.generate(prompt, params)``"""

    def __init__(self, model: str | Path, config: EngineConfig | None = None) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tierflow-sync-loop", daemon=True)
        self._thread.start()
        try:
            self.engine: Engine = self._call(Engine.open(model, config))
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise EngineClosedError("the engine is closed; open a new SyncEngine")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        return self._call(self.engine.generate(prompt, params))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
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
        if self._thread.is_alive():
            self._call(self.engine.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
