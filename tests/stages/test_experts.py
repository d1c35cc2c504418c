"""ExpertStage on a real DiskReader over a tiny Mixtral checkpoint: reads only the requested
experts; the cache split between the MoE layers in whole experts, each part its own LRU
(held experts beyond it until release); read-ahead of the next layer's last experts and its
statistics, checked against a reference model; failed reads (on demand and read ahead)
reported to the caller; close, read_all, preload."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tierflow.errors import TransferError
from tierflow.stages.experts import ExpertStage
from tierflow.testing import build_random_checkpoint
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.io.reader import DiskReader

LAYERS, EXPERTS = 3, 4
LOCAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("experts") / "mixtral", "mixtral", num_layers=LAYERS,
                                   num_local_experts=EXPERTS, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def index(checkpoint: Path) -> CheckpointIndex:
    return CheckpointIndex.open(checkpoint)


@pytest.fixture(scope="module")
def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def size(index: CheckpointIndex) -> int:
    """One expert's read; the checkpoint's experts all have the same aligned size."""
    sizes = {layout.buffer_bytes for layout in index.experts.values()}
    assert len(index.experts) == LAYERS * EXPERTS and len(sizes) == 1, sizes
    return sizes.pop()


def _expected(tensors: dict[str, torch.Tensor], layer: int, expert: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return {local: tensors[f"{prefix}.{name}.weight"] for name, local in LOCAL.items()}


def _assert_weights(got, tensors, layer: int, experts) -> None:
    assert sorted(got) == sorted(experts)
    for expert in experts:
        expected = _expected(tensors, layer, expert)
        assert set(got[expert]) == set(expected)
        for local, tensor in expected.items():
            assert torch.equal(got[expert][local], tensor), (layer, expert, local)


def _counts(stage: ExpertStage) -> tuple[int, int, int]:
    s = stage.statistics()
    return s.requests, s.hits, s.misses


async def _get(stage: ExpertStage, layer: int, experts: list[int]) -> tuple[dict, int, int]:
    """get + release; returns (weights, hits, misses) of this call."""
    _, hits, misses = _counts(stage)
    got = await stage.get(layer, experts)
    stage.release(layer)
    _, hits2, misses2 = _counts(stage)
    return got, hits2 - hits, misses2 - misses


def test_reads_only_the_requested_experts(index, tensors, size):
    async def main():
        reader = DiskReader(index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=0)
        try:
            got = await stage.get(1, [3, 1])
            _assert_weights(got, tensors, 1, [1, 3])
            held = stage.statistics()
            stage.release(1)
            return held, stage.statistics(), reader.statistics().bytes_read
        finally:
            await stage.close()
            reader.close()

    held, after, disk = asyncio.run(main())
    assert (held.requests, held.hits, held.misses) == (2, 0, 2)
    assert held.bytes_read == disk == 2 * size          # the two experts, nothing else
    assert held.cached == 2                             # held while the layer computes, over capacity 0
    assert held.prefetched == 0
    assert after.cached == 0 and after.cached_bytes == 0


class _RecordingReader(DiskReader):
    """A DiskReader that records each expert it reads, as (layer, expert), and can hold the
    reads of chosen experts (before any byte moves) until ``let_go`` is called."""

    def __init__(self, layouts, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names = {layout.name: key for key, layout in layouts.items()}
        self.reads: list[tuple[int, int]] = []
        self.held: dict[tuple[int, int], asyncio.Event] = {}

    def hold(self, key: tuple[int, int]) -> None:
        self.held[key] = asyncio.Event()

    def let_go(self, key: tuple[int, int]) -> None:
        self.held.pop(key).set()

    async def read(self, layout, buffer) -> int:
        key = self.names[layout.name]
        self.reads.append(key)
        if key in self.held:
            await self.held[key].wait()
        return await super().read(layout, buffer)


async def _drain(stage: ExpertStage) -> None:
    """Wait until no read of the stage is in flight."""
    for _ in range(2000):
        if not stage._reads:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"reads still in flight: {sorted(stage._reads)}")


def _layer_counts(stage: ExpertStage) -> dict[int, int]:
    """How many experts each layer's part may keep."""
    size = max(layout.buffer_bytes for layout in stage._layouts.values())
    assert all(part % size == 0 for part in stage._part.values()), stage._part
    return {layer: part // size for layer, part in stage._part.items()}


@pytest.mark.parametrize("experts,parts", [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)),
                                           (4, (2, 1, 1)), (7, (3, 2, 2)), (12, (4, 4, 4))])
