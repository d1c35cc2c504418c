"""The kv_load stage of a sweep (``KVLoader``), and the plan it reads by (``plan_loads``).

The sweep knows, before its first unit, which sequences it visits and, per layer, which of their
committed blocks attention will take from off the device: every committed block from the first
one the layer's sliding window still sees (``plan_loads``). The loader reads the plan's disk
blocks in exactly that order — unit by unit, sequence by sequence, block by block — on the
store's reader threads into its window of ``window_blocks`` read buffers (disk block ``o`` in
buffer ``o % window_blocks``), each read started once the buffers it needs are given back.
Blocks are given back in plan order (taking a run's first block gives back every block before
the run; a layer's end the rest of the layer's), so reads run a full window ahead of attention,
across layer boundaries. A run of blocks in consecutive spill slots of one (sequence, layer) is
one request (up to KV_READ_RUN, never wrapping round the window); every pool gives each
(sequence, layer) its slots in runs of that length (``tiers/kv/pool.py:BlockPool``), so a
prefill's chunks, which commit a few blocks of each layer in turn, leave each layer's blocks
consecutive — and attention merges the blocks of one read run in one step (``together``). A
read into a buffer first waits, on its reader thread, for the read started before it into that
buffer (a run given back untaken, or a dropped read ahead, may still be landing there). The
compute thread waits only for a read that has not landed; a read that fails (a checksum, a
deleted file) raises in the attention that takes that block, which fails that sequence alone.

Across the sweep boundary. Once every read of the plan has started, the window's free buffers
read the next sweep's first blocks: those the next plan would list if every sequence of this
sweep went on from where it leaves off (``begin``'s ``ahead``, asked for a layer once its
compute is done and its tables are final; no further than a window). Nothing is learnt from
earlier sweeps: it is this sweep's own plan, one step on. A block committed this sweep holds no
checksum until its write lands (``KVStore.forget``), and reads ahead stop at the first such
block, as at a linear-attention layer (its state is written anew every sweep). The next
``begin`` keeps a run read ahead only when its plan lists the same blocks in the same slots, in
the same place, and every slot still holds the block the read checked (the spill file's
checksums are those the read checked against: no write since); every other read ahead is
dropped and its blocks read as planned. A read ahead that failed is read again as planned (on
the compute thread, when the failure shows only once kept), so its fault is reported (and a
deleted spill file replaced) as any planned read's. Without this the disk would sit idle through
the last layer's compute, the head, sampling and scheduling, and the first layer would wait for
its first read (a quarter of a decode step at 16k tokens in bench/long_context.py's model).

Sliding-window rings. A paged sliding-window layer releases, at the start of its append, the
blocks before the first one its window still sees (``tiers/kv/sequence.py``); a released slot may
be given to another block, of any sequence, and rewritten in the same sweep. The plan starts
each layer at that very block (``first_visible(start, window)``, ``start`` being the layer's
length when the sweep begins), so no planned read, however far ahead, targets a released
slot. The loader also tells the store (``first_planned``) where each (sequence, layer)'s plan
begins, and a ring never releases a block from there on: should a plan ever reach further
back than the ring, that block stays held until the next sweep instead of being read while its
slot is rewritten (a torn read would fail its checksum, and with it a run of good blocks).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from tierflow.stages.kv_plan import KVLoadPlan, KVRead, ReadRun, read_runs
from tierflow.tiers.kv.blocks import BlockRef
from tierflow.tiers.kv.paged import KVStore


@dataclass(frozen=True, slots=True)
class LoadStats:
    planned: int                # off-device blocks in this sweep's plan
    read: int                   # disk blocks read, summed over sweeps (read ahead or not)
    requests: int               # read requests (runs), summed over sweeps
    waited: int                 # takes that found their read still running
    unplanned: int              # takes of blocks the plan did not list (read synchronously; should be 0)
    ahead: int = 0              # disk blocks whose reads started for a next sweep before its plan existed
    ahead_used: int = 0         # of those, the blocks the next sweep kept (a kept read that failed is read again)


@dataclass(slots=True)
class _Ahead:
    """The next sweep's reads as far as the finished layers make them known, and those started."""
    base: int                                   # ordinal of its first block (this sweep's last + 1)
    disk: list[KVRead] = field(default_factory=list)
    runs: list[ReadRun] = field(default_factory=list)
    futures: list[Future[list[torch.Tensor]]] = field(default_factory=list)    # of runs[:len(futures)]
    sums: list[tuple[int | None, ...]] = field(default_factory=list)          # each started run's checksums


