"""The batcher's KV blocks: what it asks of a KV layout (``KVAccounting``), its record of one
sequence (``SeqState``: tokens known and computed, blocks held), and the two passes that fit a
sweep into the free blocks when KV is taken on demand.

``fit_growth`` gives each scheduled sequence, oldest first, the blocks its tokens add: a
prefill chunk that does not fit is cut to the longest prefix that does (by bisection on the
layout's count), and when not even one token fits, the most recently arrived running sequence
younger than it is preempted (the sequence itself when none is younger), so the oldest one
always makes progress. ``add_drafts`` runs after it, on what is left: a proposal only ever
takes free blocks and budget, it never shortens or preempts anything.

Pure, like ``pipeline.batcher``: the batcher passes in its own block count per step and its
preemption, so the passes know nothing of its queues.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Container, Mapping, Protocol

StepBlocks = Callable[["SeqState", int], int]   # the most blocks a sequence holds while a sweep computes n tokens


class KVAccounting(Protocol):
    """Pool blocks a sequence holds (``tiers.kv.layout.KVLayout`` is one)."""

    def blocks(self, first_query: int, end: int) -> int:
        """Blocks held with keys up to ``end`` and the earliest query still to come at ``first_query``."""
        ...

    def blocks_step(self, before: tuple[int, int], after: tuple[int, int]) -> int:
        """The most blocks held while a sweep moves a sequence from ``before`` to ``after``."""
        ...

    def most_blocks(self, max_tokens: int, chunk_tokens: int) -> int:
        """The most blocks a sequence of up to ``max_tokens``, ``chunk_tokens`` a sweep, ever holds."""
        ...

    def cap_blocks(self, max_tokens: int, chunk_tokens: int) -> int:
        """The most blocks a sequence that may reach ``max_tokens`` holds, whatever its store's
        growth policy (a store never allocates past a sequence's most tokens)."""
        ...


@dataclass(slots=True)
class SeqState:
    """A sequence as the batcher tracks it, from ``add`` to ``remove``."""

    seq_id: int
    arrival: int             # order of ``add``: the older, the later it is preempted
    num_tokens: int          # tokens known: prompt + generated so far
    max_tokens: int          # the most it may reach
    reserve: int             # "reserve": blocks held from admission to removal (0 when on demand)
    stop_token_ids: frozenset[int] = frozenset()   # a sampled token in here ends the sequence ("stop")
    num_computed: int = 0    # tokens whose KV exists
    held: int = 0            # "on_demand": blocks its KV holds now (during a sweep: its peak in it)
    kv_span: tuple[int, int] = (0, 0)   # (earliest query, end) of the KV it holds: what ``held`` counts


def fit_growth(order: list[SeqState], work: dict[int, int], running: Container[int], free: int, step: StepBlocks,
               preempt: Callable[[SeqState], None]) -> list[int]:
    """Oldest first, give each scheduled sequence the blocks its tokens add: shorten a
    prefill chunk that does not fit, else preempt the newest running sequence. ``work``: sequence
    id → tokens this sweep computes (shortened or dropped here); ``free``: blocks free before the
    sweep; ``preempt`` takes a sequence out of ``running``. Returns the preempted sequences' ids."""
    preempted: list[int] = []
    for seq in order:
        while seq.seq_id in work and seq.seq_id in running:
            n = work[seq.seq_id]
            extra = step(seq, n) - seq.held
            if extra > free and n > 1:          # a shorter chunk of the prefill may fit
                lo, hi = 0, n                   # step(lo) fits (lo = 0: nothing), step(hi) does not
                while lo < hi - 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if step(seq, mid) - seq.held <= free else (lo, mid)
                if lo:
                    work[seq.seq_id] = n = lo
                    extra = step(seq, n) - seq.held
            if extra <= free:
                free -= extra
                seq.held += extra
                break
            victim = max((s for s in order if s.seq_id in running and s is not seq
                          and s.arrival > seq.arrival), key=lambda s: s.arrival, default=seq)
            free += victim.held
            preempt(victim)
            work.pop(victim.seq_id, None)
            preempted.append(victim.seq_id)
    return preempted


def add_drafts(decoding: list[SeqState], drafts: Mapping[int, int], work: dict[int, int], budget: int,
               free: int | None, step: StepBlocks) -> None:
    """Extend decoding sequences' one token by their proposals, oldest first, within
    ``budget`` and (``free`` not None: on-demand blocks) the free blocks, never preempting or
    shortening anything for a proposal; a sequence proposes at most one short of its most
    tokens (the bonus token must fit)."""
    for seq in decoding:
        if budget < 1:
            break
        extra = min(drafts.get(seq.seq_id, 0), seq.max_tokens - seq.num_tokens - 1, budget)
        if free is not None:
            while extra > 0 and step(seq, 1 + extra) - seq.held > free:
                extra -= 1
            grown = step(seq, 1 + extra) - seq.held if extra > 0 else 0
            free -= grown
            seq.held += grown
        if extra > 0:
            work[seq.seq_id] += extra
            budget -= extra