def test_capacity_is_split_between_the_layers_in_whole_experts(index, size, experts, parts):
    async def main():
        reader = DiskReader(index.files, io_threads=1)
        try:
            # whole experts only: a capacity just short of one more expert gives the same split
            for capacity in (experts * size, experts * size + size - 1):
                stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=capacity)
                assert stage._part == {layer: n * size for layer, n in enumerate(parts)}, capacity
                assert stage.prefetch_enabled == (capacity > 0)
                await stage.close()
        finally:
            reader.close()

    asyncio.run(main())


def test_split_counts_the_larger_of_read_and_compute_size(index, tensors, size):
    """With a compute dtype wider than the checkpoint's, an expert takes its compute size in
    the cache, and the split is in experts of that size."""
    wide = {layout.compute_bytes(torch.float64) for layout in index.experts.values()}
    assert len(wide) == 1
    wide = wide.pop()
    assert wide > size

    async def main():
        reader = DiskReader(index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float64, capacity_bytes=2 * wide)
        try:
            parts = dict(stage._part)
            await stage.get(0, [0, 1])
            stage.release(0)
            await stage.get(2, [0])
            stage.release(2)
            return parts, {l: list(c) for l, c in stage._cache.items()}, stage.statistics()
        finally:
            await stage.close()
            reader.close()

    parts, cache, stats = asyncio.run(main())
    assert parts == {0: wide, 1: wide, 2: 0}
    assert cache == {0: [1], 1: [], 2: []}
    assert stats.cached_bytes == wide and stats.bytes_read == 3 * size


def test_each_layer_keeps_its_own_lru_part(index, tensors, size):
    """Capacity for 7 experts: parts of 3, 2, 2. Each layer's hits and misses follow its own LRU,
    whatever the other layers read."""
    async def main():
        reader = _RecordingReader(index.experts, index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=7 * size)
        try:
            calls = []
            script = [(0, [0]), (0, [1]), (0, [2]), (1, [0]), (1, [1]), (2, [3, 2, 1, 0]), (0, [0]),
                      (1, [0]), (0, [3]), (1, [2]), (0, [1]), (1, [1]), (0, [2]), (0, [0]), (2, [0]),
                      (2, [2]), (2, [3])]
            for layer, experts in script:
                got, hits, misses = await _get(stage, layer, experts)
                _assert_weights(got, tensors, layer, experts)
                calls.append((layer, hits, misses))
                counts = {l: len(part) for l, part in stage._cache.items()}
                assert counts[0] <= 3 and counts[1] <= 2 and counts[2] <= 2, counts
            return calls, {l: list(c) for l, c in stage._cache.items()}, stage.statistics(), reader
        finally:
            await stage.close()
            reader.close()

    calls, cache, stats, reader = asyncio.run(main())
    assert calls == [
        (0, 0, 1), (0, 0, 1), (0, 0, 1),          # layer 0: [0, 1, 2]
        (1, 0, 1), (1, 0, 1),                     # layer 1: [0, 1]
        (2, 0, 4),                                # layer 2 keeps its last two: [1, 0]
        (0, 1, 0),                                # layer 0 untouched by layers 1 and 2: [1, 2, 0]
        (1, 1, 0),                                # layer 1: [1, 0]
        (0, 0, 1),                                # 3 evicts 1: [2, 0, 3]
        (1, 0, 1),                                # 2 evicts 1: [0, 2]
        (0, 0, 1),                                # 1 evicts 2: [0, 3, 1]
        (1, 0, 1),                                # 1 evicts 0: [2, 1]
        (0, 0, 1), (0, 0, 1),                     # 2 evicts 0: [3, 1, 2]; 0 evicts 3: [1, 2, 0]
        (2, 1, 0), (2, 0, 1), (2, 0, 1),          # layer 2: [1, 0] → [0] hit → [0, 2] → [2, 3]
    ]
    assert cache == {0: [1, 2, 0], 1: [2, 1], 2: [2, 3]}
    assert stats.misses == 17 and stats.hits == 3 and stats.requests == 20
    assert stats.bytes_read == reader.statistics().bytes_read == stats.misses * size == len(reader.reads) * size
    assert stats.cached == 7 and stats.cached_bytes == 7 * size and stats.prefetched == 0


