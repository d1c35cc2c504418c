"""kv_load across the sweep boundary: once a sweep's reads have all started, the window's free
buffers read the next sweep's first blocks (as this sweep's plan, one step on); the next sweep
keeps exactly the runs its own plan lists, in the same slots, unwritten since, and reads the
rest itself; a read ahead that failed is read again as planned."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from tierflow.errors import TransferError
from tierflow.stages.kv import KVStages, plan_loads
from tierflow.tiers.kv.paged import KVStore

BT = 16


class _Spec:
    """What plan_loads reads of a ModelSpec: full attention in every layer."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def window(self, layer: int) -> None:
        return None


def _store(tmp_path, *, layers=2, disk_blocks=64, window=6):
    store = KVStore(num_layers=layers, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"),
                    block_tokens=BT, device_blocks=0, host_blocks=0, disk_blocks=disk_blocks, spill_dir=tmp_path)
    store.window_blocks = window             # smaller than a sweep's blocks: buffers are reused, and shared
    return store                             # between a sweep and the next one's reads ahead


def _filled(store, seq_id, blocks, seed):
    """A sequence with ``blocks`` full blocks per layer on disk (written between sweeps); its keys."""
    gen = torch.Generator().manual_seed(seed)
    kv, keys = store.sequence(seq_id), []
    for layer in range(store.num_layers):
        k, v = torch.randn(blocks * BT, 2, 8, generator=gen), torch.randn(blocks * BT, 2, 8, generator=gen)
        kv.append(layer, k, v)
        keys.append(k.transpose(0, 1))
    return kv, keys


def _sweep(stages, spec, kvs, ahead=True):
    """A decode sweep's attention (no new block): every layer, every sequence, in order; the keys
    each (layer, sequence) saw. With ``ahead``, the next sweep is these sequences again."""
    starts = [kv.num_tokens for kv in kvs]
    stages.begin(plan_loads(spec, kvs, starts), kvs,
                 ahead=(lambda layer: plan_loads(spec, kvs, starts, layers=(layer,)).reads) if ahead else None)
    seen = []
    try:
        for layer in range(spec.num_layers):
            for kv in kvs:
                seen.append(torch.cat([block.keys.clone() for block in kv.blocks(layer)], dim=1))
            stages.after_layer(layer)
    finally:
        asyncio.run(stages.end())
    return seen


def _expected(keys_by_seq, layers):
    return [keys_by_seq[i][layer] for layer in range(layers) for i in range(len(keys_by_seq))]


def test_the_next_sweep_keeps_the_runs_read_ahead_for_it_and_reads_only_the_rest(tmp_path, monkeypatch):
    store = _store(tmp_path)
    a, a_keys = _filled(store, 0, 8, seed=1)
    b, b_keys = _filled(store, 1, 4, seed=2)
    stages, spec = KVStages(store), _Spec(2)
    submitted = []                           # (first ordinal, count, blocks given back), as submitted
    real_submit = store.reads.submit

    def submit(fn, run, *args):
        submitted.append((run.first, run.count, stages.loader._released))
        return real_submit(fn, run, *args)

    monkeypatch.setattr(store.reads, "submit", submit)
    first = _sweep(stages, spec, [a, b])
    stats = stages.loader.statistics()
    # 24 planned blocks, then a window's worth of the next sweep: a's first 6 blocks of layer 0
    assert stats.read == 24 + 6 and stats.ahead == 6 and stats.ahead_used == 0
    second = _sweep(stages, spec, [a, b])
    stats = stages.loader.statistics()
    assert stats.ahead_used == 6             # all of it kept: the second sweep read 18 blocks itself
    assert stats.read == 24 + 6 + 18 + 6 and stats.unplanned == 0
    for got, want in zip(first + second, _expected([a_keys, b_keys], 2) * 2):
        assert torch.equal(got, want)
    # every read, ahead or not, within the window of blocks given back, never wrapping round it
    assert all(first % 6 + count <= 6 for first, count, _ in submitted)
    assert all(first + count <= released + 6 for first, count, released in submitted)
    covered = [o for first, count, _ in submitted for o in range(first, first + count)]
    assert covered == list(range(len(covered)))          # ordinals run on across the sweep boundary
    store.close()


