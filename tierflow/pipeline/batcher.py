"""The request batcher: which tokens of which sequences go into the next sweep.

Pure bookkeeping (no torch, no I/O, no await), in the manner of nano-vllm's scheduler:
the engine's driver is ``plan = batcher.schedule(); result = await sweep.run(plan);
batcher.postprocess(plan, tokens)``, and ``postprocess`` says which sequences a new token
ended: a stop or end-of-sequence token (reason "stop"), or the most tokens the sequence may
reach (``max_tokens``: its ``max_new_tokens`` or the context window, reason "length"). Stop
*strings* need the text, so the engine's detokenizer finds those. A sequence is a count of known tokens (prompt and
generated) and a count of computed ones (their KV exists); a sweep computes the next run
of uncomputed tokens of every running sequence, decode tokens first, then prefill chunks,
under a per-sweep token budget, so a long prompt never stalls everyone's decoding.

Admission is first-in first-out, up to ``max_num_seqs`` running sequences and by KV
capacity: a sequence reserves the KV of every token it may reach (prompt plus its
``max_new_tokens``, within the context window) when it is admitted, and gives it back when
it is removed, so the KV cache never outgrows what the plan gave it. The head of the queue
waits until it fits and nobody overtakes it, so nobody starves. A sequence that could never
fit is refused by ``add``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

from tierflow.errors import KVCapacityError


@dataclass(slots=True)
class _Seq:
    seq_id: int
    num_tokens: int          # tokens known: prompt + generated so far
    reserved: int            # KV tokens held while running: the most it may reach
    stop_token_ids: frozenset[int] = frozenset()   # a sampled token in here ends the sequence ("stop")
    num_computed: int = 0    # tokens whose KV exists


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    seq_id: int
    start: int               # position of the first token computed in this sweep
    num_tokens: int          # how many tokens of this sequence the sweep computes
    sample: bool             # True when the sweep reaches the last known token (its logits are wanted)


@dataclass(frozen=True, slots=True)
class SweepPlan:
    seqs: tuple[ScheduledSeq, ...]   # in batch order: decode tokens first, then prefill chunks
    num_tokens: int                  # total tokens of the sweep (<= max_sweep_tokens, or one chunk)


@dataclass(frozen=True, slots=True)
class TokenOutcome:
    """What ``postprocess`` made of one sampled token."""
    seq_id: int
    token: int
    finish_reason: str | None    # "stop": a stop token (not part of the text); "length": the sequence
                                 # reached its most tokens; None: it goes on


@dataclass(frozen=True, slots=True)
class BatcherStats:
    num_running: int             # admitted sequences (their KV reserved)
    num_waiting: int             # queued, not yet admitted
    sweeps: int                  # sweeps scheduled so far
    kv_reserved_tokens: int      # held by running sequences
    kv_capacity_tokens: int | None   # all sequences together (None: unbounded)


class Batcher:
    def __init__(self, *, max_num_seqs: int, max_sweep_tokens: int, kv_capacity_tokens: int | None = None) -> None:
        self.max_num_seqs, self.max_sweep_tokens = max_num_seqs, max_sweep_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self._running: dict[int, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._sweeps = 0
        self._reserved = 0

    def statistics(self) -> BatcherStats:
        return BatcherStats(len(self._running), len(self._waiting), self._sweeps, self._reserved,
                            self.kv_capacity_tokens)

    def add(self, seq_id: int, num_prompt_tokens: int, max_tokens: int | None = None, *,
            stop_token_ids: frozenset[int] = frozenset()) -> None:
        """Queue a sequence of ``num_prompt_tokens`` that may grow to ``max_tokens`` (default:
        the prompt alone) and ends at any of ``stop_token_ids``. Raises KVCapacityError if that
        can never fit."""
        if num_prompt_tokens < 1:
            raise ValueError("a sequence needs at least one prompt token")
        need = max(num_prompt_tokens, max_tokens or 0)
        if self.kv_capacity_tokens is not None and need > self.kv_capacity_tokens:
            raise KVCapacityError(f"the sequence needs KV for {need} tokens but the KV capacity is "
                                  f"{self.kv_capacity_tokens} tokens")
        self._waiting.append(_Seq(seq_id, num_prompt_tokens, need, frozenset(stop_token_ids)))

    def _fits(self, seq: _Seq) -> bool:
        return self.kv_capacity_tokens is None or self._reserved + seq.reserved <= self.kv_capacity_tokens

    def remove(self, seq_id: int) -> None:
        """Forget a finished or cancelled sequence (called between sweeps)."""
        seq = self._running.pop(seq_id, None)
        if seq is None:
            self._waiting = deque(s for s in self._waiting if s.seq_id != seq_id)
        else:
            self._reserved -= seq.reserved

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
            self._reserved += seq.reserved
            admitted.append(seq.seq_id)
        return admitted

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """The KV of a running sequence's first ``num_tokens`` tokens exists already (reused
        from the prefix cache): its prefill starts after them. At least one prompt token is
        left to compute, since its logits are what the first new token is sampled from."""
        seq = self._running[seq_id]
        if not 0 <= num_tokens < seq.num_tokens:
            raise ValueError(f"sequence {seq_id} has {seq.num_tokens} tokens; {num_tokens} cannot be marked "
                             "computed (at least one must be left to compute)")
        seq.num_computed = max(seq.num_computed, num_tokens)

    def schedule(self) -> SweepPlan | None:
        self.admit()
        decode = [s for s in self._running.values() if s.num_tokens - s.num_computed == 1]
        prefill = [s for s in self._running.values() if s.num_tokens - s.num_computed > 1]
        budget = self.max_sweep_tokens
        chosen: list[ScheduledSeq] = []
        for seq in decode:
            if budget < 1:
                break
            chosen.append(ScheduledSeq(seq.seq_id, seq.num_computed, 1, True))
            budget -= 1
        for seq in prefill:
            if budget < 1:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            chosen.append(ScheduledSeq(seq.seq_id, seq.num_computed, n, seq.num_computed + n == seq.num_tokens))
            budget -= n
        if not chosen:
            return None
        self._sweeps += 1
        return SweepPlan(tuple(chosen), sum(s.num_tokens for s in chosen))

    def postprocess(self, plan: SweepPlan, tokens: Sequence[int | None]) -> list[TokenOutcome]:
        """Record a finished sweep: ``tokens[i]`` is the token sampled for ``plan.seqs[i]`` (None
        when nothing was sampled, or the sequence was cancelled while the sweep ran). Returns
        what each new token did; a finished sequence stays until ``remove``."""
        outcomes = []
        for item, token in zip(plan.seqs, tokens, strict=True):
            seq = self._running.get(item.seq_id)
            if seq is None:          # removed while the sweep ran
                continue
            seq.num_computed = item.start + item.num_tokens
            if token is None:
                continue
            seq.num_tokens += 1
            reason = "stop" if token in seq.stop_token_ids else "length" if seq.num_tokens >= seq.reserved else None
            outcomes.append(TokenOutcome(item.seq_id, token, reason))
        return outcomes
