"""Paged KV storage: blocks of ``block_tokens`` tokens of one layer in a device pool, a host
pool and a disk spill file, placed by ``KVBlockTables``.

``PagedSequenceKV`` implements ``handle.KVHandle``. Each layer's last, partly filled block lives
in a per-sequence tail buffer on the device and is committed to a pool slot (fastest tier with
room) when it fills: a device slot is written at once; a host or disk block goes through the
store's current ``BlockIO``. In a sweep that is the kv stages (``stages/kv.py``): the block is
copied into a spill buffer, kept by the handle as *fresh* — this sweep's attention reads it from
there — and written to its tier after the layer's compute, off the compute thread. Fresh blocks
are dropped at the layer's next ``append``: the sweep that made them has drained its spills by
then. ``blocks`` returns the layer's KV lazily (``handle.KVBlocks``): device blocks are pool
views, fresh ones the spill buffers, the others come from ``BlockIO.load`` (in a sweep, the
kv_load stage, which prefetched them from the plan the sweep gave it).

Sliding-window layers keep rings (``layout``: each layer's window; ``layout.py``'s arithmetic,
which the batcher admits by). ``append(layer)`` first releases every committed block wholly
before ``q - window + 1``, ``q`` being the layer's length (this sweep's earliest query), so the
layer holds ``layout.layer_blocks(window, q, end)``; indexes stay stable. The freed slot may be
rewritten by any sequence in the same sweep, safely: the sweep's load plan starts each layer at
``first_visible(start, window)``, the block the ring keeps from, so no read ahead targets a freed
slot; its own write landed in an earlier sweep; on CUDA the streams order a reused slot after its
last reader. As a guard a ring never frees a block from the current ``BlockIO``'s
``first_planned`` on (if a plan disagreed, the block stays held a sweep longer). Freed blocks
cannot be read (ValueError); ``held_from`` says where a layer's KV starts; ``trim_rings`` frees,
between sweeps, what the next append would (after the prefix cache attaches a prefix).

Outside a sweep (the prefix cache attaching or reading blocks between sweeps) the store's own
``DirectIO`` writes and reads synchronously. The store owns what the stages use and ``close``
gives back: the spill file, the pinned window of disk read buffers (plus, on CUDA, host
buffers for blocks on their way from the device to disk), READ_THREADS reader threads and one
writer thread (the spill file writes through one aligned bounce buffer, so writes are serial).
A store that opens with disk blocks first removes the spill files of dead processes from its
directory (``spill.remove_orphaned_spills``: their locks are free).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from tierflow.errors import ConfigError, TransferError
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.tiers.io.reader import aligned_empty
from tierflow.tiers.io.spill import SpillFile, remove_orphaned_spills
from tierflow.tiers.kv.blocks import BlockRef, KVBlockTables, KVPoolsStats
from tierflow.adapters.kv import HeldState
from tierflow.tiers.kv.handle import BlockIO, KVBlock, KVBlocks, OffDevice
from tierflow.tiers.kv.layout import KVLayout
from tierflow.tiers.kv.state import pack_state, state_meta, unpack_state
from tierflow.tiers.plan.costmodel import kv_read_window

# Two reads in flight: on a 2-core machine four reader threads took CPU from the compute they
# were meant to overlap (bench/long_context.py: 8k decode ~35 ms with two, ~40-45 ms with four).
READ_THREADS = 2
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
                                    num_layers=num_layers, block_tokens=block_tokens)
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
            self.spill = SpillFile.create(directory, self.block_bytes, disk_blocks)
        # The disk read window (the kv_load stage reads blocks ahead into it) and, after it, host
        # buffers for device → disk spills on CUDA: one allocation (huge-page backed when large
        # enough), so a run of blocks lands in physically contiguous memory and its O_DIRECT read
        # is not split into small requests, and one pinning covers it all.
        self.window_blocks = kv_read_window(disk_blocks, self.block_bytes) if self.spill is not None else 0
        self.stride = self.spill.stride if self.spill is not None else 0
        self.spill_host_blocks = SPILL_HOST_BUFFERS if self.spill is not None else 0
        self.window = aligned_empty((self.window_blocks + self.spill_host_blocks) * self.stride) \
            if self.spill is not None else None
        self._replacing = threading.Lock()
        self._retired: list[SpillFile] = []     # spill files deleted under the engine, closed at detach
        self.reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tierflow-kv-read", initializer=bind_thread) \
            if self.spill is not None else None
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

    def read_run(self, first_slot: int, count: int, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Read ``count`` disk blocks in consecutive slots from ``first_slot`` with one request into
        ``buffer`` (aligned, ``count * stride`` bytes); each block's view, its checksum checked."""
        started = time.perf_counter()
        views = self._disk().read_run(first_slot, count, buffer)
        self.tracer.span("disk: KV blocks", f"{count} blocks", started, time.perf_counter(), first_slot=first_slot)
        return [self.as_block(view) for view in views]

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

    def _disk(self) -> SpillFile:
        """The spill file. One deleted under the engine is replaced by a fresh, empty one (so
        later requests work) and the request that needed it fails with a clear error."""
        with self._replacing:           # reader threads may find the deletion together
            return self._live_spill()

    def _live_spill(self) -> SpillFile:
        spill = self.spill
        assert spill is not None
        if spill.deleted:
            # other reader threads may be reading the old file right now: it is closed between
            # sweeps (``detach``), not under them
            self._retired.append(spill)
            self.spill = SpillFile.create(spill.path.parent, self.block_bytes, spill.num_slots)
            raise TransferError(f"KV spill file {spill.path} was deleted while in use; the blocks it held are lost "
                                f"and the requests that need them fail (a new spill file replaces it)")
        return spill

    # -- sweeps ----------------------------------------------------------------------------

    def attach(self, io: BlockIO) -> None:
        """Handles move blocks through ``io`` (the kv stages of a sweep) until ``detach``."""
        self.io = io

    def detach(self) -> None:
        """The sweep is over (no read or write of it is running)."""
        self.io = DirectIO(self)
        self._close_retired()

    def sequence(self, seq_id: int) -> "PagedSequenceKV":
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

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        return None                     # nothing is read ahead