def test_held_experts_go_beyond_the_part_until_release(index, tensors, size):
    """Capacity for 2 experts over 3 layers: layers 0 and 1 keep one each, layer 2 none. What a
    layer is using is held beyond its part (never evicted by its own reads) until release."""
    async def main():
        reader = DiskReader(index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=2 * size)
        try:
            every = list(range(EXPERTS))
            parts = _layer_counts(stage)
            first = await stage.get(2, every)             # a prefill chunk routed to all experts of layer 2
            over = stage.statistics()
            other = await stage.get(1, [2, 0])            # the next layer reads while layer 2 still holds
            both = stage.statistics()
            _assert_weights(first, tensors, 2, every)    # nothing layer 2 holds was evicted or overwritten
            _assert_weights(other, tensors, 1, [0, 2])
            again = await stage.get(2, every)             # still held: hits
            _assert_weights(again, tensors, 2, every)
            after_again = stage.statistics()
            stage.release(2)
            released_two = stage.statistics(), {l: list(c) for l, c in stage._cache.items()}
            stage.release(1)
            released_one = stage.statistics(), {l: list(c) for l, c in stage._cache.items()}
            _, hit, miss = await _get(stage, 1, [0])      # layer 1 kept its most recent expert, 0
            _, hit2, miss2 = await _get(stage, 1, [2])
            return parts, over, both, after_again, released_two, released_one, (hit, miss, hit2, miss2)
        finally:
            await stage.close()
            reader.close()

    parts, over, both, hit, (two, cache_two), (one, cache_one), later = asyncio.run(main())
    assert parts == {0: 1, 1: 1, 2: 0}
    assert over.cached == EXPERTS and over.cached_bytes == EXPERTS * size > over.capacity_bytes
    assert both.cached == EXPERTS + 2
    assert hit.hits == EXPERTS and hit.misses == EXPERTS + 2
    assert cache_two == {0: [], 1: [2, 0], 2: []}          # layer 2's part is empty; layer 1 still held
    assert two.cached == 2 and two.cached_bytes == 2 * size
    assert cache_one == {0: [], 1: [0], 2: []}
    assert one.cached == 1 and one.cached_bytes == size
    assert later == (1, 0, 0, 1)


class _Model:
    """The intended behaviour, written plainly: per-layer LRU parts of whole experts; at
    ``layer_started(l)`` the next MoE layer's last experts not cached are read ahead, placed
    least recent (in the order their reads finish: started first, finished first) and kept
    beyond the part until that layer is released; unpicked, they are the first to go."""

    def __init__(self, parts: dict[int, int], prefetch: bool) -> None:
        self.parts, self.prefetch = parts, prefetch
        layers = sorted(parts)
        self.next = dict(zip(layers, layers[1:] + layers[:1]))
        self.cache: dict[int, list[int]] = {l: [] for l in layers}     # least recent first
        self.last: dict[int, list[int]] = {}
        self.ahead: set[tuple[int, int]] = set()
        self.hits = self.misses = self.prefetched = self.prefetch_used = 0

    def layer_started(self, layer: int) -> None:
        following = self.next[layer]
        for expert in self.last.get(following, []) if self.prefetch else []:
            if expert not in self.cache[following]:
                self.cache[following].insert(0, expert)
                self.ahead.add((following, expert))
                self.prefetched += 1

    def get(self, layer: int, experts: list[int]) -> tuple[int, int]:
        hits = sum(e in self.cache[layer] for e in experts)
        self.prefetch_used += sum((layer, e) in self.ahead for e in experts)
        self.ahead -= {(layer, e) for e in experts}
        self.hits, self.misses = self.hits + hits, self.misses + len(experts) - hits
        self.cache[layer] = [e for e in self.cache[layer] if e not in experts] + list(experts)
        self.last[layer] = list(experts)
        return hits, len(experts) - hits

    def release(self, layer: int) -> None:
        self.ahead = {key for key in self.ahead if key[0] != layer}
        del self.cache[layer][:max(0, len(self.cache[layer]) - self.parts[layer])]


