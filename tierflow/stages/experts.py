"""The expert stage of a mixture-of-experts model: read only the experts the router picks.

Each expert of each MoE layer is its own unit in the checkpoint index. A MoE layer's router
runs inside the layer unit; the adapter then asks this stage (through
``SweepContext.experts``) for exactly the experts its tokens were routed to, and the stage
brings them — from its cache, or with a read of their byte ranges. A decode token therefore
reads the dense part of the model plus its routed experts, never the others.

The cache (``capacity_bytes``, which the planner sizes from the memory the dense placement
leaves free) is split between the MoE layers in whole experts, as evenly as it goes, each
part kept by least recent use.
A sweep visits the layers in a cycle, so one shared LRU smaller than a sweep's working set
would always evict exactly the experts the next sweep needs first; per-layer parts keep
each layer's most recent experts whatever the other layers do. Consecutive tokens often
route alike, so when the sweep reaches layer l the stage starts reading the experts layer
l+1 used last time that its part does not hold, while layer l computes. Experts a layer is
using, or that were read ahead for it, are held beyond its part until the layer is done; a
read-ahead expert the router then does not pick is the first to go. Reading ahead is a bet
(a miss costs a read the router did not ask for; ``statistics()`` counts both), so it is
done only when there is an expert cache: with ``capacity_bytes=0`` exactly the routed
experts are read, each when picked.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from tierflow.pipeline.device import DeviceOps
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.upload import to_device, unit_views
from tierflow.stages.read import cast_weights
from tierflow.tiers.checkpoint.index import UnitLayout
from tierflow.tiers.io.reader import DiskReader, aligned_empty
from tierflow.tiers.plan.routing import RoutingRecorder, RoutingStats

Key = tuple[int, int]      # (layer, expert)


@dataclass(frozen=True, slots=True)
class ExpertStats:
    requests: int            # experts asked for (per layer per sweep, each routed expert once)
    hits: int                # found in the cache, or already being read ahead
    misses: int              # read on demand, after the router picked them
    prefetched: int          # reads started ahead of the router
    prefetch_used: int       # of those, experts the router then picked
    bytes_read: int          # bytes the reader delivered for expert reads (on demand and ahead)
    read_s: float            # summed wall time of those reads, casts and copies to the device included
    stall_s: float           # time compute waited for experts
    cached: int              # experts held now
    cached_bytes: int        # memory the held experts take
    capacity_bytes: int      # the cache's budget (0: no cache, only the routed experts of a layer are held)
    routing: RoutingStats | None = None   # the router's picks by LRU stack distance (``tiers/plan/routing.py``)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class ExpertStage:
    def __init__(self, layouts: Mapping[Key, UnitLayout], reader: DiskReader, dtype: torch.dtype,
                 capacity_bytes: int, *, prefetch: bool = True, read_all: bool = False,
                 tracer: Tracer = NULL_TRACER, ops: DeviceOps | None = None, compute: Any = None) -> None:
        self._layouts, self._reader, self._dtype, self._tracer = layouts, reader, dtype, tracer
        self._ops, self._compute = ops, compute
        self.capacity_bytes, self.read_all = capacity_bytes, read_all
        # reading ahead keeps experts between layers: only with an expert cache to keep them in
        self.prefetch_enabled = prefetch and not read_all and capacity_bytes > 0
        self._experts: dict[int, list[int]] = {}
        for layer, expert in sorted(layouts):
            self._experts.setdefault(layer, []).append(expert)
        self._layers = sorted(self._experts)
        self._next = dict(zip(self._layers, self._layers[1:] + self._layers[:1]))
        # each MoE layer's share of the cache, in whole experts (the first layers get the remainder)
        largest = max((self._held_bytes(layout) for layout in layouts.values()), default=1)
        fit, n = capacity_bytes // largest, max(1, len(self._layers))
        self._part = {layer: (fit // n + (i < fit % n)) * largest for i, layer in enumerate(self._layers)}
        self._cache: dict[int, OrderedDict[int, dict[str, torch.Tensor]]] = {l: OrderedDict() for l in self._layers}
        self._sizes: dict[Key, int] = {}
        self._reads: dict[Key, asyncio.Task[dict[str, torch.Tensor]]] = {}
        self._ahead: set[Key] = set()            # read ahead and not yet asked for
        self._last: dict[int, tuple[int, ...]] = {}
        self._held: set[Key] = set()
        self._cached_bytes = 0
        self._requests = self._hits = self._misses = self._num_prefetched = self._prefetch_used = 0
        self._bytes_read = 0
        self._read_s = self._stall_s = 0.0
        self._routing = RoutingRecorder(max((len(e) for e in self._experts.values()), default=1))

    @property
    def total_bytes(self) -> int:
        return sum(self._held_bytes(layout) for layout in self._layouts.values())

    def _held_bytes(self, layout: UnitLayout) -> int:
        """What a cached expert holds: its read buffer, or its weights cast to the compute dtype."""
        cast = any(t.dtype != self._dtype and t.dtype.is_floating_point for t in layout.tensors)
        return layout.compute_bytes(self._dtype) if cast else layout.buffer_bytes

    def statistics(self) -> ExpertStats:
        return ExpertStats(self._requests, self._hits, self._misses, self._num_prefetched, self._prefetch_used,
                           self._bytes_read, self._read_s, self._stall_s, sum(map(len, self._cache.values())),
                           self._cached_bytes, self.capacity_bytes, self._routing.statistics())

    async def preload(self) -> None:
        """Read every expert now (when the cache holds them all, nothing is read later)."""
        await asyncio.gather(*(self._start(key) for key in self._layouts if not self._has(key)))

    def layer_started(self, layer: int) -> None:
        """Layer ``layer`` of a sweep is about to compute: read ahead what the next MoE layer
        used last time and does not hold."""
        if not self.prefetch_enabled or layer not in self._next:
            return
        following = self._next[layer]
        for expert in self._last.get(following, ()):
            key = (following, expert)
            if self._has(key) or key in self._reads:
                continue
            self._start(key)
            self._ahead.add(key)
            self._held.add(key)
            self._num_prefetched += 1

    async def get(self, layer: int, experts: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """The weights of ``experts`` of ``layer``; call ``release(layer)`` when the layer is done."""
        started = time.perf_counter()
        self._last[layer] = tuple(experts)
        self._routing.observe(layer, experts)
        wanted = self._experts[layer] if self.read_all else experts   # "all": as offloaders that ignore routing
        waiting = []
        for expert in wanted:
            key = (layer, expert)
            self._requests += 1
            self._held.add(key)
            # a read-ahead serves if it is cached or still in flight (one that failed is read again)
            ahead = key in self._ahead
            self._ahead.discard(key)
            if self._has(key):
                self._hits += 1
                self._prefetch_used += ahead
                self._cache[layer].move_to_end(expert)
                continue
            if key in self._reads:
                self._hits += 1
                self._prefetch_used += ahead
            else:
                self._misses += 1
                self._start(key)
            waiting.append(self._reads[key])
        try:
            await asyncio.gather(*waiting)
        finally:
            self._stall_s += time.perf_counter() - started
        for expert in experts:
            self._cache[layer].move_to_end(expert)
        return {expert: self._cache[layer][expert] for expert in experts}

    def release(self, layer: int) -> None:
        """Layer ``layer`` is done with its experts (those read ahead for it, picked or not)."""
        self._held = {key for key in self._held if key[0] != layer}
        self._ahead = {key for key in self._ahead if key[0] != layer}
        self._evict(layer)

    def _has(self, key: Key) -> bool:
        return key[1] in self._cache[key[0]]

    def _start(self, key: Key) -> asyncio.Task[dict[str, torch.Tensor]]:
        task = asyncio.create_task(self._read(key), name=f"tierflow-expert-{key[0]}.{key[1]}")
        self._reads[key] = task
        # a failure reaches whoever awaits the read; one nobody awaits (a read-ahead the router did
        # not pick, or a second failure in one get) must not be logged as never retrieved
        task.add_done_callback(_retrieve)
        return task

    async def _read(self, key: Key) -> dict[str, torch.Tensor]:
        layout = self._layouts[key]
        started = time.perf_counter()
        try:
            buffer = aligned_empty(layout.buffer_bytes)
            nbytes = await self._reader.read(layout, buffer)
            views = unit_views(layout, buffer)
            weights = views if all(v.dtype == self._dtype or not v.dtype.is_floating_point for v in views.values()) else \
                await asyncio.to_thread(cast_weights, views, self._dtype)
            if self._ops is not None:
                weights = await asyncio.to_thread(self._to_device, weights)
        finally:
            self._reads.pop(key, None)
        self._bytes_read += nbytes
        self._read_s += time.perf_counter() - started
        self._tracer.span("disk: experts", layout.name, started, time.perf_counter(), bytes=nbytes,
                          ahead=key in self._ahead)
        layer, expert = key
        self._sizes[key] = self._held_bytes(layout)
        self._cached_bytes += self._sizes[key]
        self._cache[layer][expert] = weights
        # read ahead and not picked yet, or no longer wanted (its layer was released while it was
        # read): the first to leave
        if key in self._ahead or key not in self._held:
            self._cache[layer].move_to_end(expert, last=False)
        self._evict(layer)
        return weights

    def _to_device(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On a worker thread: device copies of an expert's weights, complete when this returns.
        The compute stream's use of them is recorded with the caching allocator, so when the
        cache evicts an expert — as soon as its layer's kernels are *queued* — its memory goes
        to no other allocation before those kernels have run."""
        ops = self._ops
        assert ops is not None
        on_device = to_device(weights, ops)
        for t in on_device.values():
            ops.record_stream(t, self._compute)
        return on_device

    def _evict(self, layer: int) -> None:
        """Bring ``layer``'s part within its share, least recently used first, never what is held.
        Experts read ahead and not yet asked for are held beyond the share: they must not push out
        the experts the layer used last time, which they are read to complement."""
        part = self._cache[layer]
        used = sum(self._sizes[(layer, e)] for e in part if (layer, e) not in self._ahead)
        for expert in list(part):
            if used <= self._part[layer]:
                return
            key = (layer, expert)
            if key in self._held:
                continue
            del part[expert]
            size = self._sizes.pop(key)
            used -= size
            self._cached_bytes -= size

    async def close(self) -> None:
        tasks = list(self._reads.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for part in self._cache.values():
            part.clear()
        self._sizes.clear()
        self._cached_bytes = 0


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()
