from __future__ import annotations

import asyncio

import pytest

from tierflow.errors import ClosedResourceError, WouldBlock
from tierflow.pipeline.ring import Channel, ChannelStats, SlotRing


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


def test_channel_put_nowait_is_the_twin_of_put():
    ch: Channel[int] = Channel(1)
    ch.put_nowait(1)
    with pytest.raises(WouldBlock):
        ch.put_nowait(2)
    assert ch.get_nowait() == 1
    ch.put_nowait(3)
    assert ch.statistics() == ChannelStats(max_items=1, num_items=1, put_total=2, get_wait_s=0.0, closed=False)


def test_a_full_channel_wakes_a_waiting_put_when_room_frees():
    async def main():
        ch: Channel[int] = Channel(1)
        ch.put_nowait(1)
        blocked = asyncio.create_task(ch.put(2))
        await asyncio.sleep(0)
        assert not blocked.done()
        assert ch.get_nowait() == 1
        await blocked
        assert ch.drain() == [2]

    asyncio.run(main())


def test_a_closed_channel_refuses_puts_and_drains_then_refuses_gets():
    async def main():
        ch: Channel[int] = Channel(3)
        await ch.put(1)
        ch.put_nowait(2)
        ch.close()
        with pytest.raises(ClosedResourceError):
            ch.put_nowait(3)
        with pytest.raises(ClosedResourceError):
            await ch.put(3)
        assert [await ch.get(), ch.get_nowait()] == [1, 2]
        with pytest.raises(ClosedResourceError):
            ch.get_nowait()
        with pytest.raises(ClosedResourceError):
            await ch.get()
        stats = ch.statistics()
        assert stats.closed and stats.num_items == 0 and stats.put_total == 2
        ch.close()                      # closing twice is harmless

    asyncio.run(main())


def test_close_wakes_waiting_gets_and_puts():
    async def main():
        empty: Channel[int] = Channel(1)
        getter = asyncio.create_task(empty.get())
        full: Channel[int] = Channel(1)
        full.put_nowait(1)
        putter = asyncio.create_task(full.put(2))
        await asyncio.sleep(0)
        assert not getter.done() and not putter.done()
        empty.close()
        full.close()
        with pytest.raises(ClosedResourceError):
            await getter
        with pytest.raises(ClosedResourceError):
            await putter
        assert full.get_nowait() == 1       # what was queued before the close is still there

    asyncio.run(main())


def test_a_getter_cancelled_as_it_is_woken_passes_the_item_on():
    async def main():
        ch: Channel[int] = Channel(1)
        first = asyncio.create_task(ch.get())
        second = asyncio.create_task(ch.get())
        await asyncio.sleep(0)
        ch.put_nowait(7)                    # wakes the first getter ...
        first.cancel()                      # ... which is cancelled before it runs
        assert await second == 7
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())


def test_a_channel_is_bounded_by_at_least_one_item():
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        Channel(0)