@pytest.mark.parametrize("experts,parts", [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (1, 1, 0)), (4, (2, 1, 1)),
                                           (7, (3, 2, 2))])
def test_sweeps_with_read_ahead_match_the_model(index, tensors, size, experts, parts):
    """Sweeps as the runner makes them (layer_started, get, release per MoE layer), with routes
    that mostly repeat: every get's hits and misses, the read-ahead counts, each layer's part and
    the bytes read are those of the model."""
    rng = random.Random(experts)

    async def main():
        reader = _RecordingReader(index.experts, index.files, io_threads=1)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=experts * size)
        model = _Model(dict(enumerate(parts)), prefetch=experts > 0)
        routes = {layer: sorted(rng.sample(range(EXPERTS), EXPERTS)) for layer in range(LAYERS)}   # prefill: all
        try:
            assert _layer_counts(stage) == model.parts
            for sweep in range(25):
                for layer in range(LAYERS):
                    stage.layer_started(layer)
                    model.layer_started(layer)
                    assert stage.statistics().prefetched == model.prefetched, (sweep, layer)
                    _, hits, misses = _counts(stage)
                    got = await stage.get(layer, routes[layer])
                    _assert_weights(got, tensors, layer, routes[layer])
                    s = stage.statistics()
                    assert (s.hits - hits, s.misses - misses) == model.get(layer, routes[layer]), (sweep, layer)
                    stage.release(layer)
                    model.release(layer)
                    assert len(stage._cache[layer]) <= model.parts[layer]
                    s = stage.statistics()
                    assert (s.prefetched, s.prefetch_used) == (model.prefetched, model.prefetch_used)
                    assert s.hits + s.misses == s.requests
                await _drain(stage)
                assert {l: set(c) for l, c in stage._cache.items()} == {l: set(c) for l, c in model.cache.items()}
                s = stage.statistics()
                assert s.bytes_read == (s.misses + s.prefetched) * size == len(reader.reads) * size
                assert s.bytes_read == reader.statistics().bytes_read
                assert s.cached_bytes == s.cached * size
                for layer in range(LAYERS):          # decode: k=2 experts, usually those of last time
                    if sweep == 0 or rng.random() < 0.3:
                        routes[layer] = sorted(rng.sample(range(EXPERTS), 2))
            return stage.statistics()
        finally:
            await stage.close()
            reader.close()

    stats = asyncio.run(main())
    assert stats.misses > 0
    if experts == 0:
        assert stats.prefetched == 0 and stats.hits == 0
    else:
        assert stats.prefetch_used > 0 and stats.prefetched > stats.prefetch_used   # some bets lost
        assert stats.prefetch_used <= stats.hits


def test_read_ahead_of_the_next_layers_last_experts(index, tensors, size):
    """Capacity for 2 experts: layers 0 and 1 keep one expert each, layer 2 none. Each sweep
    routes every layer to [0, 1]; from the second sweep on, each layer finds both experts,
    one in its part and one read ahead while the previous layer computed (layer 2's two, which
    it cannot keep, both read ahead; the last layer reads ahead for the first)."""
    async def main():
        reader = _RecordingReader(index.experts, index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=2 * size)
        try:
            sweeps = []
            for routes in ([[0, 1]] * 3, [[0, 1]] * 3, [[0, 1], [2, 3], [0, 1]], [[0, 1], [2, 3], [0, 1]]):
                before, first = stage.statistics(), len(reader.reads)
                for layer, experts in enumerate(routes):
                    stage.layer_started(layer)
                    got = await stage.get(layer, experts)
                    _assert_weights(got, tensors, layer, experts)
                    stage.release(layer)
                await _drain(stage)
                after = stage.statistics()
                sweeps.append((after.hits - before.hits, after.misses - before.misses,
                               after.prefetched - before.prefetched, after.prefetch_used - before.prefetch_used,
                               reader.reads[first:], {l: list(c) for l, c in stage._cache.items()}))
            return sweeps, stage.statistics(), reader
        finally:
            await stage.close()
            reader.close()

    sweeps, stats, reader = asyncio.run(main())
    hits, misses, prefetched, used, reads, cache = sweeps[0]
    assert (hits, misses, prefetched, used) == (0, 6, 1, 0)
    assert reads == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (2, 0), (2, 1)]   # layer_started(2): (0, 0) ahead
    assert cache == {0: [0, 1], 1: [1], 2: []}   # layer 0's read-ahead of 0, held until its release
    hits, misses, prefetched, used, reads, cache = sweeps[1]
    assert (hits, misses, prefetched, used) == (6, 0, 4, 4)
    assert reads == [(1, 0), (2, 0), (2, 1), (0, 0)] and cache == {0: [0, 1], 1: [1], 2: []}
    # layer 1 routed elsewhere: its read-ahead of 0 is not used, and is the first to go
    hits, misses, prefetched, used, reads, cache = sweeps[2]
    assert (hits, misses, prefetched, used) == (4, 2, 4, 3)
    assert reads == [(1, 0), (2, 0), (2, 1), (1, 2), (1, 3), (0, 0)] and cache == {0: [0, 1], 1: [3], 2: []}
    hits, misses, prefetched, used, reads, cache = sweeps[3]
    assert (hits, misses, prefetched, used) == (6, 0, 4, 4)
    assert reads == [(1, 2), (2, 0), (2, 1), (0, 0)] and cache == {0: [0, 1], 1: [3], 2: []}
    assert stats.prefetched == 13 and stats.prefetch_used == 11 and stats.misses == 8
    assert stats.bytes_read == (stats.misses + stats.prefetched) * size == reader.statistics().bytes_read