class KVLoader:
    """kv_load: a sweep's off-device KV blocks, read ahead in plan order within the window, and
    then the next sweep's as far as they are known (``begin``'s ``ahead``).
    ``before_read(buffer)`` runs on the reader thread before a read into window buffer
    ``buffer`` (on CUDA: wait for the copy that last read it); ``place(block, buffer)`` puts a
    host block (``buffer``: its window buffer, or None for a host-pool block) on the device."""

    def __init__(self, store: KVStore, place: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None,
                 before_read: Callable[[int], None] | None = None) -> None:
        self.store, self.window = store, store.window_blocks
        self._place, self._place_block = place or (lambda block, buffer: block), place is not None
        self._before_read = before_read
        self._lock = threading.Lock()
        self._order: dict[tuple[int, int, int], int] = {}        # (seq, layer, index) → disk ordinal (-1: host)
        self._first: dict[tuple[int, int], int] = {}             # (seq, layer) → its first planned block
        self._base = 0                                           # ordinal of this sweep's first disk block
        self._disk: list[KVRead] = []
        self._runs: list[ReadRun] = []
        self._run_of: list[int] = []                             # disk block (from base) → its run
        self._futures: dict[int, Future[list[torch.Tensor]]] = {}
        self._layer_end: dict[int, int] = {}                     # layer → disk ordinal after its last block
        self._released = self._submitted = self._adopted = 0
        self._taking, self._taken = -1, []                       # the run attention takes blocks of, and they
        self._next: Callable[[int], Sequence[KVRead] | None] | None = None
        self._ahead: _Ahead | None = None
        self._dropped: list[Future[list[torch.Tensor]]] = []     # reads ahead the plan did not keep
        # the last read started into each buffer: the next read into it waits for it (on its thread)
        self._owners: list[Future[list[torch.Tensor]] | None] = [None] * self.window
        self._planned = self._read = self._requests = self._waited = self._unplanned = 0
        self._ahead_read = self._ahead_used = 0

    def statistics(self) -> LoadStats:
        return LoadStats(self._planned, self._read, self._requests, self._waited, self._unplanned,
                         self._ahead_read, self._ahead_used)

    def begin(self, plan: KVLoadPlan, ahead: Callable[[int], Sequence[KVRead] | None] | None = None) -> None:
        """Start reading ``plan``'s disk blocks (at once: the first units overlap them).
        ``ahead(layer)``: the reads the next sweep's plan would list for ``layer`` if every
        sequence of this one went on (asked once the layer's compute is done, when its blocks
        are final), read once this plan's reads are all started; None: none from there on."""
        self.end()
        self._planned = len(plan.reads)
        disk = [r for r in plan.reads if r.ref.tier == "disk"]
        adopted, base = self._adopt(disk)
        self._base, self._disk = base, disk
        self._order = {(r.seq_id, r.layer, r.index): -1 for r in plan.reads}
        for r in plan.reads:
            key = (r.seq_id, r.layer)
            self._first[key] = min(r.index, self._first.get(key, r.index))
        for o, r in enumerate(disk, start=base):
            self._order[(r.seq_id, r.layer, r.index)] = o
            self._layer_end[r.layer] = o + 1
        self._runs = read_runs(disk, self.window, base) if disk else []
        self._run_of = [n for n, run in enumerate(self._runs) for _ in range(run.count)]
        self._futures = dict(enumerate(adopted))
        self._released, self._submitted = base, len(adopted)
        self._adopted = len(adopted)                             # runs[:adopted] were read ahead
        self._next = ahead if self.window else None
        self._fill()

    def take(self, seq_id: int, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        """The block on the device; every planned disk block before it is given back."""
        ordinal = self._order.get((seq_id, layer, index))
        if ordinal is None:
            self._unplanned += 1
            return self.store.read_block(ref)
        if ordinal < 0:
            return self._place(self.store.pool_block(ref), None)
        run = self._run_of[ordinal - self._base]
        if run != self._taking:         # a run's first block taken gives back the blocks before the run
            self._release(self._runs[run].first)
            future = self._futures[run]
            if not future.done():
                self._waited += 1
            try:
                blocks = future.result()
            except Exception:
                if run >= self._adopted:
                    raise
                blocks = self._read_again(run)
            self._taking, self._taken = run, blocks
        return self._place(self._taken[ordinal - self._runs[run].first], ordinal % self.window)

    def together(self, seq_id: int, layer: int, index: int, count: int) -> int:
        """Of ``count`` blocks from ``index`` in consecutive slots of one tier, how many ``take``
        hands out at once: on the CPU (no ``place``) host-pool views all, a disk run's window
        buffers to the run's end (a later run's take gives them back); with ``place`` one."""
        ordinal = self._order.get((seq_id, layer, index))
        if self._place_block or ordinal is None:
            return 1
        run = self._runs[self._run_of[ordinal - self._base]] if ordinal >= 0 else None
        return count if run is None else max(1, min(count, run.first + run.count - ordinal))

    def _read_again(self, run: int) -> list[torch.Tensor]:
        """A run read ahead of its plan failed: read it as the plan would have (a fault is then
        reported, and dealt with, as any planned read's)."""
        again: Future[list[torch.Tensor]] = Future()
        self._futures[run] = again
        try:
            again.set_result(self._read_run(self._runs[run]))
        except Exception as exc:
            again.set_exception(exc)
        return again.result()

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        """The first block of (seq_id, layer) this sweep's plan reads (None: none)."""
        return self._first.get((seq_id, layer))

    def finish_layer(self, layer: int) -> None:
        """The layer's attention is done: its blocks' buffers are free for the reads behind them,
        and the next sweep's reads of the layer are known."""
        ahead = self._ahead
        # no further than a window: no more than that can be read before the next sweep begins
        asked = self._next(layer) if self._next is not None and (ahead is None or len(ahead.disk) < self.window) \
            else ()
        if asked is None:               # nothing from this layer on (see ``begin``)
            self._next = None
        reads = [r for r in asked or () if r.ref.tier == "disk"]
        if reads:
            with self._lock:
                ahead = self._ahead = ahead or _Ahead(self._base + len(self._disk))
                # runs never span two layers, so those already made stay as they are
                ahead.runs += read_runs(reads, self.window, ahead.base + len(ahead.disk))
                ahead.disk += reads
            self._fill()                # buffers may be free already (a plan with nothing on disk)
        self._release(self._layer_end.get(layer, 0))

    def end(self) -> None:
        """The sweep is over: wait for its reads still running (nobody will use them). The next
        sweep's reads go on; its ``begin`` keeps those its plan lists."""
        futures, self._futures = list(self._futures.values()), {}
        dropped, self._dropped = self._dropped, []
        _wait(futures + dropped)
        with self._lock:
            self._base += len(self._disk)
            self._released, self._submitted = self._base, 0
        self._order, self._disk, self._runs, self._run_of, self._layer_end = {}, [], [], [], {}
        self._first, self._next = {}, None
        self._taking, self._taken = -1, []

    def drop_ahead(self) -> None:
        """Wait for the reads started for a next sweep and forget them (between sweeps, before
        a spill file deleted under the engine is closed)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            _wait(ahead.futures)

    def _adopt(self, disk: list[KVRead]) -> tuple[list[Future[list[torch.Tensor]]], int]:
        """The reads started for this sweep (``disk``, its plan's disk blocks) that its plan lists
        in the same order, as the first runs of the plan, and the ordinal of its first block. A
        run is kept only if its blocks and their slots are the plan's and every slot still holds
        the block the read checked (no write since); the rest are dropped, unwaited for here (on
        the event loop): the read that next uses a buffer of theirs waits for them first."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or not ahead.futures:
            return [], 0
        kept: list[Future[list[torch.Tensor]]] = []
        planned = read_runs(disk, self.window, ahead.base) if disk else []
        for n, (run, future) in enumerate(zip(ahead.runs, ahead.futures)):
            o = run.first - ahead.base
            failed = future.done() and future.exception() is not None     # read again, as planned
            same = n < len(planned) and planned[n] == run and disk[o:o + run.count] == ahead.disk[o:o + run.count]
            if failed or not same or self.store.block_sums(run.slot, run.count) != ahead.sums[n]:
                break
            kept.append(future)
        self._dropped = ahead.futures[len(kept):]
        if not kept:
            return [], 0
        self._ahead_used += sum(run.count for run in ahead.runs[:len(kept)])
        return kept, ahead.base

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
                    return
                self._futures[self._submitted] = self._submit(run, True, None)
                self._submitted += 1
            ahead = self._ahead
            while ahead is not None and len(ahead.futures) < len(ahead.runs):
                run = ahead.runs[len(ahead.futures)]
                sums = self.store.block_sums(run.slot, run.count)
                if run.first + run.count > self._released + self.window or None in sums:
                    return          # no buffer yet, or a block whose spill has not landed: stop here
                ahead.futures.append(self._submit(run, False, sums))
                ahead.sums.append(sums)
                self._ahead_read += run.count

    def _submit(self, run: ReadRun, planned: bool,
                expected: tuple[int | None, ...] | None) -> Future[list[torch.Tensor]]:
        """Start ``run``'s read (under the lock); it first waits for the reads started before it
        into its buffers (a run given back untaken, or dropped, may still be landing there):
        started earlier on the same threads, they are running or done by then."""
        assert self.store.reads is not None
        first = run.first % self.window
        before = tuple({id(f): f for f in self._owners[first:first + run.count] if f is not None}.values())
        future = self.store.reads.submit(partial(self._read_run, planned=planned, before=before, expected=expected),
                                         run)
        self._owners[first:first + run.count] = [future] * run.count
        return future

    def _read_run(self, run: ReadRun, planned: bool = True, before: tuple[Future[Any], ...] = (),
                  expected: tuple[int | None, ...] | None = None) -> list[torch.Tensor]:
        """``expected``: the checksums to check against (a read ahead: those ``begin`` compares)."""
        _wait(before)
        buffer = run.first % self.window
        if self._before_read is not None:
            for b in range(buffer, buffer + run.count):
                self._before_read(b)
        blocks = self.store.read_run(run.slot, run.count, buffer, replace=planned, expected=expected)
        with self._lock:
            self._read += run.count
            self._requests += 1
        return blocks


def _wait(futures: Iterable[Future[Any]]) -> None:
    """Wait for reads nobody will take: only that they are over matters, not how they ended."""
    for future in futures:
        try:
            future.result()
        except Exception:       # noqa: BLE001 - nobody takes these blocks
            pass
