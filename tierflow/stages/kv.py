"""The kv_load and kv_spill stages of a sweep.

kv_load (``KVLoader``). The sweep knows, before its first unit, which sequences it visits and,
per layer, which of their committed blocks attention will take from off the device: every
committed block from the first one the layer's sliding window still sees (``plan_loads``; the
blocks a window skips are not in it). The loader gets that plan and reads its disk blocks in
exactly that order — unit by unit, sequence by sequence, block by block — on the store's reader
threads, into the store's window of ``window_blocks`` read buffers: disk block ``o`` of the plan
lands in buffer ``o % window_blocks``, and a read is started as soon as the buffer it needs has
been given back. Blocks are given back in plan order (taking a block gives back every block
before it; the end of a layer gives back the rest of that layer's), so reads run ahead of
attention by a full window, continuously across layer boundaries, from before the first unit to
the last. Runs of blocks in consecutive spill slots of one (sequence, layer) go in one request
(up to KV_READ_RUN, never wrapping round the window); the disk pool gives each (sequence, layer)
its slots in runs of that length (``tiers/kv/pool.py:BlockPool``), so a prefill's chunks, which
commit a few blocks of each layer in turn, still leave each layer's blocks consecutive. The
compute thread only ever waits for a read that has not landed; a read that fails (a checksum, a
deleted file) raises in the attention that takes that block, which fails that sequence alone.
Nothing is learnt or guessed.

Sliding-window rings. A paged sliding-window layer releases, at the start of its append, the
blocks before the first one its window still sees (``tiers/kv/sequence.py``); a released slot may
be given to another block, of any sequence, and rewritten in the same sweep. The plan starts
each layer at that very block (``first_visible(start, window)``, ``start`` being the layer's
length when the sweep begins), so no planned read, however far ahead, targets a released
slot. The loader also tells the store (``first_planned``) where each (sequence, layer)'s plan
begins, and a ring never releases a block from there on: should a plan ever reach further
back than the ring, that block stays held until the next sweep instead of being read while its
slot is rewritten (a torn read would fail its checksum, and with it a run of good blocks).

kv_spill (``KVSpiller``). A paged handle commits a full block bound for the host or disk tier
by copying it into a spill buffer (``commit``), which it keeps as fresh so this sweep's
attention reads it from memory. After the layer's compute the runner calls ``after_layer``: the
layer's new blocks are written to their tier on the store's writer thread, overlapping the next
units, and each buffer is reused only once its write has landed. Buffers are bounded
(``max_buffers``); a commit that finds none free waits for the oldest write in flight (a
layer's own new blocks are always held: that wait has nothing to wait for). A write that fails
fails its sequence (``kv.fail``) and nobody else's. ``drain`` waits for every write; the sweep
ends with it, so the prefix cache and the next sweep see every block in its tier.

On CUDA, ``DeviceKV`` (``stages/kv_device.py``) moves the bytes: blocks from the host pool or the
disk window go to device staging buffers on a copy stream, the compute stream waits for the
copy's event, and new blocks leave the device on the copy stream after an event of the compute
that produced them.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tierflow.adapters import ModelSpec
from tierflow.stages.kv_spill import KVSpiller
from tierflow.tiers.kv.blocks import BlockRef
from tierflow.tiers.kv.handle import KVHandle, first_visible
from tierflow.tiers.kv.paged import KVStore
from tierflow.tiers.plan.costmodel import KV_READ_RUN


@dataclass(frozen=True, slots=True)
class KVRead:
    seq_id: int
    layer: int
    index: int                  # the block's index in the layer's table
    ref: BlockRef               # where it is ("host" or "disk")


@dataclass(frozen=True, slots=True)
class KVLoadPlan:
    """What a sweep's attention will take from off the device, in the order it takes it."""
    reads: tuple[KVRead, ...]