@pytest.mark.parametrize("timing", ["read before the layer", "still reading at release"])
def test_an_unpicked_read_ahead_is_the_first_to_go(index, tensors, size, timing):
    """Layer 1 keeps two experts (capacity 5: parts 2, 2, 1). It used [1, 2, 3] and kept 2, 3;
    1 is read ahead for it; the router then picks only 3. On release the read-ahead 1 (the
    newest read) goes, not 2 — also when its read finishes after the release."""
    async def main():
        reader = _RecordingReader(index.experts, index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=5 * size)
        try:
            assert _layer_counts(stage) == {0: 2, 1: 2, 2: 1}
            await _get(stage, 1, [1, 2, 3])
            assert list(stage._cache[1]) == [2, 3]
            if timing.startswith("still"):
                reader.hold((1, 1))
            stage.layer_started(0)
            assert stage.statistics().prefetched == 1 and list(stage._reads) == [(1, 1)]
            if timing.startswith("read"):
                await _drain(stage)
                assert list(stage._cache[1]) == [1, 2, 3]      # beyond the part, least recent
            _, hits, misses = await _get(stage, 1, [3])
            assert (hits, misses) == (1, 0)
            if timing.startswith("still"):
                assert (1, 1) in stage._reads
                reader.let_go((1, 1))
                await _drain(stage)
            cache = list(stage._cache[1])
            _, hit2, miss2 = await _get(stage, 1, [2])
            return cache, (hit2, miss2), stage.statistics()
        finally:
            await stage.close()
            reader.close()

    cache, later, stats = asyncio.run(main())
    assert cache == [2, 3] and later == (1, 0)
    assert stats.prefetched == 1 and stats.prefetch_used == 0 and stats.misses == 3
    assert stats.bytes_read == (stats.misses + stats.prefetched) * size


@pytest.mark.parametrize("capacity,prefetch", [(0, True), (4, False)])
def test_no_read_ahead_without_a_cache_or_when_off(index, tensors, size, capacity, prefetch):
    """capacity_bytes=0 (or prefetch=False): exactly the routed experts are read, each when picked."""
    async def main():
        reader = _RecordingReader(index.experts, index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=capacity * size,
                            prefetch=prefetch)
        assert not stage.prefetch_enabled
        try:
            for routes in ([0, 1], [0, 1], [1, 2]):
                for layer in range(LAYERS):
                    n, cached = len(reader.reads), set(stage._cache[layer])
                    stage.layer_started(layer)
                    await _drain(stage)
                    assert len(reader.reads) == n               # nothing read ahead
                    await _get(stage, layer, routes)
                    assert reader.reads[n:] == [(layer, e) for e in routes if e not in cached]
            return stage.statistics(), reader
        finally:
            await stage.close()
            reader.close()

    stats, reader = asyncio.run(main())
    assert stats.prefetched == 0 and stats.prefetch_used == 0
    assert stats.bytes_read == stats.misses * size == len(reader.reads) * size == reader.statistics().bytes_read
    if capacity == 0:
        assert stats.misses == stats.requests == 18 and stats.hits == 0 and stats.cached == 0
    else:                       # parts 2, 1, 1: layer 0 finds 0, 1 then 1; layers 1, 2 find 1 twice
        assert (stats.hits, stats.misses) == (3 + 2 + 2, 18 - 7)


