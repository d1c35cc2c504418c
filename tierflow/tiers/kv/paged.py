"""Paged KV storage: blocks of ``block_tokens`` tokens of one layer in a device pool, a host
pool and a disk spill file, placed by ``KVBlockTables``. Each sequence reaches its blocks through a
``sequence.PagedSequenceKV`` (``KVStore.sequence``).

Outside a sweep (the prefix cache attaching or reading blocks between sweeps) the store's own
``DirectIO`` writes and reads synchronously. The store owns what the stages use and ``close``
gives back: the spill file, the pinned window of disk read buffers (plus, on CUDA, host
buffers for blocks on their way from the device to disk), READ_THREADS reader threads (started
at open; READS_IN_FLIGHT requests at the disk at once) and one writer thread (the spill file
writes through one aligned bounce buffer, so writes are serial).
A store that opens with disk blocks first removes the spill files of dead processes from its
directory (``spill.remove_orphaned_spills``: their locks are free).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from tierflow.errors import ConfigError, TransferError
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.tiers.io.reader import aligned_empty, started_pool
from tierflow.tiers.io.spill import SpillFile, remove_orphaned_spills
from tierflow.tiers.kv.blocks import BlockRef, KVBlockTables, KVPoolsStats
from tierflow.tiers.kv.handle import BlockIO
from tierflow.tiers.kv.layout import KVLayout
from tierflow.tiers.kv.sequence import PagedSequenceKV
from tierflow.tiers.plan.costmodel import KV_READ_RUN, kv_read_window

# Two reads in flight: on a 2-core machine four reader threads took CPU from the compute they
# were meant to overlap (bench/long_context.py: 8k decode ~35 ms with two, ~40-45 ms with four).
# Three threads for them: while one checks the CRC of the run it read and starts the next, the
# other two keep two requests at the disk (with two threads, one request was alone there for 17%
# of a 32k decode). Alternating in one process, 32k decode from disk: 55.7-56.2 ms a token against
# 58.4-59.1 with two threads (61.1 with three in flight); 16k (compute-bound): no change.
READ_THREADS = 3
READS_IN_FLIGHT = 2
SPILL_HOST_BUFFERS = 8          # CUDA: host buffers of blocks copied off the device on their way to disk


def block_bytes(num_kv_heads: int, head_dim: int, block_tokens: int, dtype: torch.dtype) -> int:
    """Bytes of one block: keys and values of ``block_tokens`` tokens of one layer."""
    return 2 * num_kv_heads * block_tokens * head_dim * dtype.itemsize


class KVStore:
    """Engine-wide block storage. ``layout`` gives each layer's sliding window (None: every
    layer full attention); its sliding-window layers keep rings. ``close()`` removes the spill file."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int, device_blocks: int, host_blocks: int, disk_blocks: int,
                 spill_dir: str | os.PathLike[str] | None, tracer: Tracer = NULL_TRACER,
                 layout: KVLayout | None = None,
                 allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                 bind_thread: Callable[[], None] | None = None) -> None:
        """``allocate(shape, dtype)`` makes the device pool (on CUDA the device's own allocator;
        by default ``torch.empty`` on ``device``); ``bind_thread`` runs first on each reader and
        writer thread (on CUDA they wait on events: the device must be theirs)."""
        layout = layout if layout is not None else KVLayout.full(num_layers, block_tokens)
        if (layout.num_layers, layout.block_tokens) != (num_layers, block_tokens):
            raise ValueError(f"KVStore layout: {layout.num_layers} layers of {layout.block_tokens}-token blocks, but "
                             f"the store has {num_layers} layers of {block_tokens}-token blocks")
        self.tracer, self.layout = tracer, layout
        self.num_layers, self.block_tokens, self.dtype, self.device = num_layers, block_tokens, dtype, device
        self.block_shape = (2, num_kv_heads, block_tokens, head_dim)
        self.block_bytes = block_bytes(num_kv_heads, head_dim, block_tokens, dtype)
        self.tables = KVBlockTables({"device": device_blocks, "host": host_blocks, "disk": disk_blocks},
                                    num_layers=num_layers, block_tokens=block_tokens, disk_extent=KV_READ_RUN,
                                    memory_extent=KV_READ_RUN)
        allocate = allocate or (lambda shape, dt: torch.empty(shape, dtype=dt, device=device))
        # the host pool starts on a page, as pinning it (cudaHostRegister) requires
        self._pools = {"device": allocate((device_blocks, *self.block_shape), dtype),
                       "host": aligned_empty(host_blocks * self.block_bytes).view(dtype).view(host_blocks,
                                                                                          *self.block_shape)}
        self.spill: SpillFile | None = None
        if disk_blocks:
            if spill_dir is None:
                raise ConfigError("KV blocks on disk need a spill directory: set EngineConfig.kv_cache_dir (tierflow run --kv-cache-dir), or give the device and host KV budgets room for every block")
            directory = Path(spill_dir)
            directory.mkdir(parents=True, exist_ok=True)
            remove_orphaned_spills(directory)       # what killed processes left (spill.py)
            self.spill = SpillFile.create(directory, self.block_bytes, disk_blocks, reads_in_flight=READS_IN_FLIGHT)
        # The disk read window (the kv_load stage reads blocks ahead into it) and, after it, host
        # buffers for device → disk spills on CUDA: one allocation (huge-page backed when large
        # enough), so a run of blocks lands in physically contiguous memory and its O_DIRECT read
        # is not split into small requests, and one pinning covers it all.
        self.window_blocks = kv_read_window(disk_blocks, self.block_bytes) if self.spill is not None else 0
        self.stride = self.spill.stride if self.spill is not None else 0
        self.spill_host_blocks = SPILL_HOST_BUFFERS if self.spill is not None else 0
        self.window = aligned_empty((self.window_blocks + self.spill_host_blocks) * self.stride) \
            if self.spill is not None else None
        # made once: a reader thread holds the GIL for no view of its own (the compute thread waits on it)
        self._window_memory = memoryview(self.window.numpy()) if self.window is not None else None
        self._window_blocks = [self.as_block(self.window_buffer(b)) for b in range(self.window_blocks)]
        self._replacing = threading.Lock()
        self._retired: list[SpillFile] = []     # spill files deleted under the engine, closed at detach
        self.reads = started_pool(READ_THREADS, "tierflow-kv-read", bind_thread) if self.spill is not None else None
        self.writes = ThreadPoolExecutor(1, thread_name_prefix="tierflow-kv-spill", initializer=bind_thread)
        self.io: BlockIO = DirectIO(self)
        self._pinned: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []

    def pin_host_memory(self, pin: Callable[[torch.Tensor], None], unpin: Callable[[torch.Tensor], None]) -> None:
        """On CUDA: page-lock the host pool and the disk window, so their copies to and from the
        device go by DMA straight from them; ``close`` unlocks them."""
        for buffer in (self._pools["host"], self.window):
            if buffer is not None and buffer.numel():
                pin(buffer)
                self._pinned.append((buffer, unpin))

    @property
    def capacity_tokens(self) -> int:
        """Tokens of context all sequences together can hold with every layer full attention
        (whole blocks in every layer; sliding-window rings make room for more)."""
        return self.tables.capacity_blocks // self.num_layers * self.block_tokens

    def statistics(self) -> KVPoolsStats:
        return self.tables.statistics()

    def spread(self, nbytes: int) -> dict[str, float]:
        """``nbytes`` of KV shared out over the tiers as the blocks in use now are (all on the
        device when no block is committed yet: the tails live there)."""
        used = {tier: stats.used for tier, stats in self.statistics().by_tier().items()}
        total = sum(used.values())
        return {tier: nbytes * n / total for tier, n in used.items()} if total else {"device": nbytes}

    # -- blocks where they live ------------------------------------------------------------

    def pool_block(self, ref: BlockRef) -> torch.Tensor:
        """The device or host pool slot ``ref`` ([2, kv_heads, block_tokens, head_dim], a view)."""
        return self._pools[ref.tier][ref.slot]

    def window_buffer(self, first: int, count: int = 1) -> torch.Tensor:
        """Bytes of ``count`` consecutive window buffers from ``first`` (read buffers first, then
        the host spill buffers)."""
        assert self.window is not None
        return self.window[first * self.stride:(first + count) * self.stride]

    def as_block(self, data: torch.Tensor) -> torch.Tensor:
        """A block's bytes (uint8) as [2, kv_heads, block_tokens, head_dim]."""
        return data[:self.block_bytes].view(self.dtype).view(self.block_shape)

    def write(self, ref: BlockRef, block: torch.Tensor) -> None:
        """Store ``block`` at ``ref``, synchronously (blocking on disk I/O for a disk slot)."""
        if ref.tier == "disk":
            self._disk().write(ref.slot, block if block.device.type == "cpu" else block.cpu())
        else:
            self._pools[ref.tier][ref.slot].copy_(block)

    def read_run(self, first_slot: int, count: int, first_buffer: int, *, replace: bool = True,
                 expected: tuple[int | None, ...] | None = None) -> list[torch.Tensor]:
        """Read ``count`` disk blocks in consecutive slots from ``first_slot`` with one request into
        the window buffers from ``first_buffer``; the blocks there, each checksum checked.
        ``replace=False`` (a read ahead of its sweep's plan): a spill file deleted under the engine
        fails the read but is left for the read that needs its blocks to find and replace.
        ``expected``: the checksums to check the blocks against (default: those the file holds)."""
        assert self._window_memory is not None and first_buffer + count <= self.window_blocks
        started = time.perf_counter()
        memory = self._window_memory[first_buffer * self.stride:(first_buffer + count) * self.stride]
        self._disk(replace).read_run(first_slot, count, memory, expected=expected)
        self.tracer.span("disk: KV blocks", f"{count} blocks", started, time.perf_counter(), first_slot=first_slot)
        return self._window_blocks[first_buffer:first_buffer + count]

    def block_sums(self, first_slot: int, count: int) -> tuple[int | None, ...]:
        """The checksums of the blocks in ``count`` disk slots from ``first_slot`` (None: the slot
        holds no complete block, or is being written): equal twice, the slots were not written
        in between."""
        spill = self.spill
        return spill.sums(first_slot, count) if spill is not None else (None,) * count

    def forget(self, ref: BlockRef) -> None:
        """A disk slot is given a new block: its old one's checksum goes, so no read takes the old
        bytes for good ones before the new block's write lands."""
        if ref.tier == "disk" and self.spill is not None:
            self.spill.free(ref.slot)

    def held_block(self, ref: BlockRef) -> torch.Tensor:
        """The block at ``ref``, outside a sweep: a device pool slot's view, else ``read_block``'s copy."""
        return self.pool_block(ref) if ref.tier == "device" else self.read_block(ref)

    def read_block(self, ref: BlockRef) -> torch.Tensor:
        """A copy of the block at ``ref`` on the device, synchronously (outside a sweep)."""
        if ref.tier != "disk":
            return self._pools[ref.tier][ref.slot].to(self.device, copy=True)
        out = torch.empty(self.block_shape, dtype=self.dtype)
        self._disk().read(ref.slot, out)
        return out.to(self.device)

    def _disk(self, replace: bool = True) -> SpillFile:
        """The spill file. One deleted under the engine is replaced by a fresh, empty one (so
        later requests work) and the request that needed it fails with a clear error."""
        with self._replacing:           # reader threads may find the deletion together
            return self._live_spill(replace)

    def _live_spill(self, replace: bool = True) -> SpillFile:
        spill = self.spill
        assert spill is not None
        if spill.deleted and not replace:
            raise TransferError(f"KV spill file {spill.path} was deleted while in use")
        if spill.deleted:
            # other reader threads may be reading the old file right now: it is closed between
            # sweeps (``detach``), not under them
            self._retired.append(spill)
            self.spill = SpillFile.create(spill.path.parent, self.block_bytes, spill.num_slots,
                                            reads_in_flight=READS_IN_FLIGHT)
            raise TransferError(f"KV spill file {spill.path} was deleted while in use; the blocks it held are lost "
                                f"and the requests that need them fail (a new spill file replaces it)")
        return spill

    # -- sweeps ----------------------------------------------------------------------------

    def attach(self, io: BlockIO) -> None:
        """Handles move blocks through ``io`` (the kv stages of a sweep) until ``detach``."""
        self.io = io

    @property
    def retiring(self) -> bool:
        """A spill file deleted under the engine waits to be closed (at ``detach``)."""
        return bool(self._retired)

    def detach(self) -> None:
        """The sweep is over (no read or write of it is running)."""
        self.io = DirectIO(self)
        self._close_retired()

    def sequence(self, seq_id: int) -> PagedSequenceKV:
        return PagedSequenceKV(self, seq_id)

    def _close_retired(self) -> None:
        with self._replacing:
            while self._retired:
                self._retired.pop().close()

    def close(self) -> None:
        if self.reads is not None:
            self.reads.shutdown(wait=True)
        self.writes.shutdown(wait=True)
        self._close_retired()
        if self.spill is not None:
            self.spill.close()
        while self._pinned:
            buffer, unpin = self._pinned.pop()
            unpin(buffer)


class DirectIO:
    """``BlockIO`` outside a sweep: blocks are written and read synchronously."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    def commit(self, seq_id: int, layer: int, ref: BlockRef, block: torch.Tensor) -> torch.Tensor | None:
        self.store.write(ref, block)
        return None

    def load(self, seq_id: int, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        return self.store.read_block(ref)

    def together(self, seq_id: int, layer: int, index: int, count: int) -> int:
        return 1                        # each load is a copy of its own

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        return None                     # nothing is read ahead
