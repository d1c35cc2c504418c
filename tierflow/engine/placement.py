"""Placing the weights when an engine opens: the units that do not stream, and the weight
stream over the others, on the CPU (``start_host``) or on a CUDA device (``start_device``).

On the CPU the device is RAM: resident units are loaded in place, and streamed units are read
into a ring of aligned staging buffers that compute uses as they are (no upload). On CUDA the
set-up makes streams, the pinned arena, the units that do not stream, the staging slots in
device memory and the weight stream over disk and host units.

The arena is sized from the plan and allocated once: the host-resident units' cast weights
plus a pinned read buffer per staging slot (none when kvikio reads straight into the device
slots). A host-resident embedding is not uploaded at all: the sweep looks its rows up on the
host. Everything made here is given back if a later step fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import torch

from tierflow.errors import TierCapacityError
from tierflow.pipeline.cuda import DeviceTimeline, EventBridge, StreamPool
from tierflow.pipeline.device import DeviceOps
from tierflow.pipeline.executor import ComputeWorker
from tierflow.pipeline.ring import SlotRing
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.resident import UnitTensors, home_bytes, load_units
from tierflow.stages.upload import SameDevice, StreamUploader, packed, to_device
from tierflow.stages.read import WeightStream
from tierflow.stages.device import DevicePath
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import HOST
from tierflow.tiers.io.pinned import PinnedArena, aligned
from tierflow.tiers.plan.plan import TierPlan
from tierflow.tiers.io.reader import DiskReader, UnitReader, aligned_empty

log = logging.getLogger(__name__)
PIN_NOTICE_BYTES = 1 << 30       # pinning this much or more is announced: it takes a while


@dataclass(frozen=True, slots=True)
class Placement:
    """The weights as the engine runs with them."""
    resident: dict[int, UnitTensors]       # device-resident units, by unit
    stream: WeightStream | None            # None when every unit is resident (or only the embedding is on the host)
    path: DevicePath | None = None         # CUDA: what a sweep needs to run there
    arena: PinnedArena | None = None       # CUDA: pinned host memory of host units and read buffers
    bridge: EventBridge | None = None      # CUDA: staging slots come back through it


async def start_host(index: CheckpointIndex, plan: TierPlan, dtype: torch.dtype, reader: DiskReader,
                     worker: ComputeWorker, *, tracer: Tracer = NULL_TRACER) -> Placement:
    """The CPU path: resident units loaded, the others streamed through aligned staging slots."""
    resident, _ = await load_units(index, plan.tiers, reader, worker, dtype)
    streamed = [index.units[u] for u in plan.streamed]
    if not streamed:
        return Placement(resident, None)
    ring = SlotRing([aligned_empty(plan.device_slot_bytes) for _ in range(plan.num_slots)])
    return Placement(resident, WeightStream(streamed, reader, ring, SameDevice(), tracer))


async def start_device(ops: DeviceOps, index: CheckpointIndex, plan: TierPlan, dtype: torch.dtype,
                       reader: DiskReader, worker: ComputeWorker, *, direct_reader: UnitReader | None = None,
                       tracer: Tracer = NULL_TRACER) -> Placement:
    """``direct_reader`` reads streamed units straight into device memory (kvikio); without it
    they are read into pinned buffers and uploaded on the copy stream."""
    streams = StreamPool(ops.stream)
    timeline = DeviceTimeline(ops, streams.compute)
    host_units = [u for u, tier in enumerate(plan.tiers) if tier == HOST]
    on_disk = [index.units[u] for u in plan.streamed]
    read_slot = aligned(max((layout.buffer_bytes for layout in on_disk), default=0))
    streamed = sorted(set(plan.streamed) | (set(host_units) - {0}))
    slots = plan.num_slots if streamed else 0
    direct = direct_reader is not None
    arena_bytes = (sum(home_bytes(index, u, plan.tiers, dtype) for u in host_units) +
                   (0 if direct else slots * read_slot))
    if arena_bytes >= PIN_NOTICE_BYTES:
        log.info("pinning %.1f GiB of host memory for the host tier and the read buffers", arena_bytes / 2**30)
    # page-locking gigabytes takes seconds: off the event loop
    arena = await asyncio.to_thread(PinnedArena, arena_bytes, ops.pin, ops.unpin)
    bridge = None

    try:
        resident, homes = await load_units(index, plan.tiers, reader, worker, dtype,
                                           to_device=functools.partial(to_device, ops=ops), arena=arena)
        uploader = stream = None
        if streamed:
            device_slot = max([plan.device_slot_bytes, read_slot] +
                              [packed(homes[u])[1] for u in streamed if u in homes])
            device_slots = [ops.empty(device_slot) for _ in range(slots)]
            uploader = StreamUploader(ops, streams, device_slots, timeline, tracer)
            bridge = EventBridge(bind_thread=ops.bind_thread)
            ring = SlotRing(device_slots if direct else [arena.take(read_slot) for _ in range(slots)])
            stream = WeightStream([index.units[u] for u in streamed], direct_reader or reader, ring, uploader, tracer,
                                  homes={u: homes[u] for u in streamed if u in homes}, bridge=bridge)
        path = DevicePath(ops, streams.compute, timeline, uploader, host_units={0: homes[0]} if 0 in homes else {})
        ops.synchronize()
    except BaseException as exc:
        ops.synchronize()
        if bridge is not None:
            bridge.close()
        arena.close()
        if isinstance(exc, torch.OutOfMemoryError):
            raise TierCapacityError(f"the GPU ran out of memory while the engine placed its units ({exc}); the plan "
                                    f"assumed {plan.memory['device'].budget} bytes: lower device_memory_bytes, or free "
                                    "GPU memory that other work holds") from exc
        raise
    return Placement(resident, stream, path, arena, bridge)
