"""The upload stage: host buffer → device staging slot.

On CPU the device *is* the host, so the upload is the identity and the compute reads the
staging buffer in place (``SameDevice``).

On CUDA (``StreamUploader``) every staging slot has a buffer in device memory. An upload
enqueues the copy of a unit's bytes — a disk unit's pinned read buffer, or a host-resident
unit's pinned tensors — into the slot on a copy stream, records an event after it, and
returns at once: the host never waits for the copy. The compute stream waits on that event
(``stream.wait_event``) before the unit's kernels, so layer i+1's copy runs while layer i
computes. The slot (and its pinned read buffer) is reused only after the compute that read
it has finished on the device, which ``pipeline.cuda.StreamOrderedRing`` ensures.

Each upload's copy is bracketed by two events; once they have completed, ``collect`` turns
them into the upload's device time, for the statistics and the trace.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch

from tierflow.pipeline.cuda import DeviceTimeline, StreamPool
from tierflow.pipeline.device import DeviceOps, Event
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.tiers.checkpoint.index import UnitLayout

TENSOR_ALIGN = 256          # bytes: where each host-resident tensor starts in a device slot


def unit_views(layout: UnitLayout, buffer: torch.Tensor,
               cloned: Callable[[torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
    """The unit's tensors as views into ``buffer`` (no copies, except a misaligned tensor, whose
    clone is handed to ``cloned``)."""
    views = {}
    for t in layout.tensors:
        raw = buffer[t.buffer_offset:t.buffer_offset + t.nbytes]
        if raw.data_ptr() % t.dtype.itemsize:
            raw = raw.clone()   # safetensors does not promise element alignment; rare, explicit
            if cloned is not None:
                cloned(raw)
        views[t.local] = raw.view(t.dtype).view(t.shape)
    return views


def misaligned(layout: UnitLayout, buffer: torch.Tensor) -> bool:
    """Whether some tensor of the unit does not start on a multiple of its element size."""
    return any((buffer.data_ptr() + t.buffer_offset) % t.dtype.itemsize for t in layout.tensors)


def to_device(weights: Mapping[str, torch.Tensor], ops: DeviceOps) -> dict[str, torch.Tensor]:
    """Copies of ``weights`` in ``ops``' device memory: synchronous (complete when this
    returns, so the source may be reused and any stream may read them)."""
    return {k: ops.to_device(v) for k, v in weights.items()}


@dataclass(frozen=True, slots=True)
class UploadStats:
    """What an uploader has moved to the device so far."""
    upload_bytes: int    # bytes whose copy has completed (and been collected), host → device
    upload_s: float      # summed device time of those copies (each bracketed by two events)
    uploads: int         # copies enqueued on the copy streams, complete or not


class Uploader(Protocol):
    def upload(self, host_buffer: torch.Tensor, slot: int, layout: UnitLayout
               ) -> tuple[dict[str, torch.Tensor], Event | None]:
        """Start making the unit read into ``host_buffer`` available on the device; returns its
        tensors there and the event the compute must wait for (None: ready now)."""
        ...

    def upload_tensors(self, tensors: Mapping[str, torch.Tensor], slot: int, name: str = ""
                       ) -> tuple[dict[str, torch.Tensor], Event | None]:
        """The same for a host-resident unit's tensors; returns their device views."""
        ...

    def statistics(self) -> UploadStats: ...


class SameDevice:
    """CPU mode, or reads that already landed in device memory: nothing to move."""

    def upload(self, host_buffer: torch.Tensor, slot: int, layout: UnitLayout
               ) -> tuple[dict[str, torch.Tensor], Event | None]:
        return unit_views(layout, host_buffer), None

    def upload_tensors(self, tensors: Mapping[str, torch.Tensor], slot: int, name: str = ""
                       ) -> tuple[dict[str, torch.Tensor], Event | None]:
        return dict(tensors), None

    def statistics(self) -> UploadStats:
        return UploadStats(upload_bytes=0, upload_s=0.0, uploads=0)


