"""Paged KV storage: blocks of ``block_tokens`` tokens of one layer in a device pool, a host
pool and a disk spill file, placed by ``KVBlockTables``.

``PagedSequenceKV`` has the interface the attention code sees (``append(layer, k, v)``), but
returns the layer's KV as an iterator of blocks — (keys, values, first position) — for the
online-softmax attention (``adapters.attention.attend_blocks``): a disk block is read into a
reusable buffer only when attention reaches it, so attention holds one block at a time
whatever the context. Each layer's last, partly filled block lives in a per-sequence tail
buffer and is committed to a pool slot (fastest tier with room) when it fills.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from tierflow.errors import ConfigError, TransferError
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.tiers.plan.costmodel import KV_READ_RUN, kv_read_window
from tierflow.tiers.kv.blocks import BlockRef, KVBlockTables, PoolStats
from tierflow.tiers.io.reader import aligned_empty
from tierflow.tiers.io.spill import SpillFile

_ids = itertools.count()
READ_THREADS = 4


def block_bytes(num_kv_heads: int, head_dim: int, block_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of one block: keys and values of ``block_tokens`` tokens of one layer."""
    return 2 * num_kv_heads * block_tokens * head_dim * dtype.itemsize


@dataclass(slots=True)
class _ReadAhead:
    key: tuple[int, int]                    # the reader it was started for
    slots: list[int]                        # first slot of each run read
    futures: list[Future[list[torch.Tensor]]]


def _runs(disk: list[BlockRef], window: int) -> list[tuple[int, int]]:
    """(first index, length) of runs of blocks in consecutive slots, each within KV_READ_RUN
    blocks and not wrapping round the window (a run lands in consecutive buffers)."""
    runs, i = [], 0
    while i < len(disk):
        j = i + 1
        while j < len(disk) and j - i < KV_READ_RUN and disk[j].slot == disk[j - 1].slot + 1 and j % window:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


def _settle(futures: Iterable[Future[Any]]) -> None:
    for future in futures:
        try:
            future.result()
        except Exception:       # noqa: BLE001 - nobody uses these blocks; only their reads must be over
            pass


