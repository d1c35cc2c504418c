"""The CUDA-event → asyncio bridge and stream-ordered slot reuse, with fake events on the CPU
(and with real CUDA events where a GPU is present)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tierflow.errors import ClosedResourceError, PinnedMemoryError, TierCapacityError
from tierflow.pipeline.cuda import EventBridge, StreamOrderedRing, StreamPool
from tierflow.pipeline.ring import SlotRing


class FakeEvent:
    """A CUDA event's interface: query() without blocking, synchronize() sleeping until done."""

    def __init__(self, done: bool = False, error: BaseException | None = None) -> None:
        self._done = threading.Event()
        self.error = error
        if done:
            self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error

    def complete(self) -> None:
        self._done.set()


def _later(seconds: float, fn) -> threading.Timer:
    timer = threading.Timer(seconds, fn)
    timer.start()
    return timer


def test_a_completed_event_resolves_at_once():
    async def main():
        bridge = EventBridge()
        try:
            future = bridge.wait(FakeEvent(done=True))
            assert future.done()
            await future
            return bridge.statistics()
        finally:
            bridge.close()

    stats = asyncio.run(main())
    assert stats.immediate == 1 and stats.waited == 0 and stats.pending == 0


def test_waiting_neither_blocks_the_loop_nor_spins_a_core():
    async def main():
        bridge = EventBridge()
        event = FakeEvent()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        cpu, wall = time.process_time(), time.perf_counter()
        _later(0.3, event.complete)
        try:
            await bridge.wait(event)
            return ticks, time.perf_counter() - wall, time.process_time() - cpu, bridge.statistics()
        finally:
            tick_task.cancel()
            bridge.close()

    ticks, wall, cpu, stats = asyncio.run(main())
    assert wall >= 0.29
    assert ticks >= 20                    # the loop ran other tasks all along (a 5 ms ticker)
    assert cpu < 0.5 * wall               # nobody polled the event in a loop
    assert stats.waited == 1 and stats.pending == 0


def test_a_device_error_reaches_whoever_awaits_the_event():
    async def main():
        bridge = EventBridge()
        event = FakeEvent(error=RuntimeError("CUDA error: an illegal memory access"))
        _later(0.05, event.complete)
        try:
            with pytest.raises(RuntimeError, match="illegal memory access"):
                await bridge.wait(event)
            await bridge.wait(FakeEvent(done=True))      # and the bridge goes on
        finally:
            bridge.close()

    asyncio.run(main())


def test_a_cancelled_waiter_is_harmless_when_its_event_completes_later():
    async def main():
        bridge = EventBridge()
        event = FakeEvent()
        waiter = asyncio.ensure_future(bridge.wait(event))
        await asyncio.sleep(0.01)
        waiter.cancel()
        event.complete()
        await asyncio.sleep(0.05)                      # the waiter thread settles a cancelled future: no error
        second = FakeEvent()
        _later(0.02, second.complete)
        await bridge.wait(second)
        bridge.close()
        return waiter.cancelled(), bridge.statistics()

    cancelled, stats = asyncio.run(main())
    assert cancelled and stats.pending == 0


def test_events_complete_in_the_order_a_stream_records_them():
    async def main():
        bridge = EventBridge()
        events = [FakeEvent() for _ in range(5)]
        order: list[int] = []

        async def wait(i):
            await bridge.wait(events[i])
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(5)]
        await asyncio.sleep(0.01)
        for event in events:
            event.complete()
        await asyncio.gather(*tasks)
        bridge.close()
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_a_slot_is_reused_only_after_the_compute_that_read_it_has_finished():
    async def main():
        bridge = EventBridge()
        ring = StreamOrderedRing(SlotRing(["slot0", "slot1"]), bridge)
        a, b = await ring.acquire(), await ring.acquire()
        compute_done = FakeEvent()
        ring.release_after(a, compute_done)               # the kernels reading slot a are still running
        third = asyncio.ensure_future(ring.acquire())
        await asyncio.sleep(0.05)
        blocked = not third.done()
        compute_done.complete()
        got = await asyncio.wait_for(third, 1.0)
        ring.release_after(b, FakeEvent(done=True))       # already finished: back at once
        immediately = ring.ring.acquire_nowait()
        await ring.drain()
        bridge.close()
        return blocked, got, a, immediately, b

    blocked, got, a, immediately, b = asyncio.run(main())
    assert blocked and got == a and immediately == b


def test_the_stream_pool_hands_out_copy_streams_in_turn():
    made = []
    pool = StreamPool(lambda: made.append(object()) or made[-1], copies=2)
    assert pool.compute is made[0] and pool.copy == made[1:]
    assert [pool.copy_stream() for _ in range(4)] == [made[1], made[2], made[1], made[2]]
    with pytest.raises(ValueError):
        StreamPool(object, copies=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_events_through_the_bridge():
    async def main():
        bridge = EventBridge()
        pool = StreamPool(torch.cuda.Stream, copies=1)
        x = torch.randn(4096, 4096, device="cuda")
        with torch.cuda.stream(pool.compute):
            for _ in range(20):
                x = x @ x / 4096
            event = torch.cuda.Event(blocking=True)
            event.record(pool.compute)
        await bridge.wait(event)
        assert event.query()
        bridge.close()

    asyncio.run(main())


def test_a_cuda_error_from_pinning_is_a_clear_error():
    from tierflow.pipeline.device import _check_cuda

    _check_cuda(0, "register")
    _check_cuda((0,), "register")
    with pytest.raises(PinnedMemoryError, match=r"cudaHostRegister failed with CUDA error 2.*lower the host") as info:
        _check_cuda(2, "register")
    assert isinstance(info.value, TierCapacityError) and isinstance(info.value, RuntimeError)


def test_waiting_on_a_closed_bridge_is_a_closed_resource_error():
    async def main():
        bridge = EventBridge()
        bridge.close()
        with pytest.raises(ClosedResourceError, match="the event bridge is closed"):
            bridge.wait(FakeEvent(done=True))

    asyncio.run(main())
