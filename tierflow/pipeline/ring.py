"""Bounded primitives the stages are built on: a ring of reusable slots and a bounded
channel. Both are asyncio-only (one event loop), both expose ``statistics()`` returning a
frozen record, every blocking call has a ``*_nowait`` twin (which raises ``WouldBlock``
where the blocking call would wait), and both can be closed (``ClosedResourceError``, also
for the callers waiting at that moment). Backpressure comes from them: a reader that runs
ahead waits for a free slot, it never sleeps.
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
    num_slots: int          # slots the ring was made with
    num_free: int           # of which not handed out now
    num_waiting: int        # ``acquire`` calls waiting for a slot
    acquired_total: int     # slots handed out so far
    wait_s: float           # summed time ``acquire`` calls waited for a slot


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
    max_items: int       # the bound: ``put`` waits while this many items are queued
    num_items: int       # items queued now
    put_total: int       # items put so far
    get_wait_s: float    # time consumers waited on an empty channel
    closed: bool         # ``close()`` was called: no more puts; gets drain what is left


class Channel(Generic[T]):
    """A bounded FIFO between producers and consumers.

    ``close()`` ends the channel: from then on ``put`` / ``put_nowait`` raise
    ``ClosedResourceError``; ``get`` / ``get_nowait`` still return the items queued before
    it, then raise ``ClosedResourceError``; callers waiting in ``put`` or ``get`` are woken
    and raise it too. ``drain()`` takes every queued item at once, closed or not."""

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1 (a channel is bounded), got {max_items}")
        self._max_items = max_items
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()   # woken when an item arrives or on close
        self._putters: deque[asyncio.Future[None]] = deque()   # woken when room frees or on close
        self._put_total = 0
        self._get_wait_s = 0.0
        self._closed = False

    def statistics(self) -> ChannelStats:
        return ChannelStats(self._max_items, len(self._items), self._put_total, self._get_wait_s, self._closed)

    def put_nowait(self, item: T) -> None:
        if self._closed:
            raise ClosedResourceError("channel is closed: put after close()")
        if len(self._items) >= self._max_items:
            raise WouldBlock
        self._items.append(item)
        self._put_total += 1
        _wake_one(self._getters)

    async def put(self, item: T) -> None:
        while True:
            try:
                return self.put_nowait(item)
            except WouldBlock:
                pass
            await _wait_in(self._putters)

    def get_nowait(self) -> T:
        if self._items:
            item = self._items.popleft()
            _wake_one(self._putters)
            return item
        if self._closed:
            raise ClosedResourceError("channel is closed and drained: get after close()")
        raise WouldBlock

    async def get(self) -> T:
        started = time.perf_counter()
        try:
            while True:
                try:
                    return self.get_nowait()
                except WouldBlock:
                    pass
                await _wait_in(self._getters)
        finally:
            self._get_wait_s += time.perf_counter() - started

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        for _ in items:
            _wake_one(self._putters)
        return items

    def close(self) -> None:
        """No more puts; what is queued can still be got. Wakes every waiter."""
        self._closed = True
        for waiters in (self._getters, self._putters):
            while waiters:
                _wake_one(waiters)


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)
            return


async def _wait_in(waiters: deque[asyncio.Future[None]]) -> None:
    """Wait until woken; a waiter cancelled just after it was woken passes the wake-up on."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled():
            _wake_one(waiters)
        elif fut in waiters:
            waiters.remove(fut)
        raise