def _tensor_extents(layout) -> list[tuple[int, int]]:
    """(start, end) file offsets of a layout's tensors."""
    extents = []
    for t in layout.tensors:
        r = next(r for r in layout.ranges if r.buffer_offset <= t.buffer_offset < r.buffer_offset + r.nbytes)
        start = r.file_offset + t.buffer_offset - r.buffer_offset
        extents.append((start, start + t.nbytes))
    return extents


def _truncated_copy(index: CheckpointIndex, directory: Path):
    """A copy of the checkpoint file and the expert layouts pointing at it; the expert whose
    bytes come last in the file, and the file offset where its first tensor starts."""
    source = index.files[0]
    copy = str(directory / "copy.safetensors")
    shutil.copyfile(source, copy)
    layouts = {key: dataclasses.replace(layout, ranges=tuple(dataclasses.replace(r, path=copy)
                                                             for r in layout.ranges))
               for key, layout in index.experts.items()}
    last = max(layouts, key=lambda key: min(_tensor_extents(layouts[key])))
    return copy, layouts, last, min(_tensor_extents(layouts[last]))[0]


class _Unretrieved:
    """Collects what the event loop reports (e.g. a task exception never retrieved)."""

    def __init__(self) -> None:
        self.reports: list[str] = []

    def install(self) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: self.reports.append(ctx["message"]))

    def check(self) -> None:
        gc.collect()
        assert self.reports == []


@pytest.mark.parametrize("when", ["after the reader opened it", "before the reader opened it"])
def test_failed_read_raises_to_the_caller_and_leaves_the_stage_usable(index, tensors, size, tmp_path, when):
    copy, layouts, (layer, expert), cut = _truncated_copy(index, tmp_path)
    original = Path(copy).read_bytes()
    other = next(e for e in range(EXPERTS) if e != expert)
    assert max(end for _, end in _tensor_extents(layouts[(layer, other)])) <= cut
    unretrieved = _Unretrieved()

    async def main():
        unretrieved.install()
        if when.startswith("before"):
            os.truncate(copy, cut)
        reader = DiskReader([copy], io_threads=2)
        if when.startswith("after"):
            os.truncate(copy, cut)
        stage = ExpertStage(layouts, reader, torch.float32, capacity_bytes=2 * LAYERS * size)   # 2 a layer
        try:
            # the reader's error, naming the file (a short read it delivered, or the end of file it met)
            message = "file ended at byte" if when.startswith("after") else "was the file truncated"
            with pytest.raises(TransferError, match=f"copy.safetensors.*{message}"):
                await stage.get(layer, [expert])
            stage.release(layer)
            failed = stage.statistics()
            # the stage goes on: another expert of the same layer reads and is right
            got = await stage.get(layer, [other])
            _assert_weights(got, tensors, layer, [other])
            stage.release(layer)
            if when.startswith("after"):
                Path(copy).write_bytes(original)      # the file is whole again: the same expert reads
                got = await stage.get(layer, [expert])
                _assert_weights(got, tensors, layer, [expert])
                stage.release(layer)
            else:                                     # the reader still sees the short file: it fails again
                with pytest.raises(TransferError, match="copy.safetensors"):
                    await stage.get(layer, [expert])
                stage.release(layer)
            return failed, stage.statistics()
        finally:
            await stage.close()
            reader.close()
            unretrieved.check()

    failed, after = asyncio.run(main())
    assert failed.misses == 1 and failed.cached == 0 and failed.bytes_read == 0
    assert after.cached_bytes <= 2 * size and after.prefetched == 0
    if when.startswith("after"):
        assert after.cached == 2 and after.bytes_read == 2 * size and after.misses == 3
    else:
        assert after.cached == 1 and after.bytes_read == size and after.misses == 3


