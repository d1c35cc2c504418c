from __future__ import annotations

import asyncio

import pytest

from tierflow.errors import ClosedResourceError, WouldBlock
from tierflow.pipeline.ring import Channel, SlotRing


def test_ring_hands_out_each_slot_once_and_waits():
    async def main():
        ring = SlotRing(["a", "b"])
        x, y = ring.acquire_nowait(), await ring.acquire()
        assert {x, y} == {0, 1}
        with pytest.raises(WouldBlock):
            ring.acquire_nowait()
        waiter = asyncio.create_task(ring.acquire())
        await asyncio.sleep(0)
        assert ring.statistics().num_waiting == 1
        ring.release(x)
        assert await waiter == x
        with pytest.raises(ValueError):
            ring.release(5)
        ring.release(y)
        with pytest.raises(ValueError):
            ring.release(y)
        assert ring.statistics().num_free == 1

    asyncio.run(main())


def test_cancelled_waiter_does_not_leak_a_slot():
    async def main():
        ring = SlotRing([0])
        held = await ring.acquire()
        waiter = asyncio.create_task(ring.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        ring.release(held)          # the slot went to the waiter just as it was cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert ring.statistics().num_free == 1

    asyncio.run(main())


def test_close_wakes_waiters():
    async def main():
        ring = SlotRing([0])
        await ring.acquire()
        waiter = asyncio.create_task(ring.acquire())
        await asyncio.sleep(0)
        ring.close()
        with pytest.raises(ClosedResourceError):
            await waiter

    asyncio.run(main())


def test_channel_is_bounded():
    async def main():
        ch: Channel[int] = Channel(2)
        await ch.put(1)
        await ch.put(2)
        blocked = asyncio.create_task(ch.put(3))
        await asyncio.sleep(0.01)
        assert not blocked.done() and ch.statistics().num_items == 2
        assert await ch.get() == 1
        await blocked
        assert ch.drain() == [2, 3]
        with pytest.raises(WouldBlock):
            ch.get_nowait()

    asyncio.run(main())
