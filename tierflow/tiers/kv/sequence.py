"""A sequence's paged KV: ``PagedSequenceKV``, the handle attention and the stages use, over the
engine-wide ``paged.KVStore`` (which owns the pools, the spill file and the I/O threads).

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
``first_visible(start, window)``, the block the ring keeps from, so no read of the plan targets
a freed slot (a read ahead for the next sweep may: it is kept only if the slot's checksum
has not changed, ``stages/kv_load.py``); its own write landed in an earlier sweep; on CUDA
the streams order a reused slot after its last reader. As a guard a ring never frees a block from the current ``BlockIO``'s
``first_planned`` on (if a plan disagreed, the block stays held a sweep longer). Freed blocks
cannot be read (ValueError); ``held_from`` says where a layer's KV starts; ``trim_rings`` frees,
between sweeps, what the next append would (after the prefix cache attaches a prefix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from tierflow.adapters.kv import HeldState
from tierflow.tiers.kv.blocks import BlockRef
from tierflow.tiers.kv.handle import KVBlock, KVBlocks, OffDevice
from tierflow.tiers.kv.state import pack_state, state_meta, unpack_state

if TYPE_CHECKING:
    from tierflow.tiers.kv.paged import KVStore


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

        def together(i: int, most: int) -> int:
            """Blocks from the i-th on in consecutive slots of one tier (none fresh, not the tail),
            as many of them as the tier hands out at once."""
            index = first + i
            if index >= committed or index in fresh:
                return 1
            ref, count = held[index - base], 1
            while count < most and index + count < committed and index + count not in fresh:
                after = held[index + count - base]
                if after.tier != ref.tier or after.slot != ref.slot + count:
                    break
                count += 1
            if count > 1 and ref.tier != "device":      # device slots are the pool's own views
                count = self.store.io.together(self.seq_id, layer, index, count)
            return count

        return KVBlocks(spans, fetch, together)

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
