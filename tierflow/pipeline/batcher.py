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
under a per-sweep token budget, so a long prompt never stalls everyone's decoding. The records
it hands off are ``pipeline.sweep_plan``'s.

KV is counted in pool blocks, through a ``KVAccounting`` (the paged store's
``tiers.kv.layout.KVLayout``: how many blocks a sequence holds, sliding-window rings
included). Two allocation schemes:

- ``"on_demand"`` (the default): a sequence holds the blocks of the tokens it has computed.
  Admission is first-in first-out, up to ``max_num_seqs`` running sequences, while the
  running sequences' known tokens, the newcomer's and a watermark fit. Each sweep checks
  (``pipeline.kv_fit``), oldest sequence first, that the blocks its tokens add fit what is free; a prefill chunk
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
from typing import Mapping, Sequence

from tierflow.errors import KVCapacityError
from tierflow.pipeline.kv_fit import KVAccounting, SeqState, add_drafts, fit_growth
from tierflow.pipeline.sweep_plan import BatcherStats, ScheduledSeq, SweepPlan, TokenOutcome

ON_DEMAND, RESERVE = "on_demand", "reserve"
ALLOCATIONS = (ON_DEMAND, RESERVE)

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
        self._running: dict[int, SeqState] = {}
        self._waiting: deque[SeqState] = deque()
        self._arrivals = 0
        self._sweeps = self._preemptions = self._preempted_tokens = 0

    def statistics(self) -> BatcherStats:
        return BatcherStats(len(self._running), len(self._waiting), self._sweeps, self._held(),
                            self.kv_capacity_blocks, self.allocation, self._preemptions, self._preempted_tokens)

    # -- what a sequence needs ---------------------------------------------------------------

    def cap_blocks(self, max_tokens: int) -> int:
        """The most blocks one sequence of up to ``max_tokens`` tokens ever holds (0: unbounded)."""
        return self.kv.cap_blocks(max_tokens, self.max_sweep_tokens) if self.kv is not None else 0

    def _known_blocks(self, seq: SeqState) -> int:
        """The blocks of every token ``seq`` knows, as its store allocates them."""
        assert self.kv is not None
        return min(self.kv.most_blocks(seq.num_tokens, self.max_sweep_tokens), self.cap_blocks(seq.max_tokens))

    def _held(self) -> int:
        return sum(s.reserve if self.allocation == RESERVE else s.held for s in self._running.values())

    def _demand(self, seq: SeqState) -> int:
        """What admission counts a sequence for: its reservation, or the blocks of its known tokens."""
        if self.allocation == RESERVE:
            return seq.reserve
        return max(seq.held, self._known_blocks(seq)) if self.kv is not None else 0

    def _fits(self, seq: SeqState) -> bool:
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
        self._waiting.append(SeqState(seq_id, self._arrivals, num_prompt_tokens, most, reserve,
                                      frozenset(stop_token_ids)))
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
        fitting = self.allocation == ON_DEMAND and self.kv_capacity_blocks is not None
        preempted = self._fit_growth(order, work) if fitting else []
        if drafts:      # proposals last: out of the budget and the blocks every other token left
            add_drafts([s for s in decoding if s.seq_id in work and s.seq_id in self._running], drafts, work,
                       self.max_sweep_tokens - sum(work.values()),
                       self.kv_capacity_blocks - self._held() if fitting and self.kv_capacity_blocks is not None
                       else None, self._step)
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

    def _step(self, seq: SeqState, n: int) -> int:
        """Blocks ``seq`` holds at most while a sweep computes its next ``n`` tokens (never more
        than its most: a store caps what it allocates there)."""
        assert self.kv is not None
        step = self.kv.blocks_step(seq.kv_span, (seq.num_computed, seq.num_computed + n))
        return min(step, self.cap_blocks(seq.max_tokens))

    def _blocks(self, seq: SeqState) -> int:
        """Blocks ``seq`` holds between sweeps (``kv_span``), at most its most."""
        assert self.kv is not None
        return min(self.kv.blocks(*seq.kv_span), self.cap_blocks(seq.max_tokens))

    def _fit_growth(self, order: list[SeqState], work: dict[int, int]) -> list[int]:
        """The on-demand pass of ``kv_fit.fit_growth`` over what is free now."""
        assert self.kv_capacity_blocks is not None
        return fit_growth(order, work, self._running, self.kv_capacity_blocks - self._held(), self._step,
                          self._preempt)

    def _preempt(self, seq: SeqState) -> None:
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
