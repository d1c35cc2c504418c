"""CUDA streams and events, bridged to asyncio.

The CUDA path orders work with events, not host synchronisation: an upload on a copy
stream records an event that the compute stream waits on; the compute of a unit records an
event after which its staging slot may be reused. The scheduler, though, is an asyncio
loop, and it must learn when an event has completed without blocking the loop and without
a core spinning on ``event.query()``.

``EventBridge.wait(event)`` returns an awaitable: the event is handed to a waiter thread
that blocks in ``event.synchronize()`` — with events created ``blocking=True`` the driver
puts that thread to sleep rather than spinning — and resolves the future on the loop with
``call_soon_threadsafe``. An event already complete resolves at once. Events are waited on
in the order given (a stream's events complete in order anyway), by ``threads`` waiters.

``StreamOrderedRing`` wraps a ``SlotRing``: ``release_after(slot, event)`` gives a staging
slot back only once ``event`` (recorded on the compute stream after the compute that read
the slot) has completed, so a copy into that slot can never overtake the kernels still
reading it. Nothing here imports CUDA at module level: streams and events come from a
``DeviceOps`` (``pipeline.device``: ``TorchCuda`` on a GPU; ``tierflow.testing.SimulatedCuda``,
which runs copy streams on threads, in the tests).

``DeviceTimeline`` maps device events onto the host clock: one anchor event is recorded and
waited for when the engine starts, and every later event's time is the anchor's host time
plus the device's own elapsed time between the two. Spans of uploads and compute measured
on the device then sit on the same axis as the host's reads in the trace.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
import time
from typing import Any, Callable

from tierflow.errors import ClosedResourceError
from tierflow.pipeline.device import DeviceOps, Event
from tierflow.pipeline.ring import SlotRing


class DeviceTimeline:
    """Device events on the host's ``time.perf_counter()`` axis."""

    def __init__(self, ops: DeviceOps, stream: Any) -> None:
        self._anchor = ops.record(stream)
        self._anchor.synchronize()
        self._anchor_s = time.perf_counter()

    def time_of(self, event: Event) -> float:
        """Host time at which ``event`` (complete) completed on the device."""
        return self._anchor_s + self._anchor.elapsed_time(event) / 1e3


@dataclass(frozen=True, slots=True)
class BridgeStats:
    waited: int              # events that were not complete when asked for
    immediate: int           # events already complete
    pending: int             # handed to the waiters, not yet complete


class EventBridge:
    def __init__(self, threads: int = 1, name: str = "tierflow-cuda-events",
                 bind_thread: Callable[[], None] | None = None) -> None:
        self._bind = bind_thread
        self._queue: queue.SimpleQueue[tuple[Event, asyncio.AbstractEventLoop, asyncio.Future[None]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()
        self._waited = self._immediate = self._pending = 0
        self._lock = threading.Lock()
        self._closed = False

    def statistics(self) -> BridgeStats:
        with self._lock:
            return BridgeStats(self._waited, self._immediate, self._pending)

    def wait(self, event: Event) -> asyncio.Future[None]:
        """A future (of the running loop) that completes when ``event`` has."""
        if self._closed:
            raise ClosedResourceError("the event bridge is closed: wait() was called after close(); events must "
                                      "be waited on before the bridge (and the engine that owns it) closes")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if event.query():
            with self._lock:
                self._immediate += 1
            future.set_result(None)
            return future
        with self._lock:
            self._waited += 1
            self._pending += 1
        self._queue.put((event, loop, future))
        return future

    def _serve(self) -> None:
        if self._bind is not None:       # the waiters' CUDA calls go to the engine's device, not GPU 0
            self._bind()
        while (item := self._queue.get()) is not None:
            event, loop, future = item
            error: BaseException | None = None
            try:
                event.synchronize()          # sleeps in the driver for events made with blocking=True
            except BaseException as exc:     # noqa: BLE001 - a device error belongs to whoever awaits the event
                error = exc
            with self._lock:
                self._pending -= 1
            try:
                loop.call_soon_threadsafe(_settle, future, error)
            except RuntimeError:             # the loop is closed: nobody is waiting any more
                pass

    def close(self) -> None:
        """Stop the waiters once the events already handed to them are done."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():                # the awaiting task was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class StreamOrderedRing:
    """Staging slots that go back to the ring only when the device has finished with them."""

    def __init__(self, ring: SlotRing[Any], bridge: EventBridge) -> None:
        self.ring, self._bridge = ring, bridge
        self._releases: set[asyncio.Task[None]] = set()

    async def acquire(self) -> int:
        return await self.ring.acquire()

    def release_after(self, slot: int, event: Event) -> None:
        """Give ``slot`` back once ``event`` has completed (at once if it already has)."""
        waiting = self._bridge.wait(event)
        if waiting.done():
            self.ring.release(slot)
            return
        task = asyncio.ensure_future(self._release(slot, waiting))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, slot: int, waiting: asyncio.Future[None]) -> None:
        try:
            await waiting
        finally:          # a device error is reported by the compute that failed; the slot is freed anyway
            self.ring.release(slot)

    async def drain(self) -> None:
        """Wait until every pending release has happened."""
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)


class StreamPool:
    """One compute stream and ``copies`` copy streams, made by ``factory`` (``torch.cuda.Stream``
    on a GPU). Uploads take the copy streams in turn."""

    def __init__(self, factory: Callable[[], Any], copies: int = 1) -> None:
        if copies < 1:
            raise ValueError(f"a stream pool needs at least one copy stream, got {copies}")
        self.compute = factory()
        self.copy = [factory() for _ in range(copies)]
        self._next = 0

    def copy_stream(self) -> Any:
        stream = self.copy[self._next]
        self._next = (self._next + 1) % len(self.copy)
        return stream
