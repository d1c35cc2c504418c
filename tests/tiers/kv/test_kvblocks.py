"""Paged KV bookkeeping: placement order, capacity, moves, frees; no slot ever has two owners."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tierflow.errors import TierCapacityError
from tierflow.tiers.kv.blocks import BlockRef, KVBlockTables


def test_new_blocks_go_to_the_fastest_tier_with_room():
    t = KVBlockTables({"device": 2, "host": 1, "disk": 3}, num_layers=2, block_tokens=16)
    refs = [t.append_block(7, layer=0) for _ in range(4)]
    assert [r.tier for r in refs] == ["device", "device", "host", "disk"]
    assert t.table(7, 0) == tuple(refs) and t.table(7, 1) == ()
    assert {k: v.used for k, v in t.statistics().by_tier().items()} == {"device": 2, "host": 1, "disk": 1}
    assert t.blocks_for(33) == 3 * 2


def test_a_tier_can_be_forced_empty_and_a_full_cache_is_a_capacity_error():
    t = KVBlockTables({"device": 0, "disk": 1}, num_layers=1, block_tokens=16)
    assert t.append_block(1, 0).tier == "disk"
    with pytest.raises(TierCapacityError, match="the KV cache is full"):
        t.append_block(1, 0)


def test_moves_keep_the_old_slot_until_released_and_frees_return_everything():
    t = KVBlockTables({"device": 1, "disk": 2}, num_layers=1, block_tokens=16)
    t.append_block(1, 0)
    old, new = t.move(1, 0, 0, "disk")
    assert old == BlockRef("device", 0) and new.tier == "disk" and t.table(1, 0) == (new,)
    assert t.statistics().device.used == 1          # not yet released: the copy may be in flight
    t.release(old)
    assert t.statistics().device.used == 0
    assert t.free_sequence(1) == 1 and t.free_sequence(1) == 0
    assert all(s.used == 0 for s in t.statistics().by_tier().values())
    with pytest.raises(ValueError, match="not allocated"):
        t.release(old)


ops = st.lists(st.tuples(st.sampled_from(["append", "move", "free"]), st.integers(0, 3), st.integers(0, 1),
                         st.sampled_from(["device", "host", "disk"])), max_size=60)


@settings(max_examples=150, deadline=None)
@given(caps=st.fixed_dictionaries({"device": st.integers(0, 4), "host": st.integers(0, 4), "disk": st.integers(0, 6)}),
       operations=ops)
def test_no_slot_is_ever_owned_twice(caps, operations):
    t = KVBlockTables(caps, num_layers=2, block_tokens=8)
    for op, seq, layer, tier in operations:
        try:
            if op == "append":
                t.append_block(seq, layer)
            elif op == "move" and t.table(seq, layer):
                old, _ = t.move(seq, layer, 0, tier)
                t.release(old)
            elif op == "free":
                t.free_sequence(seq)
        except TierCapacityError:
            pass
        owned = [ref for s in t.sequences() for layer_ in range(2) for ref in t.table(s, layer_)]
        assert len(owned) == len(set(owned))
        for name, stats in t.statistics().by_tier().items():
            assert stats.used == sum(1 for ref in owned if ref.tier == name) <= stats.capacity


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 60), st.sampled_from([2, 4, 16]), st.integers(1, 3))
def test_disk_runs_keep_every_slot_owned_once_and_the_pool_fills(data, capacity, extent, layers):
    """With runs of ``extent`` slots on disk, any mix of appends, roll-backs, ring releases and
    finished sequences never gives a slot to two blocks, counts slots set aside as free, and a
    full pool has every slot in use (the slots set aside are handed out last)."""
    t = KVBlockTables({"disk": capacity}, num_layers=layers, block_tokens=4, disk_extent=extent)
    pool = t.pools["disk"]
    for _ in range(data.draw(st.integers(1, 150))):
        seq, layer = data.draw(st.integers(0, 4)), data.draw(st.integers(0, layers - 1))
        op = data.draw(st.sampled_from(["append", "append", "append", "free", "truncate", "ring"]))
        if op == "append":
            try:
                t.append_block(seq, layer)
            except TierCapacityError:
                assert pool.statistics().used == capacity
        elif op == "free":
            t.free_sequence(seq)
        elif op == "truncate":
            t.release_from(seq, layer, data.draw(st.integers(0, t.committed(seq, layer))))
        else:
            t.release_before(seq, layer, data.draw(st.integers(0, t.committed(seq, layer))))
        held = [ref.slot for s in t.sequences() for l in range(layers) for ref in t.table(s, l)]
        assert len(held) == len(set(held)) == pool.statistics().used
        assert all(0 <= slot < capacity for slot in held)
        assert len(pool._released) <= 2 * pool.high_water + 65           # stale heap entries are dropped


def test_disk_runs_do_not_grow_the_spill_file_past_twice_what_is_used():
    """Many owners with one block each (a 36-layer model's first blocks over 8 sequences) set
    aside slots of runs they may never use; new runs stop once those outnumber the slots in use
    by more than SPARE_RUNS runs."""
    from tierflow.tiers.kv.pool import SPARE_RUNS

    t = KVBlockTables({"disk": 100_000}, num_layers=36, block_tokens=256, disk_extent=16)
    for seq in range(8):
        for layer in range(36):
            t.append_block(seq, layer)
    used = t.pools["disk"].statistics().used
    assert used == 288 and t.pools["disk"].high_water <= 2 * used + (SPARE_RUNS + 2) * 16


def test_disk_runs_keep_each_layers_blocks_consecutive_while_layers_take_turns():
    """A prefill commits a few blocks of each layer in turn; each layer's blocks still sit in
    consecutive slots, in runs of the extent."""
    t = KVBlockTables({"disk": 1000}, num_layers=4, block_tokens=256, disk_extent=16)
    for _chunk in range(8):
        for layer in range(4):
            for _ in range(4):
                t.append_block(0, layer)
    for layer in range(4):
        slots = [ref.slot for ref in t.table(0, layer)]
        runs = [slots[i:i + 16] for i in range(0, len(slots), 16)]
        assert all(run == list(range(run[0], run[0] + 16)) for run in runs), (layer, slots)
    t.free_sequence(0)
    assert t.pools["disk"].statistics().used == 0