class PagedSequenceKV:
    def __init__(self, store: KVStore, seq_id: int) -> None:
        self.store, self.seq_id = store, seq_id
        self.num_layers = store.num_layers
        self._lengths = [0] * store.num_layers
        self._tails: list[torch.Tensor | None] = [None] * store.num_layers
        self._fresh: list[dict[int, torch.Tensor]] = [{} for _ in range(store.num_layers)]
        self.failure: BaseException | None = None     # set by ``fail``: why this sequence's KV is unusable
        self._states: dict[int, HeldState] = {}   # linear-attention layers: what each state looks like (meta)

    @property
    def num_tokens(self) -> int:
        return min(self._lengths)

    def state(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """A linear-attention layer's state (None before its first token): copies of its tensors,
        unpacked from the layer's state blocks wherever they are — a device pool view, else
        through the current ``BlockIO`` (in a sweep the kv_load stage, which read it ahead; a
        disk block's checksum is checked there)."""
        held = self._states.get(layer)
        if held is None:
            return None
        held.at(layer, self._lengths[layer])             # refuses a state after more tokens than the layer holds
        store, tables = self.store, self.store.tables
        refs = tables.table(self.seq_id, layer)
        raw = torch.empty((len(refs), *store.block_shape), dtype=store.dtype, device=store.device)
        for index, ref in enumerate(refs):
            # copied out at once: a loaded block is valid only until the next load (the kv_load
            # stage gives its window buffer back, or the next block reuses its device staging)
            raw[index].copy_(self._load(layer, index, ref))
        return unpack_state(raw, held.tensors)

    def set_state(self, layer: int, state: tuple[torch.Tensor, ...], tokens: int) -> None:
        """Replace the layer's state; its ``tokens`` new tokens count as stored. The old state's
        blocks go back to their pools (``state`` copied them out) and the new one is committed
        to fresh blocks like a full KV block — the fastest tier with room, a host or disk block
        through the current ``BlockIO`` (in a sweep, the kv_spill stage, after the layer's compute)."""
        store, tables = self.store, self.store.tables
        packed = pack_state(state, store.block_shape, store.dtype, store.layout.state_blocks)
        self._fresh[layer] = {}
        tables.release_from(self.seq_id, layer, 0)
        for block in packed:
            self._commit(layer, block)
        self._lengths[layer] += tokens
        self._states[layer] = HeldState(state_meta(state), self._lengths[layer])    # what it looks like

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` [n, kv_heads, head_dim]; full blocks are committed as they fill. A
        sliding-window layer first releases the blocks no query from its current length on sees."""
        bt, store = self.store.block_tokens, self.store
        self._fresh[layer] = {}         # the previous sweep's spills have landed
        self._release_ring(layer, self._lengths[layer])
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
                self._commit(layer, tail)

    def _release_ring(self, layer: int, first_query: int) -> None:
        """Release the layer's blocks wholly before what a query at ``first_query`` sees (never
        one the current BlockIO may still load: see the module)."""
        store = self.store
        if store.layout.keeps_state(layer):        # a linear-attention layer: its blocks are its state
            return
        keep = store.layout.first_kept_block(store.layout.windows[layer], first_query)
        if keep <= store.tables.first_held(self.seq_id, layer):
            return
        planned = store.io.first_planned(self.seq_id, layer)
        store.tables.release_before(self.seq_id, layer, keep if planned is None else min(keep, planned))

    def trim_rings(self, first_query: int) -> None:
        """Between sweeps: release in every layer what its next append from ``first_query`` would."""
        for layer in range(self.num_layers):
            self._release_ring(layer, min(first_query, self._lengths[layer]))

    def truncate(self, num_tokens: int) -> None:
        """Between sweeps: forget every token from ``num_tokens`` on in every layer (speculative
        tokens the model rejected). Committed blocks wholly past it go back to their pools; the
        block it falls inside becomes the tail again, its kept tokens copied back from whichever
        tier holds it (a disk block is read back: its write landed with the sweep), and its slot
        is freed, so no pool holds a rejected token. A ring's released blocks all lie before the
        sweep's first query, so rolling back never needs one. A linear-attention layer's state
        cannot be rolled back: it stays as it is, and ``state`` refuses it."""
        bt, store, tables = self.store.block_tokens, self.store, self.store.tables
        for layer in range(self.num_layers):
            if num_tokens >= self._lengths[layer]:
                continue
            if store.layout.keeps_state(layer):     # a state cannot be cut back: ``state`` refuses it from now on
                self._lengths[layer] = num_tokens
                continue
            keep, fill = divmod(num_tokens, bt)
            if keep < tables.first_held(self.seq_id, layer):
                raise ValueError(f"layer {layer} of sequence {self.seq_id}: its ring released the blocks before "
                                 f"token {tables.first_held(self.seq_id, layer) * bt}; it cannot roll back to "
                                 f"{num_tokens} tokens")
            if fill and keep < tables.committed(self.seq_id, layer):
                ref = tables.ref(self.seq_id, layer, keep)
                block = store.held_block(ref)
                if self._tails[layer] is None:
                    self._tails[layer] = torch.empty(store.block_shape, dtype=store.dtype, device=store.device)
                self._tails[layer][:, :, :fill] = block[:, :, :fill]
            tables.release_from(self.seq_id, layer, keep)
            self._fresh[layer] = {i: b for i, b in self._fresh[layer].items() if i < keep}
            self._lengths[layer] = num_tokens

    def gather(self, layer: int, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Between sweeps: the keys and values [n, kv_heads, head_dim] at ``positions``, each
        from its block's tier (a disk block is read: its write landed with the sweep) or the tail."""
        bt, store, tables = self.store.block_tokens, self.store, self.store.tables
        committed, held_from = tables.committed(self.seq_id, layer), tables.first_held(self.seq_id, layer)
        out = torch.empty((2, len(positions), store.block_shape[1], store.block_shape[3]), dtype=store.dtype,
                          device=store.device)
        blocks: dict[int, torch.Tensor] = {}
        for i, position in enumerate(positions):
            index, offset = divmod(position, bt)
            if index < held_from or position >= self._lengths[layer]:
                raise ValueError(f"layer {layer} of sequence {self.seq_id} does not hold token {position}")
            if index >= committed:
                block = self._tails[layer]
            elif index not in blocks:
                ref = tables.ref(self.seq_id, layer, index)
                block = blocks[index] = store.held_block(ref)
            else:
                block = blocks[index]
            out[:, i] = block[:, :, offset]
        return out[0], out[1]

    def held_from(self, layer: int) -> int:
        """The first token position of ``layer`` whose KV is still held (0 unless its ring moved on)."""
        return self.store.tables.first_held(self.seq_id, layer) * self.store.block_tokens

    def _commit(self, layer: int, tail: torch.Tensor) -> None:
        tables = self.store.tables
        ref = tables.append_block(self.seq_id, layer)
        index = tables.committed(self.seq_id, layer) - 1
        if ref.tier == "device":
            self.store.pool_block(ref).copy_(tail)
            return
        held = self.store.io.commit(self.seq_id, layer, ref, tail)
        if held is not None:
            self._fresh[layer][index] = held

    def _held(self, layer: int, first_position: int) -> tuple[int, int, tuple[BlockRef, ...]]:
        """(the first block from ``first_position``, the held blocks' first index, those blocks)."""
        tables, bt = self.store.tables, self.store.block_tokens
        held_from, held = tables.first_held(self.seq_id, layer), tables.table(self.seq_id, layer)
        first = min(first_position // bt, held_from + len(held))
        if first < held_from:
            raise ValueError(f"layer {layer} of sequence {self.seq_id} holds KV from token {held_from * bt} on (its "
                             f"sliding window released the blocks before it); position {first_position} is gone")
        return first, held_from, held

    def blocks(self, layer: int, first_position: int = 0) -> KVBlocks:
        bt = self.store.block_tokens
        first, base, held = self._held(layer, first_position)
        committed = base + len(held)
        fresh = self._fresh[layer]
        fill = self._lengths[layer] - committed * bt
        spans = tuple((i * bt, bt) for i in range(first, committed)) + (((committed * bt, fill),) if fill else ())

        def fetch(i: int) -> KVBlock:
            index = first + i
            if index == committed:
                tail = self._tails[layer]
                assert tail is not None
                return KVBlock(tail[0, :, :fill], tail[1, :, :fill], index * bt)
            ref = held[index - base]
            block = fresh.get(index)
            if block is None:
                block = self._load(layer, index, ref)
            return KVBlock(block[0], block[1], index * bt)

        return KVBlocks(spans, fetch)

    def _load(self, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        """Committed block ``index`` of ``layer`` on the device: a pool view, or through the current
        BlockIO (in a sweep, the kv_load stage: valid until its next load)."""
        store = self.store
        return store.pool_block(ref) if ref.tier == "device" else store.io.load(self.seq_id, layer, index, ref)

    def off_device(self, layer: int, first_position: int = 0) -> tuple[OffDevice, ...]:
        if self.store.layout.keeps_state(layer):       # a linear-attention layer: all its state's blocks
            return tuple(OffDevice(i, ref) for i, ref in enumerate(self.store.tables.table(self.seq_id, layer))
                         if ref.tier != "device")
        first, base, held = self._held(layer, first_position)
        return tuple(OffDevice(i, ref) for i, ref in enumerate(held[first - base:], start=first)
                     if ref.tier != "device")

    def fail(self, error: BaseException) -> None:
        """This sequence's KV failed (a spill fault): the rest of the sweep skips it, and the
        sweep reports ``error`` for it alone."""
        if self.failure is None:
            self.failure = error

    def read(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of tokens start..end-1 of ``layer`` ([2, kv_heads, end - start,
        head_dim], a copy); the range must cover whole blocks the layer still holds. Between sweeps only."""
        bt, tables = self.store.block_tokens, self.store.tables
        base, held = tables.first_held(self.seq_id, layer), tables.table(self.seq_id, layer)
        committed = base + len(held)
        if start % bt or end % bt or not 0 <= start <= end <= committed * bt:
            raise ValueError(f"tokens {start}..{end} of layer {layer}: paged KV reads whole committed blocks of "
                             f"{bt} tokens ({committed} committed)")
        if start < end and start < base * bt:
            raise ValueError(f"tokens {start}..{end} of layer {layer}: its sliding window "
                             f"({self.store.layout.windows[layer]} tokens) released the blocks before token "
                             f"{base * bt}; a released block cannot be read")
        out = torch.empty((2, self.store.block_shape[1], end - start, self.store.block_shape[3]),
                          dtype=self.store.dtype, device=self.store.device)
        for i, ref in enumerate(held[start // bt - base:end // bt - base]):
            out[:, :, i * bt:(i + 1) * bt] = self.store.read_block(ref)
        return out

    def free(self) -> None:
        self.store.tables.free_sequence(self.seq_id)
        self._tails = [None] * self.num_layers
        self._fresh = [{} for _ in range(self.num_layers)]
        self._states = {}
