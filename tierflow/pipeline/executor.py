"""The compute worker: one thread that runs compute, so the event loop and the disk
threads keep moving while a layer computes (torch releases the GIL inside its kernels).
On CUDA the same worker enqueues kernels on the compute stream; the scheduler logic is
identical on both.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class WorkerStats:
    calls: int       # functions handed to the worker (``run`` calls), finished or not
    busy_s: float    # summed time the worker thread spent running them


class ComputeWorker:
    def __init__(self, name: str = "tierflow-compute", bind_thread: Callable[[], None] | None = None) -> None:
        """``bind_thread`` runs first on the worker's thread (on CUDA: make the engine's device its own)."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=bind_thread)
        self._calls = 0
        self._busy_s = 0.0

    def statistics(self) -> WorkerStats:
        return WorkerStats(self._calls, self._busy_s)

    def _timed(self, fn: Callable[..., R], args: tuple[Any, ...]) -> R:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._busy_s += time.perf_counter() - started

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        self._calls += 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn, args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread is still using its inputs; let it finish before anyone reuses them.
            await asyncio.wait([future])
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True)