class KVStore:
    """Engine-wide block storage. ``close()`` removes the spill file."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int, device_blocks: int, host_blocks: int, disk_blocks: int,
                 spill_dir: str | os.PathLike[str] | None, tracer: Tracer = NULL_TRACER) -> None:
        self.tracer = tracer
        self.num_layers, self.block_tokens, self.dtype, self.device = num_layers, block_tokens, dtype, device
        self.block_shape = (2, num_kv_heads, block_tokens, head_dim)
        self.block_bytes = block_bytes(num_kv_heads, head_dim, block_tokens, dtype)
        self.tables = KVBlockTables({"device": device_blocks, "host": host_blocks, "disk": disk_blocks},
                                    num_layers=num_layers, block_tokens=block_tokens)
        self._pools = {"device": torch.empty((device_blocks, *self.block_shape), dtype=dtype, device=device),
                       "host": torch.empty((host_blocks, *self.block_shape), dtype=dtype)}
        self.spill: SpillFile | None = None
        if disk_blocks:
            if spill_dir is None:
                raise ConfigError("KV blocks on disk need a spill directory: set EngineConfig.kv_cache_dir (tierflow run --kv-cache-dir), or give the device and host KV budgets room for every block")
            directory = Path(spill_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.spill = SpillFile(directory / f"tierflow-kv-{os.getpid()}-{next(_ids)}.spill", self.block_bytes,
                                   disk_blocks)
        # A window of read buffers: while attention uses one disk block, the next ones are read
        # into the others by several threads (one 256 KiB read at a time leaves an SSD idle).
        # One allocation (huge-page backed when large enough), so a run of blocks lands in
        # physically contiguous memory and its O_DIRECT read is not split into small requests.
        self.window_blocks = kv_read_window(disk_blocks, self.block_bytes) if self.spill is not None else 0
        self._window = aligned_empty(self.window_blocks * self.spill.stride) if self.spill is not None else None
        self._replacing = threading.Lock()
        self._successor: dict[tuple[int, int], tuple[int, int]] = {}    # reader → the one that came next
        self._skipped: dict[tuple[int, int], int] = {}                   # reader → leading blocks it skipped
        self._last_reader: tuple[int, int] | None = None
        self._ahead: _ReadAhead | None = None
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tierflow-kv") \
            if self.spill is not None else None
        self._pinned: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []

    def pin_host_memory(self, pin: Callable[[torch.Tensor], None], unpin: Callable[[torch.Tensor], None]) -> None:
        """On CUDA: page-lock the host pool and the disk read window, so their copies to the
        device go by DMA straight from them; ``close`` unlocks them."""
        for buffer in (self._pools["host"], self._window):
            if buffer is not None and buffer.numel():
                pin(buffer)
                self._pinned.append((buffer, unpin))

    @property
    def capacity_tokens(self) -> int:
        """Tokens of context all sequences together can hold (whole blocks in every layer)."""
        return self.tables.capacity_blocks // self.num_layers * self.block_tokens

    def statistics(self) -> dict[str, PoolStats]:
        return self.tables.statistics()

    def spread(self, nbytes: int) -> dict[str, float]:
        """``nbytes`` of KV shared out over the tiers as the blocks in use now are (all on the
        device when no block is committed yet: the tails live there)."""
        used = {tier: stats.used for tier, stats in self.statistics().items()}
        total = sum(used.values())
        return {tier: nbytes * n / total for tier, n in used.items()} if total else {"device": nbytes}

    def write(self, ref: BlockRef, block: torch.Tensor) -> None:
        if ref.tier == "disk":
            self._disk().write(ref.slot, block.cpu())
        else:
            self._pools[ref.tier][ref.slot].copy_(block)

    def blocks(self, refs: tuple[BlockRef, ...], key: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """Each block's [2, kv_heads, block_tokens, head_dim], in order. Disk blocks are read
        ahead on READ_THREADS threads into a window of ``window_blocks`` buffers, blocks in
        consecutive slots (up to KV_READ_RUN) with one request; a yielded disk block is valid
        until the next is taken.

        ``key`` = (sequence, layer) names the reader. The store learns which reader follows
        which (a sweep visits them in the same order every time), and when one has taken its
        last block it starts reading the first blocks of the next — layer i+1's while layer
        i finishes computing — which that reader then takes over."""
        if key is not None:
            if self._last_reader is not None:
                self._successor[self._last_reader] = key
            self._last_reader = key
            # blocks a sliding window let the reader skip (its refs are the end of its table)
            self._skipped[key] = max(0, len(self.tables.table(*key)) - len(refs))
        disk = [ref for ref in refs if ref.tier == "disk"]
        runs = _runs(disk, self.window_blocks)
        pending: deque[Future[list[torch.Tensor]]] = deque()
        ready: deque[torch.Tensor] = deque()
        submitted = taken = 0                       # runs submitted; disk blocks taken
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if key is not None and ahead.key == key and ahead.slots == [disk[f].slot for f, _ in runs[:len(ahead.slots)]]:
                pending.extend(ahead.futures)       # read for us while the previous reader finished
                submitted = len(ahead.futures)
            else:
                _settle(ahead.futures)              # a wrong guess: its reads must stop before the buffers are reused

        def submit() -> None:
            nonlocal submitted
            pending.append(self._submit_run(disk, runs[submitted]))
            submitted += 1

        try:
            for ref in refs:
                if ref.tier != "disk":
                    yield self._pools[ref.tier][ref.slot].to(self.device)
                    continue
                # the buffers of the blocks before this one are free again: keep the window full
                while submitted < len(runs) and sum(runs[submitted]) <= taken + self.window_blocks:
                    submit()
                if not ready:
                    ready.extend(pending.popleft().result())
                taken += 1
                yield ready.popleft().to(self.device)
        finally:
            _settle(pending)            # never leave a read writing into a buffer someone may reuse
        if key is not None:             # every block taken (and used): read ahead for the next reader
            self._read_ahead(self._successor.get(key))

    def _read_ahead(self, reader: tuple[int, int] | None) -> None:
        if reader is None or self.spill is None or reader[0] not in self.tables.sequences():
            return
        table = self.tables.table(*reader)[self._skipped.get(reader, 0):]
        disk = [ref for ref in table if ref.tier == "disk"]
        runs = [run for run in _runs(disk, self.window_blocks) if sum(run) <= self.window_blocks]
        if runs:
            self._ahead = _ReadAhead(reader, [disk[f].slot for f, _ in runs],
                                     [self._submit_run(disk, run) for run in runs])

    def _submit_run(self, disk: list[BlockRef], run: tuple[int, int]) -> Future[list[torch.Tensor]]:
        first, length = run
        assert self._reads is not None
        return self._reads.submit(self._read_run, disk[first].slot, length, first % self.window_blocks)

    def _read_run(self, first_slot: int, count: int, buffer: int) -> list[torch.Tensor]:
        assert self._window is not None and self.spill is not None
        stride, started = self.spill.stride, time.perf_counter()
        views = self._disk().read_run(first_slot, count, self._window[buffer * stride:(buffer + count) * stride])
        self.tracer.span("disk: KV blocks", f"{count} blocks", started, time.perf_counter(), first_slot=first_slot)
        return [view.view(self.dtype).view(self.block_shape) for view in views]

    def _disk(self) -> SpillFile:
        """The spill file. One deleted under the engine is replaced by a fresh, empty one (so
        later requests work) and the request that needed it fails with a clear error."""
        with self._replacing:           # reader threads may find the deletion together
            return self._live_spill()

    def _live_spill(self) -> SpillFile:
        spill = self.spill
        assert spill is not None
        if spill.deleted:
            spill.close()
            self.spill = SpillFile(spill.path.with_name(f"tierflow-kv-{os.getpid()}-{next(_ids)}.spill"),
                                   self.block_bytes, spill.num_slots)
            raise TransferError(f"KV spill file {spill.path} was deleted while in use; the blocks it held are lost "
                                f"and the requests that need them fail (a new spill file replaces it)")
        return spill

    def sequence(self, seq_id: int) -> "PagedSequenceKV":
        return PagedSequenceKV(self, seq_id)

    def forget(self, seq_id: int) -> None:
        """A sequence is gone: drop what the store learnt about its readers."""
        self._successor = {k: v for k, v in self._successor.items() if k[0] != seq_id and v[0] != seq_id}
        self._skipped = {k: n for k, n in self._skipped.items() if k[0] != seq_id}
        if self._last_reader is not None and self._last_reader[0] == seq_id:
            self._last_reader = None

    def close(self) -> None:
        if self._ahead is not None:
            _settle(self._ahead.futures)
            self._ahead = None
        if self._reads is not None:
            self._reads.shutdown(wait=True)
        if self.spill is not None:
            self.spill.close()
        while self._pinned:
            buffer, unpin = self._pinned.pop()
            unpin(buffer)


class PagedSequenceKV:
    def __init__(self, store: KVStore, seq_id: int) -> None:
        self.store, self.seq_id = store, seq_id
        self.num_layers = store.num_layers
        self._lengths = [0] * store.num_layers
        self._tails: list[torch.Tensor | None] = [None] * store.num_layers
        self.failure: BaseException | None = None     # set by ``fail``: why this sequence's KV is unusable

    @property
    def num_tokens(self) -> int:
        return min(self._lengths)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Store ``k``/``v`` [n, kv_heads, head_dim]; return the layer's KV as blocks. With a
        sliding ``window``, blocks wholly before every new token's window are not read."""
        bt, store = self.store.block_tokens, self.store
        first_visible = 0 if window is None else max(0, self._lengths[layer] - window + 1)
        tail = self._tails[layer]
        if tail is None:
            tail = self._tails[layer] = torch.empty(store.block_shape, dtype=store.dtype, device=store.device)
        done = 0
        while done < k.shape[0]:
            fill = self._lengths[layer] % bt
            take = min(bt - fill, k.shape[0] - done)
            tail[0, :, fill:fill + take] = k[done:done + take].transpose(0, 1)
            tail[1, :, fill:fill + take] = v[done:done + take].transpose(0, 1)
            self._lengths[layer] += take
            done += take
            if fill + take == bt:       # the tail is full: commit it to a pool slot
                store.write(store.tables.append_block(self.seq_id, layer), tail)
        return self._blocks(layer, first_visible // bt)

    def fail(self, error: BaseException) -> None:
        """This sequence's KV failed (a spill fault): the rest of the sweep skips it, and the
        sweep reports ``error`` for it alone."""
        if self.failure is None:
            self.failure = error

    def read(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of tokens start..end-1 of ``layer`` ([2, kv_heads, end - start,
        head_dim], a copy); the range must cover whole committed blocks."""
        bt = self.store.block_tokens
        committed = self.store.tables.table(self.seq_id, layer)
        if start % bt or end % bt or not 0 <= start <= end <= len(committed) * bt:
            raise ValueError(f"tokens {start}..{end} of layer {layer}: paged KV reads whole committed blocks of "
                             f"{bt} tokens ({len(committed)} committed)")
        out = torch.empty((2, self.store.block_shape[1], end - start, self.store.block_shape[3]),
                          dtype=self.store.dtype, device=self.store.device)
        for i, block in enumerate(self.store.blocks(committed[start // bt:end // bt])):
            out[:, :, i * bt:(i + 1) * bt] = block      # a disk block's buffer is reused by the next read
        return out

    def _blocks(self, layer: int, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        bt = self.store.block_tokens
        committed = self.store.tables.table(self.seq_id, layer)
        for i, block in enumerate(self.store.blocks(committed[first:], key=(self.seq_id, layer)), start=first):
            yield block[0], block[1], i * bt
        fill = self._lengths[layer] - len(committed) * bt
        if fill:
            tail = self._tails[layer]
            assert tail is not None
            yield tail[0, :, :fill], tail[1, :, :fill], len(committed) * bt

    def free(self) -> None:
        self.store.tables.free_sequence(self.seq_id)
        self.store.forget(self.seq_id)
        self._tails = [None] * self.num_layers
