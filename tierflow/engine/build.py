"""Setting up the CUDA path when an engine opens: streams, the pinned arena, the units that do
not stream, the staging slots in device memory and the weight stream over disk and host units.

The arena is sized from the plan and allocated once: the host-resident units' cast weights
plus a pinned read buffer per staging slot (none when kvikio reads straight into the device
slots). A host-resident embedding is not uploaded at all: the sweep looks its rows up on the
host. Everything made here is given back if a later step fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tierflow.adapters import ModelSpec
from tierflow.config import EngineConfig
from tierflow.errors import ConfigError, TierCapacityError
from tierflow.pipeline.cuda import DeviceOps, DeviceTimeline, EventBridge, StreamPool
from tierflow.pipeline.executor import ComputeWorker
from tierflow.pipeline.ring import SlotRing
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.resident import UnitTensors, home_bytes, load_units
from tierflow.stages.upload import StreamUploader, packed, to_device
from tierflow.stages.read import WeightStream
from tierflow.stages.compute import DevicePath
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import HOST
from tierflow.tiers.io.pinned import PinnedArena, aligned
from tierflow.tiers.kv.paged import KVStore, block_bytes
from tierflow.tiers.plan.plan import TierPlan
from tierflow.tiers.io.reader import DiskReader, UnitReader


@dataclass(slots=True)
class DeviceStart:
    resident: dict[int, UnitTensors]       # device-resident units, by unit
    path: DevicePath
    arena: PinnedArena
    stream: WeightStream | None            # None when every unit is resident (or only the embedding is on the host)
    bridge: EventBridge | None


async def start_device(ops: DeviceOps, index: CheckpointIndex, plan: TierPlan, dtype: torch.dtype,
                       reader: DiskReader, worker: ComputeWorker, *, direct_reader: UnitReader | None = None,
                       tracer: Tracer = NULL_TRACER) -> DeviceStart:
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
    arena = PinnedArena(sum(home_bytes(index, u, plan.tiers, dtype) for u in host_units) +
                        (0 if direct else slots * read_slot), ops.pin, ops.unpin)
    bridge = None

    try:
        resident, homes = await load_units(index, plan.tiers, reader, worker, dtype,
                                           to_device=functools.partial(to_device, device=ops.device), arena=arena)
        uploader = stream = None
        if streamed:
            device_slot = max([plan.device_slot_bytes, read_slot] +
                              [packed(homes[u])[1] for u in streamed if u in homes])
            device_slots = [ops.empty(device_slot) for _ in range(slots)]
            uploader = StreamUploader(ops, streams, device_slots, timeline, tracer)
            bridge = EventBridge()
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
    return DeviceStart(resident, path, arena, stream, bridge)


def open_kv_store(config: EngineConfig, plan: TierPlan, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                  tracer: Tracer = NULL_TRACER) -> KVStore:
    """Pools for an engine's paged KV cache of ``kv_reserve_tokens`` tokens: the device share
    from ``kv_device_bytes`` (else the plan's), the host share from ``kv_host_bytes`` (else the
    plan's), the rest on disk in ``kv_cache_dir``."""
    layers, bt = spec.num_layers, plan.kv_block_tokens
    per_block = block_bytes(spec.num_kv_heads, spec.head_dim, bt, dtype)
    total = -(-max(1, config.kv_reserve_tokens) // bt)
    device_share = config.kv_device_bytes // per_block // layers if config.kv_device_bytes is not None else \
        plan.kv_blocks["device"] // layers
    host_share = config.kv_host_bytes // per_block // layers if config.kv_host_bytes is not None else \
        plan.kv_blocks.get("host", 0) // layers
    device_share = min(device_share, total)
    host_share = min(host_share, total - device_share)
    disk_share = total - device_share - host_share
    if disk_share and config.kv_cache_dir is None:
        raise ConfigError(f"{disk_share * bt} of the {total * bt} tokens of KV (kv_reserve_tokens) fit neither "
                          "the device nor the host KV budget: set EngineConfig.kv_cache_dir to spill them to "
                          "disk, or raise kv_device_bytes / kv_host_bytes")
    return KVStore(num_layers=layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=dtype,
                   device=device, block_tokens=bt, device_blocks=device_share * layers,
                   host_blocks=host_share * layers, disk_blocks=disk_share * layers, spill_dir=config.kv_cache_dir,
                   tracer=tracer)
