"""What a sweep's kv_load reads, in the order it reads it: the plan (``plan_loads``) of the
off-device blocks its attention will take, and the runs of consecutive spill slots it reads
them in (``read_runs``). Bookkeeping only, no I/O: ``stages/kv_load.py`` reads by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from tierflow.adapters import ModelSpec
from tierflow.tiers.kv.blocks import BlockRef
from tierflow.tiers.kv.handle import KVHandle, first_visible
from tierflow.tiers.plan.costmodel import KV_READ_RUN


@dataclass(frozen=True, slots=True)
class KVRead:
    seq_id: int
    layer: int
    index: int                  # the block's index in the layer's table
    ref: BlockRef               # where it is ("host" or "disk")


@dataclass(frozen=True, slots=True)
class KVLoadPlan:
    """What a sweep's attention will take from off the device, in the order it takes it."""
    reads: tuple[KVRead, ...]


def plan_loads(spec: ModelSpec, kv: Sequence[KVHandle], starts: Sequence[int],
               skip: Callable[[int], bool] = lambda i: False, layers: Iterable[int] | None = None) -> KVLoadPlan:
    """The off-device blocks of sequences ``kv`` (their first new positions ``starts``) in sweep
    order: layer by layer, sequence by sequence, block by block; ``skip(i)``: sequence i is not
    computed (refused, or its KV already failed); ``layers``: only these (default every layer)."""
    reads = [KVRead(handle.seq_id, layer, block.index, block.ref)
             for layer in (range(spec.num_layers) if layers is None else layers)
             for i, (handle, start) in enumerate(zip(kv, starts)) if not skip(i)
             for block in handle.off_device(layer, first_visible(start, spec.window(layer)))]
    return KVLoadPlan(tuple(reads))


@dataclass(frozen=True, slots=True)
class ReadRun:
    first: int                  # ordinal of its first block (its buffer: first % window)
    count: int
    slot: int                   # spill slot of its first block


def read_runs(disk: Sequence[KVRead], window: int, base: int = 0) -> list[ReadRun]:
    """``disk``'s blocks (ordinals from ``base``) in runs of consecutive slots of one (sequence,
    layer), none wrapping round the window."""
    runs, i = [], 0
    most = min(KV_READ_RUN, max(1, window // 2))        # two runs in the window: one reads while one is taken
    while i < len(disk):
        j = i + 1
        while j < len(disk) and j - i < most and (base + j) % window \
                and disk[j].ref.slot == disk[j - 1].ref.slot + 1 \
                and (disk[j].seq_id, disk[j].layer) == (disk[i].seq_id, disk[i].layer):
            j += 1
        runs.append(ReadRun(base + i, j - i, disk[i].ref.slot))
        i = j
    return runs
