"""Loading the units that do not stream: device-resident units into device memory, and on
CUDA the host-resident units into the pinned host tier.

Each unit is read once, into a scratch buffer, and its floating tensors are cast to the
compute dtype. A device-resident unit is then copied to the device (on CPU, where the
device is RAM, the cast tensors are kept as they are). A host-resident unit's cast tensors
are copied into pieces of the pinned arena, where they stay for the engine's life and from
where the weight stream uploads them every sweep. A tied head shares the embedding's tensor
when both live in the same tier.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from tierflow.pipeline.executor import ComputeWorker
from tierflow.stages.upload import unit_views
from tierflow.stages.read import cast_weights
from tierflow.tiers.checkpoint.index import CheckpointIndex, UnitLayout
from tierflow.tiers.plan.costmodel import DEVICE, HOST
from tierflow.tiers.io.pinned import PinnedArena, aligned
from tierflow.tiers.io.reader import DiskReader, aligned_empty

UnitTensors = dict[str, torch.Tensor]


def layout_for(index: CheckpointIndex, unit: int, tiers: tuple[str, ...]) -> tuple[UnitLayout, bool]:
    """The layout to load for ``unit`` in its tier, and whether its ``lm_head`` is the
    embedding's tensor (a tied head whose embedding lives in the same tier)."""
    last = index.spec.num_units - 1
    shared = unit == last and index.head_without_tied is not None and tiers[0] == tiers[last]
    return (index.head_without_tied if shared else index.units[unit]), shared  # type: ignore[return-value]


def home_bytes(index: CheckpointIndex, unit: int, tiers: tuple[str, ...], dtype: torch.dtype) -> int:
    """Pinned bytes a host-resident unit takes in the arena (each tensor 4 KiB aligned)."""
    layout, _ = layout_for(index, unit, tiers)
    size = 0
    for t in layout.tensors:
        itemsize = dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize
        size += aligned(math.prod(t.shape) * itemsize)
    return size


async def load_units(index: CheckpointIndex, tiers: tuple[str, ...], reader: DiskReader, worker: ComputeWorker,
                     dtype: torch.dtype, *, to_device: Callable[[UnitTensors], UnitTensors] | None = None,
                     arena: PinnedArena | None = None) -> tuple[dict[int, UnitTensors], dict[int, UnitTensors]]:
    """(device-resident units, host-resident units), by unit. ``to_device`` copies cast tensors
    to the device (None on CPU: they stay where they are); ``arena`` holds host-resident units."""
    wanted = [u for u, tier in enumerate(tiers) if tier == DEVICE or (tier == HOST and arena is not None)]
    device: dict[int, UnitTensors] = {}
    host: dict[int, UnitTensors] = {}
    scratch: torch.Tensor | None = None
    for unit in wanted:
        layout, shared = layout_for(index, unit, tiers)
        if scratch is None or scratch.numel() < layout.buffer_bytes or to_device is None:
            # on CPU the cast tensors may be views of the buffer: each unit keeps its own
            scratch = aligned_empty(max(layout.buffer_bytes, 1))
        await reader.read(layout, scratch)
        weights = await worker.run(cast_weights, unit_views(layout, scratch), dtype)
        if tiers[unit] == HOST:
            assert arena is not None
            weights = await worker.run(_pin, weights, arena)
            if shared:
                weights["lm_head"] = host[0]["embed"]
            host[unit] = weights
        else:
            if to_device is not None:
                weights = await worker.run(to_device, weights)
            if shared:
                weights["lm_head"] = device[0]["embed"]
            device[unit] = weights
    return device, host


def _pin(weights: UnitTensors, arena: PinnedArena) -> UnitTensors:
    pinned = {}
    for name, t in weights.items():
        piece = arena.take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        piece.copy_(t)
        pinned[name] = piece
    return pinned
