"""The free slots of one tier's pool (``BlockPool``): which slot a new block takes, and, on
disk, runs of consecutive slots per owner so that a layer's blocks come back in few reads.
Pure (no torch, no I/O); ``blocks.KVBlockTables`` owns one pool per tier.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolStats:
    tier: str        # "device" | "host" | "disk"
    capacity: int    # block slots of the tier (a slot holds one layer's KV of one block of tokens)
    used: int        # slots allocated now

    @property
    def free(self) -> int:
        return self.capacity - self.used


class BlockPool:
    """The free slots of one tier. The lowest free slot is taken first, so the slots in use stay
    packed at the start (a spill file only grows as far as its highest slot in use), and a pool
    of millions of slots costs nothing until they are used.

    With ``extent`` > 1 (the disk tier: a run of consecutive slots is one read request) an owner
    — one layer of one sequence — takes slots in runs: ``allocate_run`` gives it the slot after
    its last one while that is set aside for it, else the first slot of a wholly free extent (the
    lowest; a new one at the high-water mark only when no freed slot is left, so a spill file
    grows no faster than without extents) and sets the extent's other slots aside for it. Slots set aside are free: the statistics count them so, and ``allocate`` takes them once
    no other slot is left, so the pool holds as many blocks as without extents. ``give_back``
    returns an owner's slots set aside when it no longer extends its run."""

    def __init__(self, tier: str, capacity: int, extent: int = 1) -> None:
        if capacity < 0:
            raise ValueError(f"pool {tier!r}: capacity must be >= 0, got {capacity}")
        if extent < 1:
            raise ValueError(f"pool {tier!r}: extent must be >= 1, got {extent}")
        self.tier, self.capacity, self.extent = tier, capacity, extent
        self._released: list[int] = []      # a heap of freed slots below the high-water mark (lazy:
        self._free: set[int] = set()        # an entry counts only while in this set)
        self._high = 0                      # slots from here on were never allocated
        self._used: set[int] = set()
        self._spare: set[int] = set()       # free slots set aside to extend an owner's run
        self._free_in: dict[int, int] = {}  # extent index -> its slots in ``_free``
        self._free_extents: list[int] = []  # a heap (lazy) of extents whose every slot is in ``_free``

    def allocate(self) -> int | None:
        """The lowest free slot; a slot set aside for a run only when no other is left."""
        slot = self._pop_released()
        if slot is None and self._high < self.capacity:
            slot, self._high = self._high, self._high + 1
        if slot is None and self._spare:
            slot = min(self._spare)
            self._spare.remove(slot)
        if slot is not None:
            self._used.add(slot)
        return slot

    def allocate_run(self, after: int | None) -> tuple[int | None, range | None]:
        """A slot for an owner whose last slot is ``after`` (None: it has none yet), and the
        extent set aside for the owner when this slot starts one (see the class)."""
        if after is not None and after + 1 in self._spare:
            self._spare.remove(after + 1)
            self._used.add(after + 1)
            return after + 1, None
        first = self._take_free_extent() if self.extent > 1 else None
        if first is None and not self._free and self.extent > 1:
            first = self._carve_extent()      # only when no freed slot is left: the file stays packed
        if first is None:
            return self.allocate(), None
        self._used.add(first)
        self._spare.update(range(first + 1, first + self.extent))
        return first, range(first, first + self.extent)

    def give_back(self, slots: range) -> None:
        """The slots of ``slots`` set aside for an owner's run are free for anyone again."""
        for slot in slots:
            if slot in self._spare:
                self._spare.remove(slot)
                self._add_free(slot)

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"pool {self.tier!r}: slot {slot} is not allocated")
        self._used.remove(slot)
        self._add_free(slot)

    def _add_free(self, slot: int) -> None:
        heapq.heappush(self._released, slot)
        self._free.add(slot)
        if self.extent > 1:
            k = slot // self.extent
            self._free_in[k] = self._free_in.get(k, 0) + 1
            if self._free_in[k] == self.extent:
                heapq.heappush(self._free_extents, k)

    def _pop_released(self) -> int | None:
        while self._released:
            slot = heapq.heappop(self._released)
            if slot in self._free:
                self._free.remove(slot)
                if self.extent > 1:
                    self._free_in[slot // self.extent] -= 1
                return slot
        return None

    def _take_free_extent(self) -> int | None:
        """The first slot of the lowest wholly free extent, its slots no longer free (None: none is)."""
        e = self.extent
        while self._free_extents:
            k = heapq.heappop(self._free_extents)
            if self._free_in.get(k) == e:
                self._free.difference_update(range(k * e, (k + 1) * e))
                self._free_in[k] = 0
                return k * e
        return None

    def _carve_extent(self) -> int | None:
        """The first slot of a new extent at the high-water mark (None: no room for one)."""
        e = self.extent
        start = -(-self._high // e) * e              # extents are aligned
        if start + e > self.capacity:
            return None
        for slot in range(self._high, start):     # skipped to align: free for anyone
            self._add_free(slot)
        self._high = start + e
        return start

    @property
    def high_water(self) -> int:
        """One past the highest slot ever allocated."""
        return self._high

    def statistics(self) -> PoolStats:
        return PoolStats(self.tier, self.capacity, len(self._used))
