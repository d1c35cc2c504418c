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
``DeviceOps`` (``TorchCuda`` on a GPU; ``tierflow.testing.SimulatedCuda``, which runs copy
streams on threads, in the tests).

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
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol, Sequence

import torch

from tierflow.errors import ClosedResourceError, PinnedMemoryError
from tierflow.pipeline.ring import SlotRing


class Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: Any) -> float: ...     # milliseconds from this event to ``end``


class DeviceOps(Protocol):
    """What the engine's device path needs from a device: streams, events recorded on them,
    waits between them, asynchronous host → device copies, and memory."""

    kind: str                       # the hardware profile's device kind ("cuda")
    device: torch.device            # where device tensors live

    def stream(self) -> Any: ...

    def record(self, stream: Any) -> Event: ...

    def wait(self, stream: Any, event: Event) -> None: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None: ...

    def using(self, stream: Any) -> AbstractContextManager[Any]: ...

    def empty(self, nbytes: int) -> torch.Tensor: ...

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...

    def to_device(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor: ...

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def pin(self, buffer: torch.Tensor) -> None: ...

    def unpin(self, buffer: torch.Tensor) -> None: ...

    def synchronize(self) -> None: ...

    def bind_thread(self) -> None: ...

    def memory_reserved(self) -> int: ...

    def max_memory_reserved(self) -> int: ...

    def reset_peak_memory(self) -> None: ...


def pinned_range(buffer: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) that registering ``buffer`` as pinned memory must cover: all of its
    elements, whatever their size. A buffer that is not contiguous has no such range."""
    if not buffer.is_contiguous():
        raise ValueError("only a contiguous buffer can be pinned: its bytes must be one range")
    return buffer.data_ptr(), buffer.numel() * buffer.element_size()


class TorchCuda:
    """``DeviceOps`` of one CUDA device through torch. Events are made ``blocking`` (a thread
    waiting on one sleeps in the driver) and with timing, for the device timeline. Host
    memory is pinned by registering it (``cudaHostRegister``): the buffer keeps its own
    alignment and size, where torch's pinned allocator would round a 13 GB request up to 16."""

    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def record(self, stream: torch.cuda.Stream) -> "GuardedEvent":
        event = torch.cuda.Event(enable_timing=True, blocking=True)
        event.record(stream)
        return GuardedEvent(event, self.device)

    def wait(self, stream: torch.cuda.Stream, event: "GuardedEvent") -> None:
        stream.wait_event(event.event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def using(self, stream: torch.cuda.Stream) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def to_device(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        """A copy of host ``tensor`` on the device, on the current stream: complete when this
        returns, or (``non_blocking``, from pinned memory) in that stream's order."""
        return tensor.to(self.device, copy=True, non_blocking=non_blocking)

    def record_stream(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)

    def pin(self, buffer: torch.Tensor) -> None:
        ptr, nbytes = pinned_range(buffer)
        if nbytes:
            with torch.cuda.device(self.device):      # registered for this device's context
                _check_cuda(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0), "register")

    def unpin(self, buffer: torch.Tensor) -> None:
        if buffer.numel():
            with torch.cuda.device(self.device):
                _check_cuda(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()), "unregister")

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def bind_thread(self) -> None:
        """Make this device the calling thread's current one: a thread that makes CUDA calls
        without it would create (and hold memory for) a context on GPU 0."""
        torch.cuda.set_device(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def max_memory_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class GuardedEvent:
    """A CUDA event whose calls run with its device current, from whatever thread makes them:
    a thread that has never set its device would otherwise create a context on GPU 0."""

    __slots__ = ("event", "device")

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event, self.device = event, device

    def query(self) -> bool:
        with torch.cuda.device(self.device):
            return self.event.query()

    def synchronize(self) -> None:
        with torch.cuda.device(self.device):
            self.event.synchronize()

    def elapsed_time(self, end: "GuardedEvent") -> float:
        with torch.cuda.device(self.device):
            return self.event.elapsed_time(end.event)


def _check_cuda(status: Any, what: str) -> None:
    if isinstance(status, tuple):        # some bindings return (error, ...)
        status = status[0]
    code = int(getattr(status, "value", status))
    if code:
        try:      # a failed call leaves a sticky error that the next kernel launch check would report as its own
            torch.cuda.cudart().cudaGetLastError()
        except Exception:  # noqa: BLE001 - clearing is best effort; the error below says what failed
            pass
        raise PinnedMemoryError(f"cudaHost{what.capitalize()} failed with CUDA error {code}: pinning host memory "
                                "needs the RAM to be available (see `ulimit -l` in containers); lower the host "
                                "budgets (EngineConfig.host_memory_bytes, kv_host_bytes) or raise the limit")


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
