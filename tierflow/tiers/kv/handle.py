"""The KV handle protocol the sweep, the engine and the prefix stage see.

``KVHandle`` is one sequence's KV cache, whatever stores it: the contiguous store
(``contiguous.SequenceKV``) and the paged one (``sequence.PagedSequenceKV``) both implement it. Its
attention-facing part — ``append``, ``blocks`` (one shape for both stores: ``KVBlocks``), ``fail``
— is ``adapters.kv.AttentionKV``, defined there because adapters sit below tiers; this adds
what the sweep runner and the engine use: the sequence id, its token count, the plan of
off-device blocks for the kv_load stage (``off_device``), whole-block reads for the prefix cache
(``read``, from ``held_from``: a paged sliding-window layer keeps only a ring of blocks),
``trim_rings``, ``truncate`` and ``gather`` (rolling back rejected speculative tokens; ``keep_path``
below keeps a candidate tree's accepted path with them) and ``free``.

``BlockIO`` is what a paged store's handles use to move blocks: during a sweep the kv stages
(``stages/kv.py``: prefetched loads, spills after the layer's compute, off the compute thread);
outside one (the prefix cache attaching or reading blocks between sweeps) the store's own
synchronous I/O. The handle keeps the blocks it committed in the current sweep (``fresh``) in
memory until the spill stage takes them, so attention over a sweep's own new tokens never
reads them back from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from tierflow.adapters.kv import AttentionKV, KVBlock, KVBlocks, first_visible
from tierflow.tiers.kv.blocks import BlockRef

__all__ = ["AttentionKV", "BlockIO", "KVBlock", "KVBlocks", "KVHandle", "OffDevice", "first_visible", "keep_path"]


@dataclass(frozen=True, slots=True)
class OffDevice:
    """A committed block of one layer that is not in device memory."""

    index: int                  # its index in the layer's block table
    ref: BlockRef               # its tier ("host" or "disk") and slot


class BlockIO(Protocol):
    """How a paged handle moves blocks (the kv stages in a sweep, the store's own I/O outside)."""

    def commit(self, seq_id: int, layer: int, ref: BlockRef, block: torch.Tensor) -> torch.Tensor | None:
        """A new full block bound for the host or disk tier (``block``'s memory is reused by the
        handle afterwards): write it now and return None, or copy it into a buffer of the spill
        stage's and return that, which the handle keeps as fresh (attention reads it) until the
        stage has written it, after the layer's compute."""
        ...

    def load(self, seq_id: int, layer: int, index: int, ref: BlockRef) -> torch.Tensor:
        """Committed block ``index`` of (seq_id, layer), held at ``ref`` off the device, on the device."""
        ...

    def together(self, seq_id: int, layer: int, index: int, count: int) -> int:
        """Of the ``count`` committed blocks of (seq_id, layer) from ``index`` on, held in
        consecutive slots of one tier off the device, how many (at least 1) ``load`` hands out
        at once: each stays valid while the next ones are loaded."""
        ...

    def first_planned(self, seq_id: int, layer: int) -> int | None:
        """The first block index of (seq_id, layer) this I/O may still load (a read planned, maybe
        under way, in the current sweep), None if none: a sliding-window ring keeps it held."""
        ...


class KVHandle(AttentionKV, Protocol):
    """One sequence's KV cache, whatever stores it."""

    seq_id: int                         # the engine's id of the sequence (-1: a store that needs none)
    num_layers: int

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV is stored in every layer."""
        ...

    def off_device(self, layer: int, first_position: int = 0) -> tuple[OffDevice, ...]:
        """The committed blocks ``blocks(layer, first_position)`` would take from off the device,
        in order (what the kv_load stage prefetches); () for a store that keeps all on the device."""
        ...

    def read(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of tokens start..end-1 of ``layer``: [2, kv_heads, end - start, head_dim]
        (ValueError for tokens before ``held_from(layer)``)."""
        ...

    def held_from(self, layer: int) -> int:
        """The first token position of ``layer`` whose KV is still held (0 unless a sliding window's
        ring released the blocks before it)."""
        ...

    def trim_rings(self, first_query: int) -> None:
        """Between sweeps: release what each layer's next append, from ``first_query``, would."""
        ...

    def truncate(self, num_tokens: int) -> None:
        """Between sweeps: forget the KV of every token from ``num_tokens`` on (speculative
        tokens the model rejected), giving back what held only them."""
        ...

    def gather(self, layer: int, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Between sweeps: copies of the keys and values [len(positions), kv_heads, head_dim] of
        ``layer`` at ``positions`` (held ones, increasing), from whichever tier holds them."""
        ...

    def free(self) -> None: ...


def keep_path(kv: KVHandle, start: int, offsets: Sequence[int]) -> None:
    """Between sweeps: of the tokens from ``start`` on, keep those at ``offsets`` (increasing
    offsets from ``start``: a candidate tree's accepted path) moved down to ``start``,
    ``start + 1``, ..., and forget the rest in every layer. Offsets 0, 1, 2, ... (a chain, or a
    tree's first branch) are a plain ``truncate``; otherwise the kept tokens' KV is read from
    wherever its blocks are, the handle cut back to ``start`` and the KV appended again."""
    if any(b <= a for a, b in zip(offsets, offsets[1:])) or (offsets and offsets[0] < 0):
        raise ValueError(f"the offsets to keep must increase from 0 or more, got {list(offsets)}")
    if list(offsets) == list(range(len(offsets))):
        kv.truncate(start + len(offsets))
        return
    positions = [start + o for o in offsets]
    kept = [kv.gather(layer, positions) for layer in range(kv.num_layers)]
    kv.truncate(start)
    for layer, (keys, values) in enumerate(kept):
        kv.append(layer, keys, values)
