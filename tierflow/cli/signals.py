"""Ending ``tierflow`` cleanly. SIGTERM and Ctrl-C cancel the command's task, so the engine closes
and removes its files (the KV spill file) before the process exits; the first-run conversion
runs on a daemon thread that exit does not wait for (the hidden partial output it leaves is
removed by the next run)."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


class Termination:
    """Whether SIGTERM cancelled the command (set by ``until_terminated``'s handler)."""

    def __init__(self) -> None:
        self.signalled = False


async def until_terminated(coro: Coroutine[Any, Any, T], termination: Termination) -> T:
    """Run ``coro``; SIGTERM cancels it, as the event loop's runner does for Ctrl-C, so it
    unwinds through its ``async with`` blocks (the engine closes) instead of dying mid-write."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def terminate() -> None:
        if not termination.signalled:   # a second SIGTERM must not interrupt the clean-up
            termination.signalled = True
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError, ValueError):   # no signals here, or not the main thread
        return await coro
    try:
        return await coro
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def on_daemon_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a daemon thread. Unlike ``asyncio.to_thread``, exiting does not wait for it:
    Ctrl-C or SIGTERM during the first-run conversion ends the process at once."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:   # handed to the awaiting task, which raises it
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass                        # the loop has closed: nobody waits for this any more

    threading.Thread(target=work, name="tierflow-convert", daemon=True).start()
    return await future
