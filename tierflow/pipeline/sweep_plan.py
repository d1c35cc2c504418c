"""What the batcher hands to the rest of the engine: the plan of one sweep (``SweepPlan`` of
``ScheduledSeq``), what each sampled token did (``TokenOutcome``) and the batcher's statistics
(``BatcherStats``).

Frozen records only, pure like ``pipeline.batcher`` that makes them; apart from it so the driver
and the metrics read a plan without the bookkeeping behind it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq_id: int
    start: int               # position of the first token computed in this sweep
    num_tokens: int          # how many tokens of this sequence the sweep computes
    sample: bool             # True when the sweep reaches the last known token (its logits are wanted)
    num_draft: int = 0       # of num_tokens, proposed tokens after the last known one (speculative decoding)

    @property
    def known_end(self) -> int:
        """The position after the last known token the sweep computes (its proposals follow it)."""
        return self.start + self.num_tokens - self.num_draft


@dataclass(frozen=True, slots=True)
class SweepPlan:
    seqs: tuple[ScheduledSeq, ...]   # in batch order: decode tokens first, then prefill chunks
    num_tokens: int                  # total tokens of the sweep (<= max_sweep_tokens, or one chunk)
    preempted: tuple[int, ...] = ()  # sequences whose KV must be dropped before the sweep runs


@dataclass(frozen=True, slots=True)
class TokenOutcome:
    """What ``postprocess`` made of one sampled token."""
    seq_id: int
    token: int
    finish_reason: str | None    # "stop": a stop token (not part of the text); "length": the sequence
                                 # reached its most tokens; None: it goes on


@dataclass(frozen=True, slots=True)
class BatcherStats:
    num_running: int             # admitted sequences
    num_waiting: int             # queued, not yet admitted (preempted ones included)
    sweeps: int                  # sweeps scheduled so far
    kv_held_blocks: int          # KV blocks the running sequences hold ("reserve": have reserved)
    kv_capacity_blocks: int | None   # all sequences together (None: unbounded)
    allocation: str              # "on_demand" | "reserve"
    preemptions: int = 0         # sequences preempted so far
    preempted_tokens: int = 0    # computed tokens whose KV preemption dropped (to be computed again)