def packed(tensors: Mapping[str, torch.Tensor]) -> tuple[list[int], int]:
    """Where each of a unit's tensors starts in a device slot (``TENSOR_ALIGN`` aligned), and
    the bytes they take together."""
    offsets, end = [], 0
    for t in tensors.values():
        offsets.append(-(-end // TENSOR_ALIGN) * TENSOR_ALIGN)
        end = offsets[-1] + t.numel() * t.element_size()
    return offsets, end


@dataclass(slots=True)
class _Copy:
    name: str
    nbytes: int
    start: Event
    end: Event


class StreamUploader:
    """Uploads into ``slots`` (device buffers, one per staging slot) on the pool's copy streams."""

    def __init__(self, ops: DeviceOps, streams: StreamPool, slots: list[torch.Tensor],
                 timeline: DeviceTimeline | None = None, tracer: Tracer = NULL_TRACER) -> None:
        self._ops, self._streams, self.slots = ops, streams, slots
        self._timeline, self._tracer = timeline, tracer
        self._pending: list[_Copy] = []          # appended on the loop, collected by the compute worker
        self._lock = threading.Lock()
        self._bytes = 0
        self._seconds = 0.0
        self._copies = 0

    def upload(self, host_buffer: torch.Tensor, slot: int, layout: UnitLayout
               ) -> tuple[dict[str, torch.Tensor], Event | None]:
        target = self.slots[slot]
        landed = host_buffer.data_ptr() == target.data_ptr()     # the read landed in device memory already
        if landed and not misaligned(layout, target):
            return unit_views(layout, target), None
        stream = self._streams.copy_stream()
        start = self._ops.record(stream)
        nbytes = 0 if landed else layout.buffer_bytes
        if not landed:
            self._ops.copy(target[:nbytes], host_buffer[:nbytes], stream)
        # A misaligned tensor's clone runs on the copy stream, after the upload, and the compute
        # waits for it through the event below; its memory is allocated on the copy stream and
        # freed once the unit's compute is merely queued, so the compute stream's use of it is
        # recorded: the allocator reuses it only after those kernels.
        with self._ops.using(stream):
            views = unit_views(layout, target, cloned=self._for_compute)
        return views, self._done(stream, start, layout.name, nbytes)

    def _for_compute(self, tensor: torch.Tensor) -> None:
        self._ops.record_stream(tensor, self._streams.compute)

    def upload_tensors(self, tensors: Mapping[str, torch.Tensor], slot: int, name: str = ""
                       ) -> tuple[dict[str, torch.Tensor], Event | None]:
        target = self.slots[slot]
        offsets, nbytes = packed(tensors)
        if nbytes > target.numel():
            raise ValueError(f"{name}: {nbytes} bytes do not fit a staging slot of {target.numel()}")
        stream = self._streams.copy_stream()
        start = self._ops.record(stream)
        views: dict[str, torch.Tensor] = {}
        for (key, t), offset in zip(tensors.items(), offsets):
            view = target[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            self._ops.copy(view, t, stream)
            views[key] = view
        return views, self._done(stream, start, name, nbytes)

    def _done(self, stream: Any, start: Event, name: str, nbytes: int) -> Event:
        end = self._ops.record(stream)
        with self._lock:
            self._pending.append(_Copy(name, nbytes, start, end))
            self._copies += 1
        return end

    def collect(self) -> None:
        """Account the uploads whose copies have completed (their device times, their spans)."""
        with self._lock:
            pending, self._pending = self._pending, []
        still = []
        for c in pending:
            if not c.end.query():
                still.append(c)
                continue
            self._bytes += c.nbytes
            self._seconds += c.start.elapsed_time(c.end) / 1e3
            if self._timeline is not None and self._tracer.enabled:
                self._tracer.span("upload", c.name, self._timeline.time_of(c.start), self._timeline.time_of(c.end),
                                  bytes=c.nbytes)
        with self._lock:
            self._pending[:0] = still

    def statistics(self) -> UploadStats:
        return UploadStats(upload_bytes=self._bytes, upload_s=self._seconds, uploads=self._copies)