def plan_loads(spec: ModelSpec, kv: Sequence[KVHandle], starts: Sequence[int],
               skip: Callable[[int], bool] = lambda i: False) -> KVLoadPlan:
    """The off-device blocks of sequences ``kv`` (their first new positions ``starts``) in sweep
    order: layer by layer, sequence by sequence, block by block; ``skip(i)``: sequence i is not
    computed (refused, or its KV already failed)."""
    reads = [KVRead(handle.seq_id, layer, block.index, block.ref)
             for layer in range(spec.num_layers)
             for i, (handle, start) in enumerate(zip(kv, starts)) if not skip(i)
             for block in handle.off_device(layer, first_visible(start, spec.window(layer)))]
    return KVLoadPlan(tuple(reads))


@dataclass(frozen=True, slots=True)
class _Run:
    first: int                  # ordinal (among the plan's disk blocks) of its first block
    count: int
    slot: int                   # spill slot of its first block


def _runs(disk: Sequence[KVRead], window: int) -> list[_Run]:
    runs, i = [], 0
    most = min(KV_READ_RUN, max(1, window // 2))        # two runs in the window: one reads while one is taken
    while i < len(disk):
        j = i + 1
        while j < len(disk) and j - i < most and j % window and disk[j].ref.slot == disk[j - 1].ref.slot + 1 \
                and (disk[j].seq_id, disk[j].layer) == (disk[i].seq_id, disk[i].layer):
            j += 1
        runs.append(_Run(i, j - i, disk[i].ref.slot))
        i = j
    return runs


@dataclass(frozen=True, slots=True)
class LoadStats:
    planned: int                # off-device blocks in this sweep's plan
    read: int                   # disk blocks read, summed over sweeps
    requests: int               # read requests (runs), summed over sweeps
    waited: int                 # takes that found their read still running
    unplanned: int              # takes of blocks the plan did not list (read synchronously; should be 0)


class KVLoader:
    """kv_load: a sweep's off-device KV blocks, read ahead in plan order within the window.
    ``before_read(buffer)`` runs on the reader thread before a read into window buffer
    ``buffer`` (on CUDA: wait for the copy that last read it); ``place(block, buffer)`` puts a
    host block (``buffer``: its window buffer, or None for a host-pool block) on the device."""

    def __init__(self, store: KVStore, place: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None,
                 before_read: Callable[[int], None] | None = None) -> None:
        self.store, self.window = store, store.window_blocks
        self._place = place or (lambda block, buffer: block)
        self._before_read = before_read
        self._lock = threading.Lock()
        self._order: dict[tuple[int, int, int], int] = {}        # (seq, layer, index) → disk ordinal (-1: host)
        self._first: dict[tuple[int, int], int] = {}             # (seq, layer) → its first planned block
        self._disk: list[KVRead] = []
        self._runs: list[_Run] = []
        self._run_of: list[int] = []
        self._futures: dict[int, Future[list[torch.Tensor]]] = {}
        self._layer_end: dict[int, int] = {}                     # layer → disk ordinal after its last block
        self._released = self._submitted = 0
        self._planned = self._read = self._requests = self._waited = self._unplanned = 0

    def statistics(self) -> LoadStats:
        return LoadStats(self._planned, self._read, self._requests, self._waited, self._unplanned)

    def begin(self, plan: KVLoadPlan) -> None:
        """Start reading ``plan``'s disk blocks (at once: the first units overlap them)."""
        self.end()
        self._planned = len(plan.reads)
        self._disk = [r for r in plan.reads if r.ref.tier == "disk"]
        self._order = {(r.seq_id, r.layer, r.index): -1 for r in plan.reads}
        for r in plan.reads:
            key = (r.seq_id, r.layer)
            self._first[key] = min(r.index, self._first.get(key, r.index))
        for o, r in enumerate(self._disk):
            self._order[(r.seq_id, r.layer, r.index)] = o
            self._layer_end[r.layer] = o + 1
        self._runs = _runs(self._disk, self.window) if self._disk else []
        self._run_of = [n for n, run in enumerate(self._runs) for _ in range(run.count)]
        self._released = self._submitted = 0
        self._fill()

    def take(self, seq_id: int, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        """The block on the device; every planned disk block before it is given back."""
        ordinal = self._order.get((seq_id, layer, index))
        if ordinal is None:
            self._unplanned += 1
            return self.store.read_block(ref)
        if ordinal < 0:
            return self._place(self.store.pool_block(ref), None)
        self._release(ordinal)
        future = self._futures[self._run_of[ordinal]]
        if not future.done():
            self._waited += 1
        block = future.result()[ordinal - self._runs[self._run_of[ordinal]].first]
        return self._place(block, ordinal % self.window)

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        """The first block of (seq_id, layer) this sweep's plan reads (None: none)."""
        return self._first.get((seq_id, layer))

    def finish_layer(self, layer: int) -> None:
        """The layer's attention is done: its blocks' buffers are free for the reads behind them."""
        self._release(self._layer_end.get(layer, 0))

    def end(self) -> None:
        """The sweep is over: wait for reads still running (nobody will use them)."""
        futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            try:
                future.result()
            except Exception:       # noqa: BLE001 - nobody takes these blocks; only their reads must be over
                pass
        self._order, self._disk, self._runs, self._run_of, self._layer_end = {}, [], [], [], {}
        self._first = {}
        self._released = self._submitted = 0

    def _release(self, ordinal: int) -> None:
        with self._lock:
            if ordinal <= self._released:
                return
            self._released = ordinal
        self._fill()

    def _fill(self) -> None:
        with self._lock:
            while self._submitted < len(self._runs):
                run = self._runs[self._submitted]
                if run.first + run.count > self._released + self.window:
                    break
                assert self.store.reads is not None
                self._futures[self._submitted] = self.store.reads.submit(self._read_run, run)
                self._submitted += 1

    def _read_run(self, run: _Run) -> list[torch.Tensor]:
        buffer = run.first % self.window
        if self._before_read is not None:
            for b in range(buffer, buffer + run.count):
                self._before_read(b)
        blocks = self.store.read_run(run.slot, run.count, self.store.window_buffer(buffer, run.count))
        with self._lock:
            self._read += run.count
            self._requests += 1
        return blocks


class KVStages:
    """kv_load and kv_spill of one engine, the paged store's ``BlockIO`` while a sweep runs."""

    def __init__(self, store: KVStore, device: Any = None) -> None:
        """``device``: a ``kv_device.DeviceKV`` on CUDA (None on CPU, where the device is the host)."""
        self.store = store
        self.loader = KVLoader(store, place=device.place if device else None,
                               before_read=device.before_read if device else None)
        self.spiller = KVSpiller(store, new_buffer=device.new_buffer if device else None,
                                 write=device.write if device else None,
                                 stage_out=device.stage_out if device else None)

    def begin(self, plan: KVLoadPlan, handles: Sequence[KVHandle]) -> None:
        self.spiller.begin(handles)
        self.loader.begin(plan)
        self.store.attach(self)

    def commit(self, seq_id: int, layer: int, ref: BlockRef, block: torch.Tensor) -> torch.Tensor | None:
        return self.spiller.commit(seq_id, layer, ref, block)

    def load(self, seq_id: int, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        return self.loader.take(seq_id, layer, index, ref)

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        return self.loader.first_planned(seq_id, layer)

    def after_layer(self, layer: int) -> None:
        """In the compute worker, after the layer's compute (enqueued, on CUDA)."""
        self.loader.finish_layer(layer)
        self.spiller.after_layer(layer)

    async def end(self) -> None:
        """Every spill of the sweep has landed and no read is running; handles go back to DirectIO."""
        try:
            pending = self.spiller.drain()
            if pending:
                await asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)
        finally:
            await asyncio.to_thread(self.loader.end)
            self.store.detach()
