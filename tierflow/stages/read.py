"""Getting a unit's weights to compute: the read and upload stages, and tensor views.

``WeightStream`` owns the streamed units. One producer task walks them in sweep order,
cyclically — weights do not depend on tokens, so it runs ahead of compute by the ring's
size, across the boundary from one sweep into the next — acquiring a staging slot,
starting the unit's read (and upload) as a task, and handing it to the consumer through a
bounded channel. The consumer (the sweep runner) takes units in the same order; the time it
waits for a read that has not finished is the *stall*. A failed read is delivered to the
consumer of that unit only; the stream stays aligned and goes on with the next.

On CUDA the stream also carries the host-resident units (``homes``: their weights, kept in
pinned memory, need no read, only an upload), each unit comes with the event its upload
records (the compute stream waits on it), and a slot goes back to the ring once the event
recorded after its compute has completed (``release(loaded, after=event)``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from tierflow.pipeline.cuda import EventBridge, StreamOrderedRing
from tierflow.pipeline.device import Event
from tierflow.pipeline.ring import Channel, ChannelStats, RingStats, SlotRing
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.upload import Uploader
from tierflow.tiers.checkpoint.index import UnitLayout
from tierflow.tiers.io.reader import UnitReader


def cast_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Explicit dtype conversion of floating weights (a copy only where dtypes differ); packed
    integer tensors (MXFP4 blocks and scales) stay as they are."""
    return {k: v if v.dtype == dtype or not v.dtype.is_floating_point else v.to(dtype) for k, v in weights.items()}


@dataclass(slots=True)
class LoadedUnit:
    unit: int
    weights: dict[str, torch.Tensor]
    slot: int
    ready: Event | None = None          # the upload's event (CUDA): compute waits for it


@dataclass(frozen=True, slots=True)
class StreamStats:
    units_read: int      # unit reads completed (host-resident units are uploaded, not read: not counted)
    units_consumed: int  # units handed to compute (one per streamed unit per sweep)
    bytes_read: int      # bytes the reader delivered for those reads
    read_s: float        # summed wall time of unit reads (they overlap each other and compute)
    upload_s: float      # summed device time of the uploads (the uploader's ``UploadStats.upload_s``; 0 on CPU)
    stall_s: float       # time compute waited for weights
    busy_s: float        # time at least one read was in flight (the disk stage's busy time)


class WeightStream:
    def __init__(self, layouts: list[UnitLayout], reader: UnitReader, ring: SlotRing[torch.Tensor],
                 uploader: Uploader, tracer: Tracer = NULL_TRACER, *,
                 homes: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
                 bridge: EventBridge | None = None) -> None:
        self._layouts, self._reader, self._ring, self._uploader = layouts, reader, ring, uploader
        self._tracer, self._homes = tracer, dict(homes or {})
        self._ordered = StreamOrderedRing(ring, bridge) if bridge is not None else None
        self._channel: Channel[tuple[int, int, asyncio.Task[tuple[dict[str, torch.Tensor], Event | None]]]] = \
            Channel(len(ring.slots))
        self._task: asyncio.Task[None] | None = None
        self._units_read = self._units_consumed = self._bytes_read = 0
        self._read_s = self._stall_s = 0.0
        self._in_flight, self._busy_since, self._busy_s = 0, 0.0, 0.0

    def statistics(self) -> StreamStats:
        busy = self._busy_s + (time.perf_counter() - self._busy_since if self._in_flight else 0.0)
        return StreamStats(self._units_read, self._units_consumed, self._bytes_read, self._read_s,
                           self._uploader.statistics().upload_s,
                           self._stall_s, busy)

    def ring_statistics(self) -> RingStats:
        return self._ring.statistics()

    def channel_statistics(self) -> ChannelStats:
        return self._channel.statistics()

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(layout.unit for layout in self._layouts)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._produce(), name="tierflow-weight-stream")

    async def _produce(self) -> None:
        while True:
            for layout in self._layouts:
                slot = await self._ring.acquire()
                task = asyncio.create_task(self._load(layout, slot), name=f"tierflow-read-{layout.name}")
                await self._channel.put((layout.unit, slot, task))

    async def _load(self, layout: UnitLayout, slot: int) -> tuple[dict[str, torch.Tensor], Event | None]:
        home = self._homes.get(layout.unit)
        if home is not None:                 # host-resident: already in pinned memory, only uploaded
            return self._uploader.upload_tensors(home, slot, layout.name)
        started = time.perf_counter()
        if self._in_flight == 0:
            self._busy_since = started
        self._in_flight += 1
        try:
            nbytes = await self._reader.read(layout, self._ring.slots[slot])
        finally:
            self._in_flight -= 1
            read_done = time.perf_counter()
            if self._in_flight == 0:
                self._busy_s += read_done - self._busy_since
        self._tracer.span("disk: weights", layout.name, started, read_done, bytes=nbytes, slot=slot)
        weights, ready = self._uploader.upload(self._ring.slots[slot], slot, layout)
        self._bytes_read += nbytes
        self._read_s += read_done - started
        self._units_read += 1
        return weights, ready

    async def next(self, unit: int) -> LoadedUnit:
        """The weights of ``unit``, which must be the next streamed unit in sweep order."""
        self.start()
        started = time.perf_counter()
        got, slot, task = await self._channel.get()
        if got != unit:
            raise RuntimeError(f"weight stream out of order: expected unit {unit}, the stream holds {got}")
        try:
            weights, ready = await task
        except BaseException:
            self._ring.release(slot)
            raise
        finally:
            self._stall_s += time.perf_counter() - started
        self._units_consumed += 1
        return LoadedUnit(unit, weights, slot, ready)

    def release(self, loaded: LoadedUnit, after: Event | None = None) -> None:
        """Give the unit's slot back: now, or once ``after`` (recorded after its compute on
        the device) has completed."""
        if after is None or self._ordered is None:
            self._ring.release(loaded.slot)
        else:
            self._ordered.release_after(loaded.slot, after)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        pending = self._channel.drain()
        for _, _, task in pending:
            task.cancel()
        await asyncio.gather(*(task for _, _, task in pending), return_exceptions=True)
        for _, slot, _ in pending:
            self._ring.release(slot)
        if self._ordered is not None:
            await self._ordered.drain()
