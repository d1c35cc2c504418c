"""The kv_load and kv_spill stages on their own: the loader reads what the sweep's plan lists,
in its order, within the read window; new blocks are written after their layer on the writer
thread, from buffers held until the write lands; faults fail only their sequence; and on the
CUDA path (``SimulatedCuda``, whose copies land late) blocks from the host pool and the disk
window reach attention through the copy stream and its events, while a compute that skips the
event reads stale bytes."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from tierflow.errors import KVCorruptionError, TierCapacityError
from tierflow.stages.kv import KVStages, plan_loads
from tierflow.stages.kv_device import DeviceKV
from tierflow.testing import SimulatedCuda
from tierflow.tiers.kv.paged import KVStore

BT = 16


@dataclass(frozen=True)
class _Spec:
    """What plan_loads reads of a ModelSpec."""
    num_layers: int
    windows: tuple[int | None, ...]

    def window(self, layer: int) -> int | None:
        return self.windows[layer]


def _store(tmp_path, *, layers=2, host_blocks=0, disk_blocks=64, device_blocks=0):
    return KVStore(num_layers=layers, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"),
                   block_tokens=BT, device_blocks=device_blocks, host_blocks=host_blocks, disk_blocks=disk_blocks,
                   spill_dir=tmp_path)


def _filled(store, seq_id, tokens, seed):
    """A sequence whose ``tokens`` of KV per layer were stored between sweeps (written at once)."""
    gen = torch.Generator().manual_seed(seed)
    kv = store.sequence(seq_id)
    data = []
    for layer in range(store.num_layers):
        k, v = torch.randn(tokens, 2, 8, generator=gen), torch.randn(tokens, 2, 8, generator=gen)
        kv.append(layer, k, v)
        data.append((k.transpose(0, 1), v.transpose(0, 1)))
    return kv, data


def _attend_all(stages, kvs, starts, spec):
    """What a sweep's attention does with the blocks: every layer, every sequence, in order."""
    stages.begin(plan_loads(spec, kvs, starts), kvs)
    seen = []
    try:
        for layer in range(spec.num_layers):
            for kv, start in zip(kvs, starts):
                window = spec.window(layer)
                first = 0 if window is None else max(0, start - window + 1)
                seen.append([(block.first, block.keys.clone()) for block in kv.blocks(layer, first)])
            stages.after_layer(layer)
    finally:
        asyncio.run(stages.end())
    return seen


def test_prefetch_reads_exactly_the_plan_in_sweep_order_within_the_window(tmp_path, monkeypatch):
    store = _store(tmp_path, layers=2, disk_blocks=40)
    store.window_blocks = 6                  # smaller than a sweep's blocks: buffers are reused
    a, a_data = _filled(store, 0, 8 * BT, seed=1)
    b, b_data = _filled(store, 1, 4 * BT, seed=2)
    stages = KVStages(store)
    submitted = []                           # (first ordinal, count, blocks given back), as submitted
    real_submit = store.reads.submit

    def submit(fn, run):
        submitted.append((run.first, run.count, stages.loader._released))
        return real_submit(fn, run)

    monkeypatch.setattr(store.reads, "submit", submit)
    spec = _Spec(2, (None, 3 * BT))          # layer 1 slides: blocks before its window are not read
    seen = _attend_all(stages, [a, b], [8 * BT, 4 * BT], spec)

    plan = plan_loads(spec, [a, b], [8 * BT, 4 * BT])
    assert [(r.seq_id, r.layer) for r in plan.reads] == [(0, 0)] * 8 + [(1, 0)] * 4 + [(0, 1)] * 3 + [(1, 1)] * 3
    # runs submitted in plan order, covering it exactly once, never wrapping the window and never
    # more than a window ahead of the blocks attention has given back
    covered = [o for first, count, _ in submitted for o in range(first, first + count)]
    assert covered == list(range(len(plan.reads)))
    assert all(first % store.window_blocks + count <= store.window_blocks for first, count, _ in submitted)
    assert all(first + count <= released + store.window_blocks for first, count, released in submitted)
    assert max(released for *_, released in submitted) > 0      # reads ran on while attention took blocks
    stats = stages.loader.statistics()
    assert stats.unplanned == 0 and stats.read == len(plan.reads) == stats.planned
    # and the blocks came back intact, in position order
    got = torch.cat([k for _, k in seen[0]], dim=1)
    assert torch.equal(got, a_data[0][0]) and [f for f, _ in seen[3]] == [16, 32, 48]
    assert torch.equal(torch.cat([k for _, k in seen[3]], dim=1), b_data[1][0][:, BT:])
    store.close()


