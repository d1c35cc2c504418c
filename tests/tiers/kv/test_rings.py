"""Sliding-window rings in the paged KV store: block tables release a ring's leading blocks with
stable indexes, no slot ever has two owners, a layer holds exactly what ``KVLayout.layer_blocks``
says; through whole sweeps of the kv stages (prefetched disk reads, spills on the writer thread)
slots freed by one sequence's ring and rewritten by another's blocks never corrupt a read;
released blocks cannot be read; the prefix cache remembers what every layer holds and attaching
fills rings as a prefill would."""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.stages.kv import KVLoadPlan, KVRead, KVStages, plan_loads
from tierflow.stages.prefix import PrefixReuse
from tierflow.tiers.kv.blocks import KVBlockTables
from tierflow.tiers.kv.handle import first_visible
from tierflow.tiers.kv.layout import KVLayout
from tierflow.tiers.kv.paged import KVStore
from tierflow.tiers.kv.prefix import PrefixCache

BT = 4
HEADS, DIM = 2, 3


@dataclass(frozen=True)
class _Spec:
    """What plan_loads reads of a ModelSpec."""
    num_layers: int
    windows: tuple[int | None, ...]

    def window(self, layer: int) -> int | None:
        return self.windows[layer]


def _tokens(seq: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values that say which sequence and position they belong to."""
    pos = torch.arange(start, start + n, dtype=torch.float32)
    k = (seq * 10_000 + pos).view(n, 1, 1).expand(n, HEADS, DIM).contiguous()
    return k, -k


def _store(directory, layout: KVLayout, *, device=0, host=0, disk=64) -> KVStore:
    return KVStore(num_layers=layout.num_layers, num_kv_heads=HEADS, head_dim=DIM, dtype=torch.float32,
                   device=torch.device("cpu"), block_tokens=layout.block_tokens, device_blocks=device,
                   host_blocks=host, disk_blocks=disk, spill_dir=directory, layout=layout)


# ----------------------------------------------------------------------------- block tables, pure
windows_st = st.lists(st.one_of(st.none(), st.integers(1, 20)), min_size=1, max_size=3)
steps_st = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 9), st.booleans()), max_size=40)


@settings(max_examples=200, deadline=None)
@given(windows=windows_st, steps=steps_st)
def test_ring_tables_hold_what_the_layout_says_and_no_slot_has_two_owners(windows, steps):
    """Sweeps of random sizes over three sequences, each appending as the store does (release
    the ring from the sweep's first query, then commit the blocks its tokens fill), some freed."""
    layout = KVLayout(BT, tuple(windows))
    t = KVBlockTables({"device": 10_000}, num_layers=layout.num_layers, block_tokens=BT)
    spans: dict[int, tuple[int, int]] = {}               # seq -> (its last sweep's first query, end)
    homes: dict[tuple[int, int, int], object] = {}       # (seq, layer, index) -> its ref when committed
    for seq, n, free in steps:
        if free:
            t.free_sequence(seq)
            spans.pop(seq, None)
            homes = {key: ref for key, ref in homes.items() if key[0] != seq}
            continue
        q = spans.get(seq, (0, 0))[1]
        end = q + n
        for layer, w in enumerate(layout.windows):
            t.release_before(seq, layer, layout.first_kept_block(w, q))
            while (index := t.committed(seq, layer)) < end // BT:
                homes[(seq, layer, index)] = t.append_block(seq, layer)
            assert len(t.table(seq, layer)) == t.held(seq)[layer] == layout.layer_blocks(w, q, end)
            assert t.first_held(seq, layer) + len(t.table(seq, layer)) == end // BT
            for i in range(t.first_held(seq, layer), end // BT):     # indexes are stable
                assert t.ref(seq, layer, i) == homes[(seq, layer, i)]
            if t.first_held(seq, layer):
                with pytest.raises(ValueError, match="released"):
                    t.ref(seq, layer, t.first_held(seq, layer) - 1)
        spans[seq] = (q, end)
        owned = [ref for s in t.sequences() for layer in range(layout.num_layers) for ref in t.table(s, layer)]
        assert len(owned) == len(set(owned)) == t.statistics().device.used
        assert len(owned) == sum(layout.blocks(*span) for span in spans.values())
    for seq in list(t.sequences()):
        t.free_sequence(seq)
    assert t.statistics().device.used == 0


def test_a_slot_a_ring_releases_is_taken_by_the_next_block_of_any_sequence():
    t = KVBlockTables({"device": 3}, num_layers=1, block_tokens=BT)
    a = [t.append_block(0, 0) for _ in range(3)]
    assert t.release_before(0, 0, 2) == tuple(a[:2])
    assert t.append_block(1, 0) == a[0]                    # the lowest free slot, at once
    assert t.table(0, 0) == (a[2],) and t.first_held(0, 0) == 2 and t.committed(0, 0) == 3
    old, new = t.move(0, 0, 2, "device")                  # indexes stay what they were
    assert old == a[2] and t.ref(0, 0, 2) == new
    with pytest.raises(ValueError, match="released"):
        t.move(0, 0, 1, "device")


# ----------------------------------------------------------------------------- the store through sweeps
async def _sweep(store: KVStore, stages: KVStages, spec: _Spec, kvs: dict, lengths: dict, sizes: dict) -> None:
    """One sweep as the runner drives it: the plan first (reads start at once), then layer by
    layer each sequence appends and attends over what its window sees; the layer's new blocks
    are written after it, on the writer thread."""
    handles, starts = list(kvs.values()), [lengths[s] for s in kvs]
    stages.begin(plan_loads(spec, handles, starts), handles)
    try:
        for layer, w in enumerate(spec.windows):
            for seq, kv in kvs.items():
                q, n = lengths[seq], sizes[seq]
                kv.append(layer, *_tokens(seq, q, n))
                assert store.tables.held(seq)[layer] == store.layout.layer_blocks(w, q, q + n)
                blocks = list(kv.blocks(layer, first_visible(q, w)))
                keys = torch.cat([b.keys for b in blocks], dim=1).transpose(0, 1)
                first = blocks[0].first
                assert first <= first_visible(q, w) and torch.equal(keys, _tokens(seq, first, q + n - first)[0])
            stages.after_layer(layer)
    finally:
        await stages.end()
    for seq in kvs:
        lengths[seq] += sizes[seq]


@pytest.mark.parametrize("tiers", [dict(disk=400), dict(device=6, host=6, disk=400)])
def test_sweeps_over_rings_reuse_freed_slots_without_corrupting_a_prefetched_read(tmp_path, tiers):
    """Three sequences, a windowed and a full layer, KV on disk (or over every tier): 40 sweeps of
    prefill chunks and decode tokens. Rings free slots that other sequences' new blocks take and
    rewrite in the same sweep while the loader reads ahead; every block attention takes holds its
    own tokens, every take was planned, no read fails its checksum, and no slot has two owners."""
    spec = _Spec(2, (6, None))
    layout = KVLayout(BT, spec.windows)
    store = _store(tmp_path, layout, **tiers)
    stages = KVStages(store)
    rng = random.Random(7)
    try:
        kvs = {seq: store.sequence(seq) for seq in range(3)}
        lengths = dict.fromkeys(kvs, 0)
        for sweep in range(40):
            sizes = {seq: rng.choice([1, 1, 2, 5, 9]) for seq in kvs}
            if sweep == 20:                    # one sequence ends; a new one takes its slots
                kvs.pop(1).free()
                lengths.pop(1)
                kvs[3], lengths[3] = store.sequence(3), 0
                sizes = {seq: sizes.get(seq, 7) for seq in kvs}
            asyncio.run(_sweep(store, stages, spec, kvs, lengths, sizes))
            owned = [r for s in store.tables.sequences() for layer in range(2) for r in store.tables.table(s, layer)]
            assert len(owned) == len(set(owned)) == sum(p.used for p in store.statistics().by_tier().values())
        committed = sum(store.tables.committed(seq, layer) for seq in kvs for layer in range(2))
        assert store.tables.pools["disk"].high_water < committed - 40     # freed slots were taken again
        stats = stages.loader.statistics()
        assert stats.unplanned == 0 and stats.read > 0 and stages.spiller.statistics().failed == 0
        assert all(kv.failure is None for kv in kvs.values())
    finally:
        store.close()


def test_a_ring_keeps_a_block_the_sweeps_plan_still_reads(tmp_path):
    """Should a sweep's plan reach further back than the ring (it never does when the plan is
    made from the layer's length), the ring keeps that block held until the next sweep."""
    layout = KVLayout(BT, (4,))
    store = _store(tmp_path, layout)
    stages = KVStages(store)
    try:
        kv = store.sequence(0)
        kv.append(0, *_tokens(0, 0, 12))                     # blocks 0..2 on disk
        plan = KVLoadPlan(tuple(KVRead(0, 0, b.index, b.ref) for b in kv.off_device(0)))   # from block 0
        stages.begin(plan, [kv])
        kv.append(0, *_tokens(0, 12, 1))                     # from 12 the window starts at block 2
        assert store.tables.first_held(0, 0) == 0             # block 0 is in the plan: held
        stages.after_layer(0)
        asyncio.run(stages.end())
        kv.append(0, *_tokens(0, 13, 1))                     # no plan now: the ring moves on
        assert store.tables.first_held(0, 0) == 2 and store.tables.held(0) == (1,)
    finally:
        store.close()


def test_a_released_block_cannot_be_read(tmp_path):
    layout = KVLayout(BT, (None, 5))
    store = _store(tmp_path, layout)
    try:
        kv = store.sequence(0)
        for layer in range(2):
            kv.append(layer, *_tokens(0, 0, 16))
            kv.append(layer, *_tokens(0, 16, 1))             # the window from 16 sees 12.. : blocks 0..2 go
        assert kv.held_from(0) == 0 and kv.held_from(1) == 12
        assert torch.equal(kv.read(0, 0, 16)[0].transpose(0, 1), _tokens(0, 0, 16)[0])
        assert torch.equal(kv.read(1, 12, 16)[0].transpose(0, 1), _tokens(0, 12, 4)[0])
        with pytest.raises(ValueError, match="sliding window .*released the blocks before token 12"):
            kv.read(1, 8, 16)
        with pytest.raises(ValueError, match="holds KV from token 12"):
            kv.blocks(1, 0)
        with pytest.raises(ValueError, match="holds KV from token 12"):
            kv.off_device(1, 4)
    finally:
        store.close()


def test_a_layout_that_does_not_match_the_store_is_refused(tmp_path):
    with pytest.raises(ValueError, match="layout: 2 layers of 4-token blocks"):
        KVStore(num_layers=3, num_kv_heads=HEADS, head_dim=DIM, dtype=torch.float32, device=torch.device("cpu"),
                block_tokens=BT, device_blocks=4, host_blocks=0, disk_blocks=0, spill_dir=None,
                layout=KVLayout(BT, (None, 5)))


# ----------------------------------------------------------------------------- the prefix cache over rings
def test_prefix_cache_remembers_what_every_layer_holds_and_attach_fills_rings(tmp_path):
    """Remembering after every prefill chunk caches a windowed prompt whole (a ring still holds
    each block when its chunk ends); remembering only at the end stops at the first block a ring
    released. Attaching the cached prefix leaves each layer holding what a prefill to there
    would, with the same bytes."""
    layout = KVLayout(BT, (None, 5, 3))
    cache = PrefixCache(hashlib.sha256(b"m").hexdigest(), (3, 2, HEADS, BT, DIM), torch.float32,
                        memory_bytes=2**20)
    reuse = PrefixReuse(cache, 3)
    tokens = list(range(1, 31))
    store = _store(tmp_path, layout, device=8, disk=64)
    try:
        late, eager = store.sequence(0), store.sequence(1)
        done = 0
        for start in range(0, 30, 7):
            n = min(7, 30 - start)
            for kv in (late, eager):
                for layer in range(3):
                    kv.append(layer, *_tokens(9, start, n))
            done = reuse.remember(eager, tokens, done)
        assert done == 7 and all(cache.contains(key) for key in cache.keys(tokens[:28]))
        cache_only_late = PrefixReuse(PrefixCache(hashlib.sha256(b"n").hexdigest(), (3, 2, HEADS, BT, DIM),
                                                  torch.float32, memory_bytes=2**20), 3)
        assert cache_only_late.remember(late, tokens, 0) == 0      # block 0 is gone from the rings: a gap

        attached = store.sequence(2)
        assert reuse.attach(attached, tokens + [99]) == 28
        for layer, w in enumerate(layout.windows):
            assert store.tables.held(2)[layer] == layout.layer_blocks(w, 28, 28)
            first = attached.held_from(layer)
            assert first == layout.first_kept_block(w, 28) * BT
            assert torch.equal(attached.read(layer, first, 28), eager.read(layer, first, 28))
    finally:
        store.close()
