"""What attention sees of a sequence's KV cache: ``KVBlocks`` and the ``AttentionKV`` protocol.

Both KV stores (``tiers/kv/contiguous.py`` and ``tiers/kv/paged.py``) hand attention the same
shape: ``KVBlocks``, a sequence of ``KVBlock`` views (keys [KVH, t, D], values, the position of
the first key), in position order. The contiguous store gives a single block from position 0;
the paged store one block per committed block from the first a sliding window still sees, then
its partly filled tail. Attention picks its kernel from that shape alone (one block from 0: the
fused SDPA call; else the online softmax), never from the type of the store.

``KVBlocks`` is lazy: ``spans`` — (first position, tokens) of every block — is known before any
byte moves, so attention validates coverage on the host and skips blocks outside a window
without touching them; a block's tensors are fetched only when iteration reaches it (a paged
block off the device then comes from the kv_load stage, which has been reading it ahead).
``together`` says how many blocks may be fetched at once and held (a kv_load run, consecutive
pool slots), so attention can merge a run of them in one step (``block_runs.py``).

A linear-attention layer (Gated DeltaNet) keeps no KV: its whole memory of a sequence is a
fixed-size state the handle holds (``state`` / ``set_state``), read and replaced once per sweep
(the paged store keeps it in pool blocks of any tier: ``tiers/kv/state.py``).

The full handle protocol, with what the sweep and the engine use besides, is
``tiers.kv.handle.KVHandle``; it lives below the stores, and this part here because adapters
sit below tiers (tests/layering.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch

from tierflow.errors import RequestError


class KVBlock(NamedTuple):
    keys: torch.Tensor          # [kv_heads, tokens, head_dim]
    values: torch.Tensor        # [kv_heads, tokens, head_dim]
    first: int                  # position of the block's first key


@dataclass(frozen=True, slots=True)
class KVBlocks:
    """A layer's KV as blocks, in position order, fetched when iterated."""

    spans: tuple[tuple[int, int], ...]              # (first position, tokens) of each block
    fetch: Callable[[int], KVBlock]                 # the i-th block (may wait for its load to land)
    # together(i, most): how many blocks from the i-th on (1..most) may be fetched before any of
    # them is used, each staying valid while the others are fetched (None: one at a time)
    together: Callable[[int, int], int] | None = None

    @staticmethod
    def of(blocks: Sequence[KVBlock], together: Callable[[int, int], int] | None = None) -> "KVBlocks":
        """Blocks already at hand (merged one at a time unless ``together`` says otherwise)."""
        held = tuple(blocks)
        return KVBlocks(tuple((b.first, b.keys.shape[1]) for b in held), held.__getitem__, together)

    def __len__(self) -> int:
        return len(self.spans)

    def __iter__(self) -> Iterator[KVBlock]:
        return (self.fetch(i) for i in range(len(self.spans)))


class AttentionKV(Protocol):
    """What attention uses of one sequence's KV handle."""

    failure: BaseException | None       # set by ``fail``: why this sequence's KV is unusable

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k`` / ``v`` [n, kv_heads, head_dim] after the layer's stored tokens."""
        ...

    def blocks(self, layer: int, first_position: int = 0) -> KVBlocks:
        """The layer's KV from the block holding ``first_position`` (what a sliding window still
        sees) to its last stored token."""
        ...

    def fail(self, error: BaseException) -> None:
        """This sequence's KV failed (a spill fault): the rest of the sweep skips it, and the sweep
        reports ``error`` for it alone."""
        ...

    def state(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """A linear-attention layer's recurrent state (fixed size, whatever the context), None
        before its first token."""
        ...

    def set_state(self, layer: int, state: tuple[torch.Tensor, ...], tokens: int) -> None:
        """The layer's state after ``tokens`` more tokens, which count as stored in it (a linear
        layer stores no keys or values)."""
        ...


@dataclass(frozen=True, slots=True)
class HeldState:
    """A linear-attention layer's state as a store holds it: its tensors, and the layer length
    (tokens) they are the state after."""

    tensors: tuple[torch.Tensor, ...]
    tokens: int

    def at(self, layer: int, length: int) -> tuple[torch.Tensor, ...]:
        """The tensors, if the layer still holds ``tokens`` tokens: a state cannot be rolled back
        (``truncate``), so one after more tokens than the layer now holds is refused."""
        if length != self.tokens:
            raise RequestError(f"the linear-attention state of layer {layer} is the state after {self.tokens} tokens, "
                               f"but the sequence now holds {length}: a Gated DeltaNet state cannot be rolled back "
                               "(speculative decoding and KV truncation do not work for this model); run it without")
        return self.tensors


def first_visible(start: int, window: int | None) -> int:
    """The earliest position any query from ``start`` on sees under a sliding ``window``."""
    return 0 if window is None else max(0, start - window + 1)
