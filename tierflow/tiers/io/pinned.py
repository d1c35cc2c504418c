"""The pinned host tier: one allocation of page-locked RAM, carved into the host-resident
units' weights and the read buffers that disk reads land in.

Copies to the device are asynchronous only from pinned memory (from pageable memory the
driver stages them through a bounce buffer of its own, and the host waits). The arena is
sized from the plan and allocated once, when the engine opens: pinning is slow (every page
is locked and mapped for the device) and pinned memory cannot be swapped, so it is never
grown or reallocated while the engine runs. Each piece is 4 KiB aligned, as O_DIRECT reads
need; the allocation itself is huge-page backed where large enough (``aligned_empty``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tierflow.errors import TierCapacityError
from tierflow.tiers.checkpoint.index import ALIGN_BYTES
from tierflow.tiers.io.reader import aligned_empty


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True, slots=True)
class ArenaStats:
    capacity_bytes: int      # pinned bytes the arena holds (its request rounded up to the alignment)
    used_bytes: int          # of which handed out by ``take`` (each piece rounded up to the alignment)
    pieces: int              # ``take`` calls so far


class PinnedArena:
    """``capacity`` bytes of pinned host memory; ``take(n)`` hands out aligned pieces of it.

    ``pin`` / ``unpin`` lock and unlock an existing buffer (``TorchCuda.pin`` on a GPU; the
    tests pass functions that record the calls)."""

    def __init__(self, capacity: int, pin: Callable[[torch.Tensor], None],
                 unpin: Callable[[torch.Tensor], None]) -> None:
        self.capacity = aligned(capacity)
        self._buffer = aligned_empty(self.capacity)
        self._unpin = unpin
        pin(self._buffer)
        self._pinned = True
        self._used = self._pieces = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """An aligned uint8 piece of ``nbytes``, for the life of the arena."""
        size = aligned(nbytes)
        if self._used + size > self.capacity:
            raise TierCapacityError(f"the pinned host arena of {self.capacity} bytes has {self.capacity - self._used} "
                                    f"left, {size} were asked for; the plan's host memory does not match the units")
        piece = self._buffer[self._used:self._used + nbytes]
        self._used += size
        self._pieces += 1
        return piece

    def statistics(self) -> ArenaStats:
        return ArenaStats(self.capacity, self._used, self._pieces)

    def close(self) -> None:
        """Unpin the memory (the tensors taken from it stay valid, as ordinary memory)."""
        if self._pinned:
            self._pinned = False
            self._unpin(self._buffer)
