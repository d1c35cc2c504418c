"""The free slots of one tier's pool (``BlockPool``): which slot a new block takes, and, on
disk, runs of consecutive slots per owner so that a layer's blocks come back in few reads.
Pure (no torch, no I/O); ``blocks.KVBlockTables`` owns one pool per tier.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolStats:
    tier: str        # "device" | "host" | "disk"
    capacity: int    # block slots of the tier (a slot holds one layer's KV of one block of tokens)
    used: int        # slots allocated now

    @property
    def free(self) -> int:
        return self.capacity - self.used


SPARE_RUNS = 16        # new runs go on while the slots set aside exceed those in use by at most this many runs


@dataclass(frozen=True, slots=True)
class Run:
    """The extent an owner's run of slots extends into: its slots set aside carry ``token``."""
    token: int
    slots: range


class BlockPool:
    """The free slots of one tier. With ``extent`` 1 the lowest free slot is taken first, so the
    slots in use stay packed at the start (a spill file only grows as far as its highest slot in
    use), and a pool of millions of slots costs nothing until they are used.

    With ``extent`` > 1 (every tier of a paged store: on disk a run of consecutive slots is one
    read request, in memory attention merges it in one step) an owner
    — one layer of one sequence — takes slots in runs: ``allocate_run`` gives it the slot after
    its last one while that is set aside for its run, else the first slot of a wholly free,
    aligned extent and sets the extent's other slots aside for it (a ``Run``). A wholly free
    extent is the lowest one freed, else a new one at the high-water mark — only when no freed
    slot is left and the slots set aside exceed those in use by at most SPARE_RUNS runs, so the
    spill file holds at most about twice the slots in use plus that (else the lowest free slot,
    as with extent 1). Slots set aside are free: the statistics count them so, and ``allocate``
    takes them once no other slot is left, so the pool holds as many blocks as without extents.
    ``give_back`` returns a run's slots set aside when its owner no longer extends it."""

    def __init__(self, tier: str, capacity: int, extent: int = 1) -> None:
        if capacity < 0:
            raise ValueError(f"pool {tier!r}: capacity must be >= 0, got {capacity}")
        if extent < 1:
            raise ValueError(f"pool {tier!r}: extent must be >= 1, got {extent}")
        self.tier, self.capacity, self.extent = tier, capacity, extent
        self._released: list[int] = []      # a heap of freed slots below the high-water mark (lazy:
        self._free: set[int] = set()        # an entry counts only while in this set; compacted)
        self._high = 0                      # slots from here on were never allocated
        self._used: set[int] = set()
        self._spare: dict[int, int] = {}    # free slots set aside to extend a run -> its token
        self._tokens = itertools.count()
        self._free_in: dict[int, int] = {}  # extent index -> its slots in ``_free``
        self._free_extents: list[int] = []  # a heap (lazy) of extents whose every slot is in ``_free``

    def allocate(self) -> int | None:
        """The lowest free slot; a slot set aside for a run only when no other is left."""
        slot = self._pop_released()
        if slot is None and self._high < self.capacity:
            slot, self._high = self._high, self._high + 1
        if slot is None and self._spare:
            slot = min(self._spare)
            del self._spare[slot]
        if slot is not None:
            self._used.add(slot)
        return slot

    def allocate_run(self, after: int | None, run: Run | None) -> tuple[int | None, Run | None]:
        """A slot for an owner whose last slot is ``after`` in its ``run`` (None: it has none),
        and the run the slot belongs to: ``run`` when it goes on, a new one when the slot starts
        one, None otherwise (see the class; with extent 1, always ``allocate`` and None)."""
        if self.extent == 1:
            return self.allocate(), None
        if after is not None and run is not None and self._spare.get(after + 1) == run.token:
            del self._spare[after + 1]
            self._used.add(after + 1)
            return after + 1, run
        first = self._take_free_extent()
        if first is None and not self._free and len(self._spare) <= len(self._used) + SPARE_RUNS * self.extent:
            first = self._carve_extent()
        if first is None:
            return self.allocate(), None
        self._used.add(first)
        new = Run(next(self._tokens), range(first, first + self.extent))
        self._spare.update(dict.fromkeys(new.slots[1:], new.token))
        return first, new

    def give_back(self, run: Run) -> None:
        """The slots still set aside for ``run`` are free for anyone again."""
        for slot in run.slots:
            if self._spare.get(slot) == run.token:
                del self._spare[slot]
                self._add_free(slot)

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"pool {self.tier!r}: slot {slot} is not allocated")
        self._used.remove(slot)
        self._add_free(slot)

    def _compact(self) -> None:
        """Drop the heap's stale entries once they outnumber the free slots (a sorted list is a heap)."""
        if len(self._released) > 2 * len(self._free) + 64:
            self._released = sorted(self._free)

    def _add_free(self, slot: int) -> None:
        self._compact()
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
                self._compact()
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
