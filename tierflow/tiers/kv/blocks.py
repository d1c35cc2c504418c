"""Paged KV bookkeeping: block pools per tier and a block table per sequence. Pure (no torch,
no I/O): it decides which slot of which tier holds each block; storage lives elsewhere.

A block is ``block_tokens`` tokens of one layer's keys and values. Each tier (device, host,
disk) has a pool of slots, as many as the plan gives it. A new block goes to the fastest
tier with a free slot; ``move`` re-homes a block (spilling to disk, or promoting back); a
finished sequence's blocks all go back to their pools. Every slot is owned by at most one
block, which the tests check for random sequences of operations.

A sliding-window layer's table is a ring: ``release_before`` gives the blocks its window no
longer sees back to their pools at once, while the indexes of the blocks it keeps stay what
they were (block ``i`` holds tokens ``i * block_tokens`` on, whatever was released before it):
each table keeps the number of leading blocks it released, ``first_held``, and ``table``
returns the held blocks from that index on. A freed slot is free for any sequence at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tierflow.errors import TierCapacityError
from tierflow.tiers.kv.pool import BlockPool, PoolStats, Run

TIER_ORDER = ("device", "host", "disk")


@dataclass(frozen=True, slots=True)
class BlockRef:
    tier: str
    slot: int


@dataclass(frozen=True, slots=True)
class KVPoolsStats:
    """The block pools of every tier."""
    device: PoolStats           # blocks in device memory (RAM on the CPU)
    host: PoolStats             # blocks in (pinned) host memory
    disk: PoolStats             # blocks in the spill file

    def by_tier(self) -> dict[str, PoolStats]:
        """The same, keyed by tier name, fastest first."""
        return {"device": self.device, "host": self.host, "disk": self.disk}


@dataclass(slots=True)
class _LayerTable:
    first: int = 0                                          # leading blocks released (a ring's start)
    refs: deque[BlockRef] = field(default_factory=deque)   # the blocks held, from index ``first`` on
    run: tuple[str, Run] | None = None                      # the tier and run its slots extend


class KVBlockTables:
    """Block tables of every sequence over per-tier pools."""

    def __init__(self, capacities: dict[str, int], *, num_layers: int, block_tokens: int,
                 disk_extent: int = 1, memory_extent: int = 1) -> None:
        """``disk_extent``: the disk pool gives each layer of a sequence runs of up to this many
        consecutive slots (``BlockPool``), so its blocks come back in few read requests;
        ``memory_extent``: the device and host pools likewise, so attention merges a run of a
        layer's blocks in one step (``adapters/block_runs.py``)."""
        unknown = set(capacities) - set(TIER_ORDER)
        if unknown:
            raise ValueError(f"unknown KV tiers {sorted(unknown)}; tiers are {TIER_ORDER}")
        self.num_layers, self.block_tokens = num_layers, block_tokens
        self.pools = {tier: BlockPool(tier, capacities.get(tier, 0),
                                       disk_extent if tier == "disk" else memory_extent)
                      for tier in TIER_ORDER}
        self._tables: dict[int, list[_LayerTable]] = {}

    def statistics(self) -> KVPoolsStats:
        return KVPoolsStats(*(self.pools[tier].statistics() for tier in TIER_ORDER))

    @property
    def capacity_blocks(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` needs over all layers (every layer full attention)."""
        return -(-tokens // self.block_tokens) * self.num_layers

    def _layer(self, seq_id: int, layer: int) -> _LayerTable | None:
        tables = self._tables.get(seq_id)
        return tables[layer] if tables is not None else None

    def table(self, seq_id: int, layer: int) -> tuple[BlockRef, ...]:
        """The blocks ``layer`` holds, in order: block indexes ``first_held`` .. ``committed - 1``."""
        t = self._layer(seq_id, layer)
        return tuple(t.refs) if t is not None else ()

    def first_held(self, seq_id: int, layer: int) -> int:
        """Index of the layer's first held block (the blocks before it were released by its ring)."""
        t = self._layer(seq_id, layer)
        return t.first if t is not None else 0

    def committed(self, seq_id: int, layer: int) -> int:
        """Blocks ever committed to the layer (held or released): the next block's index."""
        t = self._layer(seq_id, layer)
        return t.first + len(t.refs) if t is not None else 0

    def held(self, seq_id: int) -> tuple[int, ...]:
        """Blocks each layer of a sequence holds now."""
        tables = self._tables.get(seq_id)
        return tuple(len(t.refs) for t in tables) if tables is not None else (0,) * self.num_layers

    def ref(self, seq_id: int, layer: int, index: int) -> BlockRef:
        """Where block ``index`` of a layer lives; ValueError if it was released or never committed."""
        t = self._layer(seq_id, layer)
        first, count = (t.first, len(t.refs)) if t is not None else (0, 0)
        if not first <= index < first + count:
            raise ValueError(f"block {index} of sequence {seq_id} layer {layer} is not held (the layer holds "
                             f"blocks {first}..{first + count - 1}; those before {first} were released)")
        assert t is not None
        return t.refs[index - first]

    def append_block(self, seq_id: int, layer: int, tiers: tuple[str, ...] = TIER_ORDER) -> BlockRef:
        """A new block at the end of ``layer``'s table, in the first of ``tiers`` with room."""
        held = self._layer(seq_id, layer)
        last = held.refs[-1] if held is not None and held.refs else None
        for tier in tiers:
            run = held.run[1] if held is not None and held.run is not None and held.run[0] == tier else None
            after = last.slot if last is not None and last.tier == tier else None
            slot, kept = self.pools[tier].allocate_run(after, run)
            if slot is None:
                continue
            t = self._tables.setdefault(seq_id, [_LayerTable() for _ in range(self.num_layers)])[layer]
            if kept is not run:                 # the run did not go on: its spare slots go back
                self._end_run(t)
                t.run = (tier, kept) if kept is not None else None
            ref = BlockRef(tier, slot)
            t.refs.append(ref)
            return ref
        free = {t: self.pools[t].statistics().free for t in tiers}
        raise TierCapacityError(f"no free KV block in {', '.join(tiers)} (free: {free}); the KV cache is full")

    def release_before(self, seq_id: int, layer: int, index: int) -> tuple[BlockRef, ...]:
        """Give every held block of ``layer`` before block ``index`` back to its pool (a sliding
        window's ring moving on); the others keep their indexes. Returns the released refs."""
        t = self._layer(seq_id, layer)
        if t is None:
            return ()
        released = []
        while t.refs and t.first < index:
            ref = t.refs.popleft()
            self.pools[ref.tier].release(ref.slot)
            released.append(ref)
            t.first += 1
        return tuple(released)

    def release_from(self, seq_id: int, layer: int, index: int) -> tuple[BlockRef, ...]:
        """Give every held block of ``layer`` from block ``index`` on back to its pool (KV rolled
        back: speculative tokens rejected); the next block committed gets index ``index``."""
        t = self._layer(seq_id, layer)
        if t is not None:
            self._end_run(t)
        released = []
        while t is not None and t.refs and t.first + len(t.refs) > index:
            ref = t.refs.pop()
            self.pools[ref.tier].release(ref.slot)
            released.append(ref)
        return tuple(released)

    def move(self, seq_id: int, layer: int, index: int, tier: str) -> tuple[BlockRef, BlockRef]:
        """Point block ``index`` of a table at a new slot in ``tier``; returns (old, new). The old
        slot stays allocated until ``release(old)``: copy the data first, then release."""
        old = self.ref(seq_id, layer, index)
        t = self._tables[seq_id][layer]
        slot = self.pools[tier].allocate()
        if slot is None:
            raise TierCapacityError(f"no free KV block in {tier!r} to move a block to")
        t.refs[index - t.first] = BlockRef(tier, slot)
        return old, t.refs[index - t.first]

    def release(self, ref: BlockRef) -> None:
        """Give back a slot a ``move`` left behind."""
        self.pools[ref.tier].release(ref.slot)

    def free_sequence(self, seq_id: int) -> int:
        """Return every held block of a sequence to its pool; how many were freed."""
        tables = self._tables.pop(seq_id, [])
        freed = 0
        for t in tables:
            self._end_run(t)
            for ref in t.refs:
                self.pools[ref.tier].release(ref.slot)
                freed += 1
        return freed

    def sequences(self) -> tuple[int, ...]:
        return tuple(self._tables)

    def _end_run(self, t: _LayerTable) -> None:
        """The layer no longer extends its run: the slots set aside for it are free for anyone."""
        if t.run is not None:
            tier, run = t.run
            self.pools[tier].give_back(run)
            t.run = None
