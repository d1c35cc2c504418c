"""The request batcher: which tokens of which sequences go into the next sweep, and which
sequences give their KV back when it runs out.

Pure bookkeeping (no torch, no I/O, no await), in the manner of nano-vllm's scheduler:
the engine's driver is ``plan = batcher.schedule(); result = await sweep.run(plan);
batcher.postprocess(plan, tokens)``, and ``postprocess`` says which sequences a new token
ended: a stop or end-of-sequence token (reason "stop"), or the most tokens the sequence may
reach (``max_tokens``: its ``max_new_tokens`` or the context window, reason "length"). Stop
*strings* need the text, so the engine's detokenizer finds those. A sequence is a count of known tokens (prompt and
generated) and a count of computed ones (their KV exists); a sweep computes the next run
of uncomputed tokens of every running sequence, decode tokens first, then prefill chunks,
under a per-sweep token budget, so a long prompt never stalls everyone's decoding.

KV is counted in pool blocks, through a ``KVAccounting`` (the paged store's
``tiers.kv.layout.KVLayout``: how many blocks a sequence holds, sliding-window rings
included). Two allocation schemes:

- ``"on_demand"`` (the default): a sequence holds the blocks of the tokens it has computed.
  Admission is first-in first-out, up to ``max_num_seqs`` running sequences, while the
  running sequences' known tokens, the newcomer's and a watermark fit. Each sweep checks,
  oldest sequence first, that the blocks its tokens add fit what is free; a prefill chunk
  that does not fit is shortened, and when even that fails the most recently arrived running
  sequence is *preempted*: it drops its KV (``SweepPlan.preempted``: the driver frees it
  before the sweep runs) and goes back to the waiting queue with every token it knows, to be
  recomputed when it is admitted again. The oldest sequence is never preempted for a newer
  one, so everyone finishes.
- ``"reserve"``: a sequence reserves the blocks of every token it may reach when it is
  admitted and keeps them until it is removed; nothing is ever preempted.

Either way a sequence that could never fit the whole cache alone is refused by ``add``.

Speculative decoding: ``schedule(drafts=...)`` takes, per decoding sequence, how many proposed
tokens the caller has for it; such a sequence's last known token and up to that many proposals
(out of what every other decode token and prefill chunk left of the sweep's budget and the free
blocks — a proposal never preempts or delays anything — and one short of its most tokens, so the
bonus token stays within it) are scheduled as one chunk (``ScheduledSeq.num_draft``), its KV counted
like a prefill chunk's. ``postprocess`` then takes the tokens verification kept (the accepted
proposals and the model's own token), ends the sequence at the first stop or at its most, and
counts as computed the KV of the last known token and the accepted proposals only: the caller
rolls back the rest of the chunk's KV.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from tierflow.errors import KVCapacityError

ON_DEMAND, RESERVE = "on_demand", "reserve"
ALLOCATIONS = (ON_DEMAND, RESERVE)


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
class _Seq:
    seq_id: int
    arrival: int             # order of ``add``: the older, the later it is preempted
    num_tokens: int          # tokens known: prompt + generated so far
    max_tokens: int          # the most it may reach
    reserve: int             # "reserve": blocks held from admission to removal (0 when on demand)
    stop_token_ids: frozenset[int] = frozenset()   # a sampled token in here ends the sequence ("stop")
    num_computed: int = 0    # tokens whose KV exists
    held: int = 0            # "on_demand": blocks its KV holds now (during a sweep: its peak in it)
    kv_span: tuple[int, int] = (0, 0)   # (earliest query, end) of the KV it holds: what ``held`` counts


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


class Batcher:
    def __init__(self, *, max_num_seqs: int, max_sweep_tokens: int, kv: KVAccounting | None = None,
                 kv_capacity_blocks: int | None = None, allocation: str = ON_DEMAND,
                 watermark_blocks: int = 0) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if (kv is None) != (kv_capacity_blocks is None):
            raise ValueError("a KV capacity needs its accounting and the other way round")
        self.max_num_seqs, self.max_sweep_tokens = max_num_seqs, max_sweep_tokens
        self.kv, self.kv_capacity_blocks, self.allocation = kv, kv_capacity_blocks, allocation
        self.watermark_blocks = watermark_blocks
        self._running: dict[int, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._arrivals = 0
        self._sweeps = self._preemptions = self._preempted_tokens = 0

    def statistics(self) -> BatcherStats:
        return BatcherStats(len(self._running), len(self._waiting), self._sweeps, self._held(),
                            self.kv_capacity_blocks, self.allocation, self._preemptions, self._preempted_tokens)

    # -- what a sequence needs ---------------------------------------------------------------

    def cap_blocks(self, max_tokens: int) -> int:
        """The most blocks one sequence of up to ``max_tokens`` tokens ever holds (0: unbounded)."""
        return self.kv.cap_blocks(max_tokens, self.max_sweep_tokens) if self.kv is not None else 0

    def _known_blocks(self, seq: _Seq) -> int:
        """The blocks of every token ``seq`` knows, as its store allocates them."""
        assert self.kv is not None
        return min(self.kv.most_blocks(seq.num_tokens, self.max_sweep_tokens), self.cap_blocks(seq.max_tokens))

    def _held(self) -> int:
        return sum(s.reserve if self.allocation == RESERVE else s.held for s in self._running.values())

    def _demand(self, seq: _Seq) -> int:
        """What admission counts a sequence for: its reservation, or the blocks of its known tokens."""
        if self.allocation == RESERVE:
            return seq.reserve
        return max(seq.held, self._known_blocks(seq)) if self.kv is not None else 0

    def _fits(self, seq: _Seq) -> bool:
        if self.kv_capacity_blocks is None:
            return True
        others = sum(self._demand(s) for s in self._running.values())
        watermark = self.watermark_blocks if self._running and self.allocation == ON_DEMAND else 0
        return others + self._demand(seq) + watermark <= self.kv_capacity_blocks

    # -- requests ----------------------------------------------------------------------------

    def add(self, seq_id: int, num_prompt_tokens: int, max_tokens: int | None = None, *,
            stop_token_ids: frozenset[int] = frozenset()) -> None:
        """Queue a sequence of ``num_prompt_tokens`` that may grow to ``max_tokens`` (default:
        the prompt alone) and ends at any of ``stop_token_ids``. Raises KVCapacityError if it
        could never fit the KV cache alone."""
        if num_prompt_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token")
        most = max(num_prompt_tokens, max_tokens or 0)
        need = self.cap_blocks(most)
        if self.kv_capacity_blocks is not None and need > self.kv_capacity_blocks:
            raise KVCapacityError(f"the sequence needs up to {need} KV blocks but the KV cache holds "
                                  f"{self.kv_capacity_blocks}")
        reserve = need if self.allocation == RESERVE else 0
        self._waiting.append(_Seq(seq_id, self._arrivals, num_prompt_tokens, most, reserve, frozenset(stop_token_ids)))
        self._arrivals += 1

    def remove(self, seq_id: int) -> None:
        """Forget a finished or cancelled sequence (called between sweeps)."""
        if self._running.pop(seq_id, None) is None:
            self._waiting = deque(s for s in self._waiting if s.seq_id != seq_id)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def admit(self) -> list[int]:
        """Move waiting sequences to running while they fit, first-come first-served; return
        the ones admitted now. ``schedule`` admits too: a caller that must prepare a sequence
        before its first sweep (a prefix-cache hit) calls this first."""
        admitted = []
        while self._waiting and len(self._running) < self.max_num_seqs and self._fits(self._waiting[0]):
            seq = self._waiting.popleft()
            self._running[seq.seq_id] = seq
            admitted.append(seq.seq_id)
        return admitted

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """The KV of a running sequence's first ``num_tokens`` tokens exists already (reused
        from the prefix cache): its prefill starts after them. At least one known token is
        left to compute, since its logits are what the next token is sampled from."""
        seq = self._running[seq_id]
        if not 0 <= num_tokens < seq.num_tokens:
            raise ValueError(f"sequence {seq_id} has {seq.num_tokens} tokens; {num_tokens} cannot be marked "
                             "computed (at least one must be left to compute)")
        if num_tokens > seq.num_computed:
            seq.num_computed, seq.kv_span = num_tokens, (0, num_tokens)   # every block of them, at most
            seq.held = self._blocks(seq) if self.kv is not None else 0

    # -- sweeps ------------------------------------------------------------------------------

    def schedule(self, drafts: Mapping[int, int] | None = None) -> SweepPlan | None:
        """The next sweep (None: nothing to do until a sequence arrives). ``drafts``: sequence id →
        proposed tokens available to verify after its last known token (decoding sequences only)."""
        self.admit()
        order = sorted(self._running.values(), key=lambda s: s.arrival)
        work: dict[int, int] = {}
        budget = self.max_sweep_tokens
        decoding = [s for s in order if s.num_tokens - s.num_computed == 1]
        for seq in decoding + [s for s in order if s.num_tokens - s.num_computed > 1]:
            if budget < 1:
                break
            work[seq.seq_id] = min(seq.num_tokens - seq.num_computed, budget)
            budget -= work[seq.seq_id]
        preempted: list[int] = []
        fitting = self.allocation == ON_DEMAND and self.kv_capacity_blocks is not None
        if fitting:
            self._fit_growth(order, work, preempted)
        if drafts:      # proposals last: out of the budget and the blocks every other token left
            self._add_drafts([s for s in decoding if s.seq_id in work and s.seq_id in self._running], drafts, work,
                             self.max_sweep_tokens - sum(work.values()), fitting)
        chosen = [ScheduledSeq(s.seq_id, s.num_computed, work[s.seq_id],
                               s.num_computed + work[s.seq_id] >= s.num_tokens,
                               max(0, s.num_computed + work[s.seq_id] - s.num_tokens))
                  for s in sorted((self._running[i] for i in work), key=lambda s: (s.num_tokens - s.num_computed > 1,
                                                                                     s.arrival))]
        if not chosen and not preempted:
            return None
        self._sweeps += bool(chosen)
        return SweepPlan(tuple(chosen), sum(s.num_tokens for s in chosen), tuple(preempted))

    def is_decoding(self, seq_id: int) -> bool:
        """Running, with its prompt computed: its next sweep computes one known token (and may
        verify proposals after it)."""
        seq = self._running.get(seq_id)
        return seq is not None and seq.num_tokens - seq.num_computed == 1

    def _add_drafts(self, decoding: list[_Seq], drafts: Mapping[int, int], work: dict[int, int],
                    budget: int, fitting: bool) -> None:
        """Extend decoding sequences' one token by their proposals, oldest first, within
        ``budget`` and (``fitting``: on-demand blocks) the free blocks, never preempting or
        shortening anything for a proposal; a sequence proposes at most one short of its most
        tokens (the bonus token must fit)."""
        free = self.kv_capacity_blocks - self._held() if fitting and self.kv_capacity_blocks is not None else 0
        for seq in decoding:
            if budget < 1:
                break
            extra = min(drafts.get(seq.seq_id, 0), seq.max_tokens - seq.num_tokens - 1, budget)
            if fitting:
                while extra > 0 and self._step(seq, 1 + extra) - seq.held > free:
                    extra -= 1
                grown = self._step(seq, 1 + extra) - seq.held if extra > 0 else 0
                free -= grown
                seq.held += grown
            if extra > 0:
                work[seq.seq_id] += extra
                budget -= extra

    def _step(self, seq: _Seq, n: int) -> int:
        """Blocks ``seq`` holds at most while a sweep computes its next ``n`` tokens (never more
        than its most: a store caps what it allocates there)."""
        assert self.kv is not None
        step = self.kv.blocks_step(seq.kv_span, (seq.num_computed, seq.num_computed + n))
        return min(step, self.cap_blocks(seq.max_tokens))

    def _blocks(self, seq: _Seq) -> int:
        """Blocks ``seq`` holds between sweeps (``kv_span``), at most its most."""
        assert self.kv is not None
        return min(self.kv.blocks(*seq.kv_span), self.cap_blocks(seq.max_tokens))

    def _fit_growth(self, order: list[_Seq], work: dict[int, int], preempted: list[int]) -> None:
        """Oldest first, give each scheduled sequence the blocks its tokens add: shorten a
        prefill chunk that does not fit, else preempt the newest running sequence."""
        assert self.kv_capacity_blocks is not None
        free = self.kv_capacity_blocks - self._held()
        for seq in order:
            while seq.seq_id in work and seq.seq_id in self._running:
                n = work[seq.seq_id]
                extra = self._step(seq, n) - seq.held
                if extra > free and n > 1:          # a shorter chunk of the prefill may fit
                    lo, hi = 0, n                   # _step(lo) fits (lo = 0: nothing), _step(hi) does not
                    while lo < hi - 1:
                        mid = (lo + hi) // 2
                        lo, hi = (mid, hi) if self._step(seq, mid) - seq.held <= free else (lo, mid)
                    if lo:
                        work[seq.seq_id] = n = lo
                        extra = self._step(seq, n) - seq.held
                if extra <= free:
                    free -= extra
                    seq.held += extra
                    break
                victim = max((s for s in order if s.seq_id in self._running and s is not seq
                              and s.arrival > seq.arrival), key=lambda s: s.arrival, default=seq)
                free += victim.held
                self._preempt(victim)
                work.pop(victim.seq_id, None)
                preempted.append(victim.seq_id)

    def _preempt(self, seq: _Seq) -> None:
        del self._running[seq.seq_id]
        self._preemptions += 1
        self._preempted_tokens += seq.num_computed
        seq.num_computed, seq.held, seq.kv_span = 0, 0, (0, 0)
        self._waiting = deque(sorted((*self._waiting, seq), key=lambda s: s.arrival))

    def postprocess(self, plan: SweepPlan, tokens: Sequence[int | Sequence[int] | None]) -> list[TokenOutcome]:
        """Record a finished sweep: ``tokens[i]`` is the token sampled for ``plan.seqs[i]`` (None
        when nothing was sampled, or the sequence was cancelled while the sweep ran), or for a
        chunk with proposals the tokens verification kept (accepted proposals, then the model's
        own). Returns what each new token did, in order, none past one that ends its sequence; a
        finished sequence stays until ``remove``."""
        outcomes = []
        for item, token in zip(plan.seqs, tokens, strict=True):
            seq = self._running.get(item.seq_id)
            if seq is None:          # removed while the sweep ran
                continue
            kept = () if token is None else (token,) if isinstance(token, int) else tuple(token)
            if len(kept) > item.num_draft + 1:
                raise ValueError(f"sequence {item.seq_id} verified {item.num_draft} proposals, so at most "
                                 f"{item.num_draft + 1} tokens can follow, got {len(kept)}")
            # the KV of the last known token and of the proposals accepted (all but the last token kept)
            seq.num_computed = item.known_end + max(0, len(kept) - 1)
            seq.kv_span = (item.start, seq.num_computed)
            if self.kv is not None:
                seq.held = self._blocks(seq)
            for new in kept:
                seq.num_tokens += 1
                reason = "stop" if new in seq.stop_token_ids else "length" if seq.num_tokens >= seq.max_tokens \
                    else None
                outcomes.append(TokenOutcome(item.seq_id, new, reason))
                if reason is not None:
                    break
        return outcomes
