"""kv_spill: new full KV blocks written to their tier after the layer's compute, off the compute
thread (see ``stages/kv.py`` for how the two KV stages fit a sweep).

A paged handle commits a full block bound for the host or disk tier by copying it into a
spill buffer (``KVSpiller.commit``), which it keeps as fresh so the sweep's own attention reads
it from memory. ``after_layer`` queues the layer's new blocks on the store's writer thread;
each buffer is reused only once its write has landed, and buffers are bounded. A write that
fails fails its sequence (``kv.fail``) and nobody else's.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tierflow.tiers.kv.blocks import BlockRef
from tierflow.tiers.kv.handle import KVHandle
from tierflow.tiers.kv.paged import KVStore


@dataclass(slots=True)
class Spill:
    seq_id: int
    layer: int
    ref: BlockRef
    buffer: torch.Tensor                 # the block's bytes (on the device), held until the write lands
    landed: Any = None                   # CUDA: the event after its copy off the device
    host: int | None = None              # CUDA: the host spill buffer a disk-bound block was copied into


@dataclass(frozen=True, slots=True)
class SpillStats:
    written: int                # blocks written to the host or disk tier, summed over sweeps
    failed: int                 # writes that failed (their sequences failed)
    buffers: int                # spill buffers allocated (bounded by max_buffers, see the module)
    threads: frozenset[str]     # names of the threads that wrote


class KVSpiller:
    """kv_spill: new full blocks to their tier after the layer's compute, on the writer thread.
    ``write(spill)`` does one write (on CPU: ``store.write``); ``new_buffer()`` makes a buffer;
    ``stage_out(spills)`` (CUDA) runs on the compute thread before a layer's writes are queued."""

    def __init__(self, store: KVStore, *, max_buffers: int = 64,
                 new_buffer: Callable[[], torch.Tensor] | None = None,
                 write: Callable[[Spill], None] | None = None,
                 stage_out: Callable[[list[Spill]], None] | None = None) -> None:
        self.store, self.max_buffers = store, max_buffers
        self._new_buffer = new_buffer or (lambda: torch.empty(store.block_shape, dtype=store.dtype,
                                                              device=store.device))
        self._write = write or (lambda spill: store.write(spill.ref, spill.buffer))
        self._stage_out = stage_out
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._pending: list[Spill] = []                 # committed, waiting for their layer's end
        self._in_flight: list[Future[None]] = []
        self._writing = 0
        self._handles: dict[int, KVHandle] = {}
        self._ready = threading.Condition()
        self._written = self._failed = 0
        self._threads: set[str] = set()

    def statistics(self) -> SpillStats:
        return SpillStats(self._written, self._failed, self._allocated, frozenset(self._threads))

    def begin(self, handles: Sequence[KVHandle]) -> None:
        self._handles = {h.seq_id: h for h in handles}

    def commit(self, seq_id: int, layer: int, ref: BlockRef, block: torch.Tensor) -> torch.Tensor:
        """Copy ``block`` into a spill buffer, to be written after the layer; returns the buffer."""
        buffer = self._buffer()
        buffer.copy_(block)
        self._pending.append(Spill(seq_id, layer, ref, buffer))
        return buffer

    def after_layer(self, layer: int) -> None:
        """The layer's compute is done (enqueued, on CUDA): write its new blocks."""
        now = [s for s in self._pending if s.layer == layer]
        self._pending = [s for s in self._pending if s.layer != layer]
        for spill in now:
            if self._stage_out is not None:     # one at a time: it may wait for a host buffer
                self._stage_out([spill])
            with self._ready:
                self._writing += 1
                self._in_flight = [f for f in self._in_flight if not f.done()]
                self._in_flight.append(self.store.writes.submit(self._run, spill))

    def drain(self) -> list[Future[None]]:
        """The writes not yet landed (the sweep waits for them); pending blocks are written first."""
        for layer in sorted({s.layer for s in self._pending}):
            self.after_layer(layer)
        with self._ready:
            return [f for f in self._in_flight if not f.done()]

    def _run(self, spill: Spill) -> None:
        self._threads.add(threading.current_thread().name)
        try:
            self._write(spill)
            self._written += 1
        except Exception as exc:        # noqa: BLE001 - the fault belongs to that sequence alone
            self._failed += 1
            handle = self._handles.get(spill.seq_id)
            if handle is not None:
                handle.fail(exc)
        finally:
            with self._ready:
                self._free.append(spill.buffer)
                self._writing -= 1
                self._ready.notify_all()

    def _buffer(self) -> torch.Tensor:
        with self._ready:
            while not self._free and self._allocated >= self.max_buffers and self._writing:
                self._ready.wait()          # a write lands and frees its buffer
            if self._free:
                return self._free.pop()
            self._allocated += 1
        return self._new_buffer()