@pytest.mark.parametrize("timing", ["finished before the layer asks", "in flight when the layer asks"])
def test_failed_read_ahead_surfaces_only_when_asked_for_and_is_read_again(index, tensors, size, tmp_path, timing):
    """A read-ahead of an expert whose bytes are cut off fails in the background: nothing
    raises at layer_started nor in the previous layer's get. The layer that then asks for the
    expert gets the TransferError — from the read-ahead itself while it is still in flight, or
    from a new read when it already failed — and a later request reads the expert again."""
    copy, layouts, (layer, expert), cut = _truncated_copy(index, tmp_path)
    original = Path(copy).read_bytes()
    other = next(e for e in range(EXPERTS) if e != expert)
    previous = (layer - 1) % LAYERS
    unretrieved = _Unretrieved()

    async def main():
        unretrieved.install()
        reader = _RecordingReader(layouts, [copy], io_threads=2)
        stage = ExpertStage(layouts, reader, torch.float32, capacity_bytes=2 * LAYERS * size)   # 2 a layer
        try:
            os.truncate(copy, cut)
            with pytest.raises(TransferError, match="copy.safetensors"):
                await stage.get(layer, [other, expert])   # last time: `other` read, `expert` failed
            stage.release(layer)
            await _drain(stage)
            assert list(stage._cache[layer]) == [other] and reader.reads.count((layer, expert)) == 1
            in_flight = timing.startswith("in flight")
            if in_flight:
                reader.hold((layer, expert))
            stage.layer_started(previous)                 # reads `expert` ahead: it fails, silently
            got = await stage.get(previous, [0])
            _assert_weights(got, tensors, previous, [0])
            stage.release(previous)
            if not in_flight:
                await _drain(stage)
            assert reader.reads.count((layer, expert)) == 2
            before = stage.statistics()
            assert before.prefetched == 1
            getter = asyncio.create_task(stage.get(layer, [other, expert]))
            if in_flight:
                await asyncio.sleep(0.05)
                assert not getter.done()
                reader.let_go((layer, expert))
            with pytest.raises(TransferError, match="copy.safetensors"):
                await getter
            stage.release(layer)
            await _drain(stage)
            failed = stage.statistics()
            reads_when_asked = reader.reads.count((layer, expert))
            Path(copy).write_bytes(original)          # whole again: the next request reads it again
            got = await stage.get(layer, [expert, other])
            _assert_weights(got, tensors, layer, [expert, other])
            stage.release(layer)
            return before, failed, reads_when_asked, reader.reads.count((layer, expert)), stage.statistics()
        finally:
            await stage.close()
            reader.close()
            unretrieved.check()

    before, failed, reads_when_asked, reads, after = asyncio.run(main())
    if timing.startswith("in flight"):        # the read-ahead's own failure: a hit, not read again then
        assert (failed.hits - before.hits, failed.misses - before.misses) == (2, 0)
        assert failed.prefetch_used == 1 and reads_when_asked == 2
    else:                                     # the failed read-ahead is not reused: read again on demand
        assert (failed.hits - before.hits, failed.misses - before.misses) == (1, 1)
        assert failed.prefetch_used == 0 and reads_when_asked == 3
    assert reads == reads_when_asked + 1
    assert failed.bytes_read == 2 * size and failed.cached == 2    # `other` and layer `previous`'s 0
    assert after.bytes_read == 3 * size and (after.hits - failed.hits, after.misses - failed.misses) == (1, 1)
    assert after.prefetched == 1


class _GatedReader(DiskReader):
    """A DiskReader whose reads wait for ``gate`` (to catch them in flight)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.gate = threading.Event(), threading.Event()

    def _read_block(self, *args, **kwargs) -> int:
        self.entered.set()
        self.gate.wait(10)
        return super()._read_block(*args, **kwargs)


async def _get_then_close(index, size):
    """A get whose reads are in flight (held at the gate) when the stage closes. Returns
    (whether close returned while the reads' threads had not finished, the get's outcome,
    tierflow-expert tasks still pending, the stage's statistics)."""
    reader = _GatedReader(index.files, io_threads=2)
    stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=4 * size)
    try:
        getter = asyncio.create_task(stage.get(0, [0, 1, 2]))
        for _ in range(1000):
            if reader.entered.is_set():
                break
            await asyncio.sleep(0.005)
        assert reader.entered.is_set()
        closing = asyncio.create_task(stage.close())
        await asyncio.sleep(0.05)
        early = closing.done() and reader.statistics().requests == 0
        reader.gate.set()
        await asyncio.wait_for(closing, 10)
        try:
            await asyncio.wait_for(getter, 10)
            outcome = "returned"
        except asyncio.CancelledError:
            outcome = "cancelled"
        pending = [t for t in asyncio.all_tasks() if t.get_name().startswith("tierflow-expert")]
        return early, outcome, pending, stage.statistics()
    finally:
        reader.gate.set()
        reader.close()


