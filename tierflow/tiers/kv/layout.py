"""How many pool blocks a sequence's KV holds: the arithmetic the batcher admits, grows and
preempts by, and the paged store's rings release by. Pure (no torch, no I/O).

A layer's committed blocks are its whole ``block_tokens`` blocks (the partly filled last one
is the sequence's tail buffer, outside the pools). A full-attention layer keeps all of them.
A sliding-window layer keeps a ring: before a sweep whose earliest query is at position ``q``
appends, every block wholly before ``q - window + 1`` (the first key that query sees, and so
any later one) goes back to its pool. So a layer holding keys up to ``end`` (exclusive) whose
next query is at ``q`` holds ``end // bt - max(0, q - window + 1) // bt`` blocks. A window of 0 is
a linear-attention layer (Qwen3-Next's Gated DeltaNet): it keeps no keys, only a fixed-size state
per sequence, which the paged store keeps in ``state_blocks`` pool blocks from the sequence's
first token on, whatever its length (``tiers/kv/sequence.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KVLayout:
    block_tokens: int
    windows: tuple[int | None, ...]              # per layer: its sliding window, None for full attention
    state_blocks: int = 0                        # blocks one linear-attention layer's (window 0) state takes
    _groups: tuple[tuple[int | None, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or not self.windows:
            raise ValueError(f"a KV layout needs block_tokens >= 1 and at least one layer, got {self.block_tokens}, "
                             f"{len(self.windows)} layers")
        object.__setattr__(self, "_groups", tuple(sorted(Counter(self.windows).items(), key=lambda kv: kv[0] or 0)))

    @classmethod
    def full(cls, num_layers: int, block_tokens: int) -> KVLayout:
        """Every layer sees every key."""
        return cls(block_tokens, (None,) * num_layers)

    @property
    def num_layers(self) -> int:
        return len(self.windows)

    def keeps_state(self, layer: int) -> bool:
        """Whether ``layer`` is a linear-attention layer (window 0): its blocks hold its state."""
        return self.windows[layer] == 0

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.windows)

    def first_kept_block(self, window: int | None, first_query: int) -> int:
        """The earliest block a layer with ``window`` keeps while its earliest query is at ``first_query``."""
        return 0 if window is None else max(0, first_query - window + 1) // self.block_tokens

    def layer_blocks(self, window: int | None, first_query: int, end: int) -> int:
        """Pool blocks one layer holds with keys up to ``end`` and its earliest query at ``first_query``
        (a window of 0, a linear-attention layer, keeps no keys: its state's blocks once it has a token)."""
        if window == 0:
            return self.state_blocks if end > 0 else 0
        return max(0, end // self.block_tokens - self.first_kept_block(window, first_query))

    def blocks(self, first_query: int, end: int) -> int:
        """Pool blocks over every layer: keys up to ``end``, the earliest query at ``first_query``."""
        return sum(count * self.layer_blocks(w, first_query, end) for w, count in self._groups)

    def blocks_step(self, before: tuple[int, int], after: tuple[int, int]) -> int:
        """The most pool blocks held while a sweep takes a sequence from ``before`` to ``after``
        (each a (first query, end) pair): each layer releases its ring, then commits."""
        return sum(count * max(self.layer_blocks(w, *before), self.layer_blocks(w, *after))
                   for w, count in self._groups)

    def most_blocks(self, max_tokens: int, chunk_tokens: int) -> int:
        """The most pool blocks a sequence of up to ``max_tokens`` tokens, computed at most
        ``chunk_tokens`` per sweep, ever holds (a ring's peak is during a prefill chunk)."""
        full = max_tokens // self.block_tokens
        return sum(count * (full if w is None else (self.state_blocks if max_tokens > 0 else 0) if w == 0 else
                            min(full, (chunk_tokens + w - 1) // self.block_tokens + 1))
                   for w, count in self._groups)

    def cap_blocks(self, max_tokens: int, chunk_tokens: int) -> int:
        """The most blocks a sequence that may reach ``max_tokens`` ever holds (``most_blocks``)."""
        return self.most_blocks(max_tokens, chunk_tokens)

    def tokens_within(self, blocks: int, chunk_tokens: int) -> int:
        """The most tokens one sequence may reach with ``blocks`` pool blocks to itself (the
        inverse of ``most_blocks``; a sequence of only sliding-window layers is bounded by
        nothing but the context window, reported as 2**62)."""
        if self.most_blocks(2**62, chunk_tokens) <= blocks:
            return 2**62
        lo, hi = 0, 2**62                    # most_blocks(lo) <= blocks < most_blocks(hi)
        while lo < hi - 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.most_blocks(mid, chunk_tokens) <= blocks else (lo, mid)
        return lo


CONTIGUOUS_STEP = 16            # tokens: a contiguous layer grows in whole steps of this


def contiguous_tokens(end: int, step: int = CONTIGUOUS_STEP) -> int:
    """Tokens a contiguous KV layer (``contiguous.SequenceKV``) allocates to hold ``end``: one
    ``step``, then a quarter more at a time, in whole steps (a pure function of ``end``, so the
    batcher can count it)."""
    capacity = step if end > 0 else 0
    while capacity < end:
        capacity = -(-(capacity * 5 // 4) // step) * step
    return capacity


@dataclass(frozen=True, slots=True)
class ContiguousLayout:
    """The batcher's count for the contiguous in-memory cache, in token-layers: every layer of a
    sequence that keeps keys (``num_layers`` of them: a linear-attention layer keeps a fixed-size
    state instead) allocates ``contiguous_tokens`` of its keys and values, and from its first
    token a sequence holds its linear layers' states, ``state`` token-layers' worth of bytes."""
    num_layers: int
    step: int = CONTIGUOUS_STEP
    state: int = 0

    def blocks(self, first_query: int, end: int) -> int:
        return self.num_layers * contiguous_tokens(end, self.step) + (self.state if end > 0 else 0)

    def blocks_step(self, before: tuple[int, int], after: tuple[int, int]) -> int:
        return max(self.blocks(*before), self.blocks(*after))

    def most_blocks(self, tokens: int, chunk_tokens: int) -> int:
        """What a sequence of ``tokens`` has allocated (before any cap)."""
        return self.blocks(0, tokens)

    def cap_blocks(self, max_tokens: int, chunk_tokens: int) -> int:
        """The most a sequence that may reach ``max_tokens`` ever allocates: its layers stop there."""
        return self.num_layers * max_tokens + (self.state if max_tokens > 0 else 0)

    def tokens_within(self, blocks: int, chunk_tokens: int) -> int:
        """The most tokens one sequence may reach in ``blocks`` token-layers (a model of linear
        layers only is bounded by nothing but the context window, reported as 2**62)."""
        if not self.num_layers:
            return 2**62 if blocks >= self.state else 0
        return max(0, blocks - self.state) // self.num_layers