def test_a_wrong_forecast_is_dropped_and_the_plan_read_as_it_is(tmp_path):
    store = _store(tmp_path)
    a, _ = _filled(store, 0, 8, seed=1)
    b, b_keys = _filled(store, 1, 4, seed=2)
    stages, spec = KVStages(store), _Spec(2)
    _sweep(stages, spec, [a, b])             # reads a's first blocks for a next sweep of a and b
    alone = _sweep(stages, spec, [b])        # but a finished: b's blocks come first
    assert stages.loader.statistics().ahead_used == 0
    for got, want in zip(alone, _expected([b_keys], 2)):
        assert torch.equal(got, want)
    store.close()


def test_a_slot_written_after_its_read_ahead_is_read_again(tmp_path):
    store = _store(tmp_path)
    a, a_keys = _filled(store, 0, 8, seed=1)
    stages, spec = KVStages(store), _Spec(2)
    _sweep(stages, spec, [a])                # a's first 6 blocks of layer 0 read ahead
    ref = store.tables.table(0, 0)[0]
    new = torch.randn(store.block_shape)
    store.write(ref, new)                    # between sweeps, block 0's slot is written again
    seen = _sweep(stages, spec, [a])
    assert stages.loader.statistics().ahead_used == 0      # the first run no longer holds what it read
    assert torch.equal(seen[0][:, :BT], new[0])           # the block as it is now, not as read ahead
    assert torch.equal(seen[0][:, BT:], a_keys[0][:, BT:])
    store.close()


def test_a_read_ahead_that_fails_is_read_again_as_planned(tmp_path, monkeypatch):
    store = _store(tmp_path)
    a, a_keys = _filled(store, 0, 8, seed=1)
    stages, spec = KVStages(store), _Spec(2)
    real_read = store.read_run
    release = threading.Event()
    failed = []

    def read_run(first_slot, count, first_buffer, *, replace=True, expected=None):
        if not replace:                      # a read ahead: still running when the next sweep begins
            release.wait(5)
            failed.append(first_slot)
            raise TransferError("the disk hiccuped")
        return real_read(first_slot, count, first_buffer, replace=replace, expected=expected)

    monkeypatch.setattr(store, "read_run", read_run)
    _sweep(stages, spec, [a])
    ahead = stages.loader.statistics().ahead
    threading.Timer(0.05, release.set).start()           # the reads ahead fail once kept
    seen = _sweep(stages, spec, [a])
    assert failed and ahead > 0 and stages.loader.statistics().ahead_used == ahead   # kept while running
    for got, want in zip(seen, _expected([a_keys], 2)):
        assert torch.equal(got, want)                    # read again, as planned: the sweep did not fail
    store.close()


def test_a_sweep_without_a_forecast_reads_only_its_plan(tmp_path):
    store = _store(tmp_path)
    a, a_keys = _filled(store, 0, 8, seed=1)
    stages, spec = KVStages(store), _Spec(2)
    for _ in range(2):
        seen = _sweep(stages, spec, [a], ahead=False)
        for got, want in zip(seen, _expected([a_keys], 2)):
            assert torch.equal(got, want)
    stats = stages.loader.statistics()
    assert stats.read == 32 and stats.ahead == 0
    store.close()


