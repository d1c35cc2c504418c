"""The upload stage and the pinned arena on their own, with ``SimulatedCuda``: what lands in a
device slot, when its event completes, what is accounted, and the arena's sizing rules."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from tierflow.errors import TierCapacityError
from tierflow.pipeline.cuda import DeviceTimeline, StreamPool
from tierflow.pipeline.trace import Tracer
from tierflow.stages.upload import TENSOR_ALIGN, SameDevice, StreamUploader, UploadStats, packed
from tierflow.testing import SimulatedCuda
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, TensorSlice, UnitLayout
from tierflow.tiers.io.pinned import PinnedArena
from tierflow.tiers.io.reader import aligned_empty


def _uploader(delay: float = 0.0, slot_bytes: int = 1 << 16, tracer: Tracer | None = None):
    ops = SimulatedCuda(copy_delay_s=delay)
    streams = StreamPool(ops.stream)
    timeline = DeviceTimeline(ops, streams.compute)
    uploader = StreamUploader(ops, streams, [ops.empty(slot_bytes) for _ in range(2)], timeline,
                              tracer or Tracer())
    return ops, uploader


def test_tensors_land_aligned_in_the_slot_once_the_event_completes():
    ops, uploader = _uploader(delay=0.05)
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16)}
    views, ready = uploader.upload_tensors(tensors, 1, "unit")
    assert not ready.query()                        # the copy is still on the copy stream
    ready.synchronize()
    for key, t in tensors.items():
        assert torch.equal(views[key], t) and views[key].dtype == t.dtype
        assert (views[key].data_ptr() - uploader.slots[1].data_ptr()) % TENSOR_ALIGN == 0
    assert packed(tensors) == ([0, TENSOR_ALIGN], TENSOR_ALIGN + 30)


def test_a_read_buffer_is_uploaded_whole_and_viewed_per_tensor():
    ops, uploader = _uploader(delay=0.01)
    host = torch.zeros(ALIGN_BYTES, dtype=torch.uint8)
    host[:16].view(torch.float32)[:] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    layout = UnitLayout(1, "layer.0", (), (TensorSlice("w", torch.float32, (2, 2), 0, 16),), ALIGN_BYTES, 16)
    weights, ready = uploader.upload(host, 0, layout)
    ready.synchronize()
    assert torch.equal(weights["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_a_read_into_the_slot_itself_needs_no_copy():
    ops, uploader = _uploader()
    layout = UnitLayout(1, "layer.0", (), (TensorSlice("w", torch.uint8, (4,), 0, 4),), 4, 4)
    weights, ready = uploader.upload(uploader.slots[0], 0, layout)
    assert ready is None and ops.copies == 0
    assert weights["w"].data_ptr() == uploader.slots[0].data_ptr()


def test_too_large_for_the_slot_is_refused():
    ops, uploader = _uploader(slot_bytes=64)
    with pytest.raises(ValueError, match="do not fit"):
        uploader.upload_tensors({"a": torch.zeros(100)}, 0, "big")


def test_collect_accounts_completed_copies_and_traces_them():
    tracer = Tracer()
    ops, uploader = _uploader(delay=0.02, tracer=tracer)
    _, first = uploader.upload_tensors({"a": torch.zeros(8)}, 0, "one")
    first.synchronize()
    _, second = uploader.upload_tensors({"a": torch.zeros(8)}, 1, "two")
    uploader.collect()                              # the second copy is still running
    stats = uploader.statistics()
    assert stats.upload_bytes == 32 and stats.uploads == 2 and stats.upload_s >= 0.015
    second.synchronize()
    uploader.collect()
    assert uploader.statistics() == UploadStats(upload_bytes=64, upload_s=uploader.statistics().upload_s, uploads=2)
    spans = [e for e in tracer.document()["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in spans] == ["one", "two"] and all(e["dur"] >= 15_000 for e in spans)


def test_the_arena_hands_out_aligned_pieces_within_its_capacity():
    calls = []
    arena = PinnedArena(3 * ALIGN_BYTES, lambda b: calls.append(("pin", b.numel())),
                        lambda b: calls.append(("unpin", b.numel())))
    a = arena.take(100)
    b = arena.take(ALIGN_BYTES + 1)
    assert a.numel() == 100 and b.numel() == ALIGN_BYTES + 1
    assert a.data_ptr() % ALIGN_BYTES == 0 and b.data_ptr() % ALIGN_BYTES == 0
    assert arena.statistics().used_bytes == 3 * ALIGN_BYTES
    with pytest.raises(TierCapacityError):
        arena.take(1)
    arena.close()
    arena.close()
    assert calls == [("pin", 3 * ALIGN_BYTES), ("unpin", 3 * ALIGN_BYTES)]


def test_the_timeline_puts_device_events_on_the_host_clock():
    ops = SimulatedCuda()
    stream = ops.stream()
    timeline = DeviceTimeline(ops, stream)
    event = ops.record(stream)
    event.synchronize()
    assert abs(timeline.time_of(event) - time.perf_counter()) < 0.05


def test_the_same_device_uploads_nothing():
    stats = SameDevice().statistics()
    assert stats == UploadStats(upload_bytes=0, upload_s=0.0, uploads=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.uploads = 1        # type: ignore[misc]


def _misaligned_layout() -> UnitLayout:
    """One float32 tensor 2 bytes into its unit's buffer: it must be cloned to be viewed."""
    return UnitLayout(1, "layer.0", (), (TensorSlice("w", torch.float32, (2, 2), 2, 16),), ALIGN_BYTES, 18)


@pytest.mark.parametrize("into_slot", [False, True], ids=["staged", "read-into-slot"])
def test_a_misaligned_tensor_is_cloned_in_stream_order_and_outlives_the_compute(into_slot):
    """The clone of a misaligned tensor runs on the copy stream after the unit's upload (never on
    the legacy default stream, never before the bytes land), the compute waits for it through the
    upload's event, and its memory is kept from reuse until the compute stream is done with it."""
    ops = SimulatedCuda(copy_delay_s=0.02, compute_lag_s=0.05)
    streams = StreamPool(ops.stream)
    uploader = StreamUploader(ops, streams, [ops.empty(1 << 16) for _ in range(2)], DeviceTimeline(ops, streams.compute))
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    host = aligned_empty(ALIGN_BYTES)
    host[2:18] = values.view(torch.uint8)
    if into_slot:                                   # as a kvikio read leaves it: in the slot already
        uploader.slots[0][:ALIGN_BYTES].copy_(host)
        host = uploader.slots[0]
    weights, ready = uploader.upload(host, 0, _misaligned_layout())
    compute = streams.compute
    with ops.using(compute):
        if ready is not None:
            ops.wait(compute, ready)
        total = weights["w"].sum()
        done = ops.record(compute)
    del weights                                     # the layer is done with it on the host side
    done.synchronize()
    assert total.cpu().item() == 10.0
    ops.check()
