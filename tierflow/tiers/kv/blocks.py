"""Paged KV bookkeeping: block pools per tier and a block table per sequence. Pure (no torch,
no I/O): it decides which slot of which tier holds each block; storage lives elsewhere.

A block is ``block_tokens`` tokens of one layer's keys and values. Each tier (device, host,
disk) has a pool of slots, as many as the plan gives it. A new block goes to the fastest
tier with a free slot; ``move`` re-homes a block (spilling to disk, or promoting back); a
finished sequence's blocks all go back to their pools. Every slot is owned by at most one
block, which the tests check for random sequences of operations.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tierflow.errors import TierCapacityError

TIER_ORDER = ("device", "host", "disk")


@dataclass(frozen=True, slots=True)
class BlockRef:
    tier: str
    slot: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    tier: str        # "device" | "host" | "disk"
    capacity: int    # block slots of the tier (a slot holds one layer's KV of one block of tokens)
    used: int        # slots allocated now

    @property
    def free(self) -> int:
        return self.capacity - self.used


@dataclass(frozen=True, slots=True)
class KVPoolsStats:
    """The block pools of every tier."""
    device: PoolStats           # blocks in device memory (RAM on the CPU)
    host: PoolStats             # blocks in (pinned) host memory
    disk: PoolStats             # blocks in the spill file

    def by_tier(self) -> dict[str, PoolStats]:
        """The same, keyed by tier name, fastest first."""
        return {"device": self.device, "host": self.host, "disk": self.disk}


class BlockPool:
    """The free slots of one tier. The lowest free slot is taken first, so the slots in use stay
    packed at the start (a spill file only grows as far as its highest slot in use), and a pool
    of millions of slots costs nothing until they are used."""

    def __init__(self, tier: str, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"pool {tier!r}: capacity must be >= 0, got {capacity}")
        self.tier, self.capacity = tier, capacity
        self._released: list[int] = []      # a heap of freed slots below the high-water mark
        self._high = 0                      # slots from here on were never allocated
        self._used: set[int] = set()

    def allocate(self) -> int | None:
        if self._released:
            slot = heapq.heappop(self._released)
        elif self._high < self.capacity:
            slot, self._high = self._high, self._high + 1
        else:
            return None
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"pool {self.tier!r}: slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._released, slot)

    @property
    def high_water(self) -> int:
        """One past the highest slot ever allocated."""
        return self._high

    def statistics(self) -> PoolStats:
        return PoolStats(self.tier, self.capacity, len(self._used))


class KVBlockTables:
    """Block tables of every sequence over per-tier pools."""

    def __init__(self, capacities: dict[str, int], *, num_layers: int, block_tokens: int) -> None:
        unknown = set(capacities) - set(TIER_ORDER)
        if unknown:
            raise ValueError(f"unknown KV tiers {sorted(unknown)}; tiers are {TIER_ORDER}")
        self.num_layers, self.block_tokens = num_layers, block_tokens
        self.pools = {tier: BlockPool(tier, capacities.get(tier, 0)) for tier in TIER_ORDER}
        self._tables: dict[int, list[list[BlockRef]]] = {}

    def statistics(self) -> KVPoolsStats:
        return KVPoolsStats(*(self.pools[tier].statistics() for tier in TIER_ORDER))

    @property
    def capacity_blocks(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` needs over all layers."""
        return -(-tokens // self.block_tokens) * self.num_layers

    def table(self, seq_id: int, layer: int) -> tuple[BlockRef, ...]:
        return tuple(self._tables.get(seq_id, [[]] * self.num_layers)[layer])

    def append_block(self, seq_id: int, layer: int, tiers: tuple[str, ...] = TIER_ORDER) -> BlockRef:
        """A new block at the end of ``layer``'s table, in the first of ``tiers`` with room."""
        for tier in tiers:
            slot = self.pools[tier].allocate()
            if slot is not None:
                ref = BlockRef(tier, slot)
                self._tables.setdefault(seq_id, [[] for _ in range(self.num_layers)])[layer].append(ref)
                return ref
        free = {t: self.pools[t].statistics().free for t in tiers}
        raise TierCapacityError(f"no free KV block in {', '.join(tiers)} (free: {free}); the KV cache is full")

    def move(self, seq_id: int, layer: int, index: int, tier: str) -> tuple[BlockRef, BlockRef]:
        """Point block ``index`` of a table at a new slot in ``tier``; returns (old, new). The old
        slot stays allocated until ``release(old)``: copy the data first, then release."""
        table = self._tables[seq_id][layer]
        old = table[index]
        slot = self.pools[tier].allocate()
        if slot is None:
            raise TierCapacityError(f"no free KV block in {tier!r} to move a block to")
        table[index] = BlockRef(tier, slot)
        return old, table[index]

    def release(self, ref: BlockRef) -> None:
        """Give back a slot a ``move`` left behind."""
        self.pools[ref.tier].release(ref.slot)

    def free_sequence(self, seq_id: int) -> int:
        """Return every block of a sequence to its pool; how many were freed."""
        tables = self._tables.pop(seq_id, [])
        freed = 0
        for table in tables:
            for ref in table:
                self.pools[ref.tier].release(ref.slot)
                freed += 1
        return freed

    def sequences(self) -> tuple[int, ...]:
        return tuple(self._tables)
