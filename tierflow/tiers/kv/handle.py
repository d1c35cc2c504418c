"""The one KV handle protocol the sweep, the adapters and the prefix stage see.

Both stores — the contiguous one (``contiguous.SequenceKV``) and the paged one
(``paged.PagedSequenceKV``) — implement ``KVHandle``, and both hand attention the same shape:
``KVBlocks``, a sequence of ``KVBlock`` views (keys [KVH, t, D], values, the position of the
first key), in position order. The contiguous store gives a single block from position 0; the
paged store one block per committed block from the first a sliding window still sees, then its
partly filled tail. Attention picks its kernel from that shape alone (one block from 0: the
fused SDPA call; else the online softmax), never from the type of the store.

``KVBlocks`` is lazy: ``spans`` — (first position, tokens) of every block — is known before any
byte moves, so attention validates coverage on the host and skips blocks outside a window
without touching them; a block's tensors are fetched only when iteration reaches it. A paged
block still on disk (or, on CUDA, in host memory) comes from the kv_load stage then, which has
been reading it ahead since the sweep began.

``BlockIO`` is what a paged store's handles use to move blocks: during a sweep the kv stages
(``stages/kv.py``: prefetched loads, spills after the layer's compute, off the compute thread);
outside one (the prefix cache attaching or reading blocks between sweeps) the store's own
synchronous I/O. The handle keeps the blocks it committed in the current sweep (``fresh``) in
memory until the spill stage takes them, so attention over a sweep's own new tokens never
reads them back from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch

from tierflow.tiers.kv.blocks import BlockRef


class KVBlock(NamedTuple):
    keys: torch.Tensor          # [kv_heads, tokens, head_dim]
    values: torch.Tensor        # [kv_heads, tokens, head_dim]
    first: int                  # position of the block's first key


@dataclass(frozen=True, slots=True)
class KVBlocks:
    """A layer's KV as blocks, in position order, fetched when iterated."""

    spans: tuple[tuple[int, int], ...]              # (first position, tokens) of each block
    fetch: Callable[[int], KVBlock]                 # the i-th block (may wait for its load to land)

    @staticmethod
    def of(blocks: Sequence[KVBlock]) -> "KVBlocks":
        """Blocks already at hand."""
        held = tuple(blocks)
        return KVBlocks(tuple((b.first, b.keys.shape[1]) for b in held), held.__getitem__)

    def __len__(self) -> int:
        return len(self.spans)

    def __iter__(self) -> Iterator[KVBlock]:
        return (self.fetch(i) for i in range(len(self.spans)))


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


class KVHandle(Protocol):
    """One sequence's KV cache, whatever stores it."""

    seq_id: int                         # the engine's id of the sequence (-1: a store that needs none)
    num_layers: int
    failure: BaseException | None       # set by ``fail``: why this sequence's KV is unusable

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV is stored in every layer."""
        ...

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k`` / ``v`` [n, kv_heads, head_dim] after the layer's stored tokens."""
        ...

    def blocks(self, layer: int, first_position: int = 0) -> KVBlocks:
        """The layer's KV from the block holding ``first_position`` (what a sliding window still
        sees) to its last stored token."""
        ...

    def off_device(self, layer: int, first_position: int = 0) -> tuple[OffDevice, ...]:
        """The committed blocks ``blocks(layer, first_position)`` would take from off the device,
        in order (what the kv_load stage prefetches); () for a store that keeps all on the device."""
        ...

    def fail(self, error: BaseException) -> None:
        """This sequence's KV failed (a spill fault): the rest of the sweep skips it, and the sweep
        reports ``error`` for it alone."""
        ...

    def read(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of tokens start..end-1 of ``layer``: [2, kv_heads, end - start, head_dim]."""
        ...

    def free(self) -> None: ...


def first_visible(start: int, window: int | None) -> int:
    """The earliest position any query from ``start`` on sees under a sliding ``window``."""
    return 0 if window is None else max(0, start - window + 1)