def test_reads_ahead_the_next_plan_drops_are_not_waited_for_on_the_event_loop(tmp_path, monkeypatch):
    store = _store(tmp_path)
    a, _ = _filled(store, 0, 8, seed=1)
    b, b_keys = _filled(store, 1, 4, seed=2)
    stages, spec = KVStages(store), _Spec(2)
    real_read = store.read_run

    def read_run(first_slot, count, first_buffer, *, replace=True, expected=None):
        if not replace:
            time.sleep(0.5)                  # a slow read ahead
        return real_read(first_slot, count, first_buffer, replace=replace, expected=expected)

    monkeypatch.setattr(store, "read_run", read_run)
    _sweep(stages, spec, [a, b])             # reads a's first blocks ahead, slowly
    started = time.perf_counter()
    stages.begin(plan_loads(spec, [b], [b.num_tokens]), [b])      # a finished: they are dropped
    took = time.perf_counter() - started
    seen = []
    try:
        for layer in range(2):
            seen.append(torch.cat([block.keys.clone() for block in b.blocks(layer)], dim=1))
            stages.after_layer(layer)
    finally:
        asyncio.run(stages.end())
    assert took < 0.2                        # begin runs on the event loop: it must not wait for them
    for got, want in zip(seen, _expected([b_keys], 2)):
        assert torch.equal(got, want)        # b's reads into their buffers waited for them instead
    store.close()


def test_a_run_given_back_untaken_lands_before_the_next_read_into_its_buffers(tmp_path, monkeypatch):
    """a's sequence failed before attention took its blocks: its run is given back while its
    read is still landing, and b's run into the same buffers must not be overwritten by it."""
    store = _store(tmp_path, layers=1, window=4)
    a, _ = _filled(store, 0, 2, seed=1)
    b, b_keys = _filled(store, 1, 4, seed=2)
    slow = {ref.slot for ref in store.tables.table(0, 0)}
    real_read = store.read_run

    def read_run(first_slot, count, first_buffer, *, replace=True, expected=None):
        if first_slot in slow:
            time.sleep(0.3)                  # a's read lands late
        return real_read(first_slot, count, first_buffer, replace=replace, expected=expected)

    monkeypatch.setattr(store, "read_run", read_run)
    stages, spec = KVStages(store), _Spec(1)
    stages.begin(plan_loads(spec, [a, b], [a.num_tokens, b.num_tokens]), [a, b])
    try:
        got = []
        for block in b.blocks(0):            # a is skipped: only b's blocks are taken
            time.sleep(0.2)
            got.append(block.keys.clone())
        stages.after_layer(0)
    finally:
        asyncio.run(stages.end())
    assert torch.equal(torch.cat(got, dim=1), b_keys[0])
    store.close()


def test_reads_ahead_start_even_when_the_plan_reads_nothing_from_disk(tmp_path):
    store = _store(tmp_path)
    a, a_keys = _filled(store, 0, 8, seed=1)
    stages, spec = KVStages(store), _Spec(2)
    stages.begin(plan_loads(spec, [], []), [],                      # nothing of this sweep is on disk
                 ahead=lambda layer: plan_loads(spec, [a], [a.num_tokens], layers=(layer,)).reads)
    for layer in range(2):
        stages.after_layer(layer)
    asyncio.run(stages.end())
    assert stages.loader.statistics().ahead == 6
    seen = _sweep(stages, spec, [a])
    assert stages.loader.statistics().ahead_used == 6
    for got, want in zip(seen, _expected([a_keys], 2)):
        assert torch.equal(got, want)
    store.close()


def test_a_slot_given_a_new_block_holds_no_checksum_until_its_write_lands(tmp_path):
    """A freed disk slot keeps its old block's checksum; once a sweep commits a new block to it,
    that checksum goes, so a read ahead cannot take the old bytes for good ones."""
    store = _store(tmp_path, layers=1)
    a, _ = _filled(store, 0, 1, seed=1)
    (old,) = store.tables.table(0, 0)
    a.free()                                 # its slot is free, its old checksum still there
    assert store.block_sums(old.slot, 1) != (None,)
    stages = KVStages(store)
    b = store.sequence(1)
    stages.begin(plan_loads(_Spec(1), [b], [0]), [b])
    b.append(0, torch.randn(BT, 2, 8), torch.randn(BT, 2, 8))      # one full block, committed
    (new,) = store.tables.table(1, 0)
    assert new.tier == "disk" and new.slot == old.slot and store.block_sums(new.slot, 1) == (None,)
    stages.after_layer(0)
    asyncio.run(stages.end())
    assert store.block_sums(new.slot, 1) != (None,)
    store.close()
