"""The CUDA side of the kv stages: KV blocks between host memory and the device, ordered by
events, never by host synchronisation inside attention.

Loads (``place``): a block from the host pool or the disk read window is copied into one of
``STAGING_BLOCKS`` device staging buffers on a copy stream of its own, an event is recorded
after the copy and the compute stream waits for it (``ops.wait``, as the weight uploader does),
so attention's kernels read the block only once it has landed, while the host has already
moved on. Staging buffers are used in turn; before a copy overwrites one, the copy stream waits
for the compute event recorded after the attention that read it (recorded when the next block
is taken: everything enqueued by then includes that attention). A window buffer is read into
again only after the copy that last read it has completed: the reader thread waits for that
event before its read (a wait on a reader thread, not on the compute thread).

Spills (``stage_out`` / ``write``): after a layer's compute the copy stream waits for an event
of the compute stream, then copies each new block off the device — straight into its host-pool
slot, or into one of the store's pinned host spill buffers for a disk-bound block — and records
an event. The writer thread waits for that event, writes the disk block, and only then gives the
device buffer (and the host buffer) back, so neither is reused before its copy has landed.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from tierflow.pipeline.device import DeviceOps, Event
from tierflow.stages.kv_spill import Spill
from tierflow.tiers.kv.paged import KVStore

STAGING_BLOCKS = 8


class DeviceKV:
    def __init__(self, store: KVStore, ops: DeviceOps, compute: Any, staging_blocks: int = STAGING_BLOCKS) -> None:
        self.store, self.ops, self.compute = store, ops, compute
        self.copy_stream = ops.stream()
        self._staging = [self._device_block() for _ in range(staging_blocks)]
        self._last_use: list[Event | None] = [None] * staging_blocks
        self._handed: list[int] = []            # staging buffers handed to attention since the last mark
        self._next = 0
        self._window_copy: dict[int, Event] = {}    # window buffer → the copy that last read it
        self._host_free = list(range(store.window_blocks, store.window_blocks + store.spill_host_blocks))
        self._host_ready = threading.Condition()
        self.staged = 0

    def _device_block(self) -> torch.Tensor:
        return self.store.as_block(self.ops.empty(self.store.block_bytes))

    # -- kv_load ---------------------------------------------------------------------------

    def place(self, block: torch.Tensor, window_buffer: int | None) -> torch.Tensor:
        """In the compute worker, using the compute stream: ``block`` (host) on the device."""
        ops = self.ops
        if self._handed:                        # the attention over them is enqueued: mark its end
            used = ops.record(self.compute)
            for s in self._handed:
                self._last_use[s] = used
            self._handed.clear()
        s = self._next
        self._next = (s + 1) % len(self._staging)
        if self._last_use[s] is not None:
            ops.wait(self.copy_stream, self._last_use[s])
        ops.copy(self._staging[s], block, self.copy_stream)
        landed = ops.record(self.copy_stream)
        if window_buffer is not None:
            self._window_copy[window_buffer] = landed
        ops.wait(self.compute, landed)
        self._handed.append(s)
        self.staged += 1
        return self._staging[s]

    def before_read(self, window_buffer: int) -> None:
        """On a reader thread: the copy that last read ``window_buffer`` has completed."""
        landed = self._window_copy.pop(window_buffer, None)
        if landed is not None:
            landed.synchronize()

    # -- kv_spill --------------------------------------------------------------------------

    def new_buffer(self) -> torch.Tensor:
        return self._device_block()

    def stage_out(self, spills: list[Spill]) -> None:
        """In the compute worker, after the layer's kernels: copy its new blocks off the device."""
        ops = self.ops
        ops.wait(self.copy_stream, ops.record(self.compute))
        for spill in spills:
            if spill.ref.tier == "disk":
                spill.host = self._host_buffer()
                target = self.store.as_block(self.store.window_buffer(spill.host))
            else:
                target = self.store.pool_block(spill.ref)
            ops.copy(target, spill.buffer, self.copy_stream)
            spill.landed = ops.record(self.copy_stream)

    def write(self, spill: Spill) -> None:
        """On the writer thread: wait for the block's copy, then write a disk block."""
        try:
            spill.landed.synchronize()
            if spill.host is not None:
                self.store.write(spill.ref, self.store.as_block(self.store.window_buffer(spill.host)))
        finally:
            if spill.host is not None:
                with self._host_ready:
                    self._host_free.append(spill.host)
                    self._host_ready.notify_all()

    def _host_buffer(self) -> int:
        with self._host_ready:
            while not self._host_free:
                self._host_ready.wait()         # a disk write lands and gives its buffer back
            return self._host_free.pop()
