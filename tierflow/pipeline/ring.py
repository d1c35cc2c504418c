"""Bounded primitives the stages are built on: a ring of reusable slots and a bounded
channel. Both are asyncio-only (one event loop), both expose ``statistics()`` returning a
frozen record, and every blocking call has a ``*_nowait`` twin. Backpressure comes from
them: a reader that runs ahead waits for a free slot, it never sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from tierflow.errors import ClosedResourceError, WouldBlock

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RingStats:
    num_slots: int
    num_free: int
    num_waiting: int
    acquired_total: int
    wait_s: float


class SlotRing(Generic[T]):
    """A fixed set of preallocated slots (buffers), handed out and returned by index."""

    def __init__(self, slots: list[T]) -> None:
        self.slots = slots
        self._free: deque[int] = deque(range(len(slots)))
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._acquired_total = 0
        self._wait_s = 0.0
        self._closed = False

    def statistics(self) -> RingStats:
        return RingStats(len(self.slots), len(self._free), len(self._waiters), self._acquired_total, self._wait_s)

    def acquire_nowait(self) -> int:
        if self._closed:
            raise ClosedResourceError("slot ring is closed")
        if not self._free or self._waiters:
            raise WouldBlock
        self._acquired_total += 1
        return self._free.popleft()

    async def acquire(self) -> int:
        try:
            return self.acquire_nowait()
        except WouldBlock:
            pass
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        started = time.perf_counter()
        try:
            index = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():      # handed a slot just as we were cancelled
                self.release(fut.result())
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise
        self._wait_s += time.perf_counter() - started
        self._acquired_total += 1
        return index

    def release(self, index: int) -> None:
        if index in self._free or not 0 <= index < len(self.slots):
            raise ValueError(f"slot {index} released twice or out of range")
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(index)
                return
        self._free.append(index)

    def close(self) -> None:
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ClosedResourceError("slot ring is closed"))


@dataclass(frozen=True, slots=True)
class ChannelStats:
    max_items: int
    num_items: int
    put_total: int
    get_wait_s: float    # time consumers waited on an empty channel


class Channel(Generic[T]):
    """A bounded FIFO between one producer and one consumer."""

    def __init__(self, max_items: int) -> None:
        self._queue: asyncio.Queue[T] = asyncio.Queue(max_items)
        self._put_total = 0
        self._get_wait_s = 0.0

    def statistics(self) -> ChannelStats:
        return ChannelStats(self._queue.maxsize, self._queue.qsize(), self._put_total, self._get_wait_s)

    async def put(self, item: T) -> None:
        await self._queue.put(item)
        self._put_total += 1

    def get_nowait(self) -> T:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            raise WouldBlock from None

    async def get(self) -> T:
        started = time.perf_counter()
        item = await self._queue.get()
        self._get_wait_s += time.perf_counter() - started
        return item

    def drain(self) -> list[T]:
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items