def test_close_cancels_in_flight_reads(index, size):
    _, outcome, pending, stats = asyncio.run(_get_then_close(index, size))
    assert outcome == "cancelled"                 # the layer waiting for them learns it
    assert pending == []
    assert stats.cached == 0 and stats.cached_bytes == 0 and stats.bytes_read == 0


def test_close_returns_after_the_cancelled_reads_threads_stopped(index, size):
    """The reader's threads write into the read's buffer: close (which cancels the reads)
    must not return before they stop. DiskReader.read's guard (``await asyncio.wait(futures)``
    after a failure) does not hold for a cancellation, whose gather has already cancelled
    those futures while their threads still run."""
    early, _, _, _ = asyncio.run(_get_then_close(index, size))
    assert not early, "ExpertStage.close() returned while a cancelled read's thread was still reading"


def test_read_all_reads_every_expert_but_returns_the_requested(index, tensors, size):
    async def main():
        reader = DiskReader(index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=0, read_all=True)
        try:
            got = await stage.get(2, [1])
            _assert_weights(got, tensors, 2, [1])
            stage.release(2)
            stage.layer_started(2)                # read_all has no prefetch
            return stage.statistics(), reader.statistics().bytes_read
        finally:
            await stage.close()
            reader.close()

    stats, disk = asyncio.run(main())
    assert (stats.requests, stats.misses) == (EXPERTS, EXPERTS)
    assert stats.bytes_read == disk == EXPERTS * size
    assert stats.prefetched == 0 and stats.cached == 0


def test_preload_reads_everything_once(index, tensors, size):
    async def main():
        reader = DiskReader(index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=LAYERS * EXPERTS * size)
        try:
            assert stage.total_bytes == LAYERS * EXPERTS * size
            await stage.preload()
            loaded = stage.statistics()
            for layer in range(LAYERS):
                stage.layer_started(layer)
                got = await stage.get(layer, [0, 3])
                _assert_weights(got, tensors, layer, [0, 3])
                stage.release(layer)
            return loaded, stage.statistics(), reader.statistics().bytes_read
        finally:
            await stage.close()
            reader.close()

    loaded, after, disk = asyncio.run(main())
    assert loaded.bytes_read == disk == LAYERS * EXPERTS * size and loaded.cached == LAYERS * EXPERTS
    assert after.bytes_read == loaded.bytes_read                  # every later request hits
    assert after.requests == after.hits == 2 * LAYERS and after.hit_rate == 1.0


@pytest.mark.parametrize("cached", range(EXPERTS + 1))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measured_routing_predicts_the_lru_parts_hits_at_every_size(index, size, cached, seed):
    """The routing statistics a stage records (LRU stack distances of the router's picks) give,
    for a cache of ``cached`` experts per layer, exactly the hits a stage of that size scores on
    the same picks (no read-ahead: get and release, one layer at a time)."""
    rng = random.Random(seed)
    script = [(rng.randrange(LAYERS), rng.sample(range(EXPERTS), rng.randint(1, 3))) for _ in range(40)]

    async def main():
        reader = DiskReader(index.files, io_threads=2)
        stage = ExpertStage(index.experts, reader, torch.float32, capacity_bytes=cached * LAYERS * size)
        try:
            for layer, experts in script:
                await _get(stage, layer, experts)
            return stage.statistics()
        finally:
            await stage.close()
            reader.close()

    stats = asyncio.run(main())
    routing = stats.routing
    assert routing.requests == stats.requests == sum(len(e) for _, e in script)
    assert stats.prefetched == 0
    assert routing.hits(cached) == stats.hits
    assert routing.hits(EXPERTS) == routing.requests - routing.cold