def test_new_blocks_stay_in_memory_and_are_spilled_after_the_layer_on_the_writer_thread(tmp_path, monkeypatch):
    store = _store(tmp_path, layers=2, host_blocks=2, disk_blocks=16)
    stages = KVStages(store)
    stages.spiller.max_buffers = 2
    writes: list[tuple[str, int, str]] = []
    real = store.write

    def slow_write(ref, block):
        time.sleep(0.02)
        writes.append((ref.tier, ref.slot, threading.current_thread().name))
        real(ref, block)

    monkeypatch.setattr(store, "write", slow_write)
    monkeypatch.setattr(store, "read_block", lambda ref: pytest.fail("a fresh block was read back"))
    kv = store.sequence(0)
    spec = _Spec(2, (None, None))
    stages.begin(plan_loads(spec, [kv], [0]), [kv])
    k, v = torch.randn(3 * BT, 2, 8), torch.randn(3 * BT, 2, 8)
    for layer in range(2):
        kv.append(layer, k, v)                      # three full blocks: host, host, then disk ...
        blocks = list(kv.blocks(layer))
        assert torch.equal(torch.cat([b.keys for b in blocks], dim=1), k.transpose(0, 1))
        assert len(writes) <= 3 * layer             # ... written only after the layer's compute
        stages.after_layer(layer)
    asyncio.run(stages.end())
    stats = stages.spiller.statistics()
    assert stats.written == 6 and stats.buffers <= 3        # a layer's own 3 blocks, then reused ones
    assert {name for *_, name in writes} == {"tierflow-kv-spill_0"} == set(stats.threads)
    assert threading.current_thread().name not in stats.threads
    monkeypatch.undo()
    assert torch.equal(kv.read(1, 0, 3 * BT)[0], k.transpose(0, 1))     # every block landed in its tier
    store.close()


def test_a_spill_fault_fails_only_its_sequence(tmp_path, monkeypatch):
    store = _store(tmp_path, layers=1, disk_blocks=8)
    stages = KVStages(store)
    a, b = store.sequence(0), store.sequence(1)
    real = store.write

    def full_for_a(ref, block):
        if ref.slot == store.tables.table(0, 0)[0].slot:
            raise TierCapacityError("the disk holding the spill file is full")
        real(ref, block)

    monkeypatch.setattr(store, "write", full_for_a)
    stages.begin(plan_loads(_Spec(1, (None,)), [a, b], [0, 0]), [a, b])
    for kv in (a, b):
        kv.append(0, torch.randn(BT, 2, 8), torch.randn(BT, 2, 8))
    stages.after_layer(0)
    asyncio.run(stages.end())
    assert isinstance(a.failure, TierCapacityError) and b.failure is None
    store.close()


def test_a_corrupt_block_raises_in_the_attention_that_takes_it(tmp_path):
    store = _store(tmp_path, layers=1, disk_blocks=8)
    a, _ = _filled(store, 0, 2 * BT, seed=3)
    b, b_data = _filled(store, 1, 2 * BT, seed=4)
    with open(store.spill.path, "r+b") as raw:      # a flipped byte in a's first block
        raw.seek(store.tables.table(0, 0)[0].slot * store.stride + 8)
        byte = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([byte[0] ^ 0xFF]))
    stages = KVStages(store)
    stages.begin(plan_loads(_Spec(1, (None,)), [a, b], [2 * BT, 2 * BT]), [a, b])
    with pytest.raises(KVCorruptionError):
        list(a.blocks(0))
    assert torch.equal(torch.cat([blk.keys for blk in b.blocks(0)], dim=1), b_data[0][0])
    stages.after_layer(0)
    asyncio.run(stages.end())
    store.close()


class _NoWait(SimulatedCuda):
    """A compute stream that does not wait for the copies' events: what the events prevent."""

    def wait(self, stream, event) -> None:
        if stream is getattr(self, "compute", None):
            return None
        super().wait(stream, event)


@pytest.mark.parametrize("ops_type,correct", [(SimulatedCuda, True), (_NoWait, False)])
def test_host_and_disk_blocks_reach_attention_through_the_copy_stream(tmp_path, ops_type, correct):
    store = _store(tmp_path, layers=1, host_blocks=2, disk_blocks=8)
    kv, data = _filled(store, 0, 5 * BT, seed=5)        # blocks 0-1 in the host pool, 2-4 on disk
    assert [r.tier for r in store.tables.table(0, 0)] == ["host", "host", "disk", "disk", "disk"]
    ops = ops_type(copy_delay_s=0.02)
    compute = ops.compute = ops.stream()
    device = DeviceKV(store, ops, compute, staging_blocks=2)
    stages = KVStages(store, device)
    stages.begin(plan_loads(_Spec(1, (None,)), [kv], [5 * BT]), [kv])
    with ops.using(compute):                            # as the compute worker runs attention
        got = [block.keys.clone() for block in kv.blocks(0)]
        stages.after_layer(0)
    asyncio.run(stages.end())
    ops.synchronize()
    assert device.staged == 5 and ops.copies == 5
    matches = torch.equal(torch.cat(got, dim=1), data[0][0])
    assert matches == correct              # without the wait, attention reads the staging buffers' stale bytes
    store.close()


def test_new_blocks_leave_the_device_on_the_copy_stream_after_the_compute(tmp_path):
    store = _store(tmp_path, layers=1, host_blocks=1, disk_blocks=4)
    ops = SimulatedCuda(copy_delay_s=0.01)
    compute = ops.stream()
    stages = KVStages(store, DeviceKV(store, ops, compute))
    kv = store.sequence(0)
    stages.begin(plan_loads(_Spec(1, (None,)), [kv], [0]), [kv])
    k, v = torch.randn(2 * BT, 2, 8), torch.randn(2 * BT, 2, 8)
    with ops.using(compute):
        kv.append(0, k, v)                              # one host block, one disk block
        stages.after_layer(0)
    asyncio.run(stages.end())
    assert ops.copies == 2 and stages.spiller.statistics().written == 2
    assert torch.equal(kv.read(0, 0, 2 * BT)[1], v.transpose(0, 1))
    store.close()
