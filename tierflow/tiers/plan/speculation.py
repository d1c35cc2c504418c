"""What speculative decoding buys on a plan: the tokens one sweep yields and how long it takes.

A sweep that verifies k proposed tokens computes k + 1 tokens of one sequence; with per-token
acceptance rate a (each proposal standing independently with probability a, the usual model)
it yields E(k) = (1 - a^(k+1)) / (1 - a) tokens on average (k + 1 when a = 1). Its time is the
cost model's sweep of k + 1 tokens (``timing.sweep_times``: disk and PCIe reads do not grow
with tokens, compute does) plus k steps of the draft's own decode (0 for prompt lookup). The
rate E(k) / time(k) over k = 1 .. ``most`` is what ``num_speculative_tokens="auto"`` maximises
and what ``tierflow plan --acceptance`` reports: on a disk- or PCIe-bound sweep extra tokens are
nearly free and k grows until compute catches up; on a compute-bound one k stays small, or
speculation is not worth it at all (``speedup`` below 1).

A candidate tree of width w puts w - 1 alternatives beside each of the k chain tokens (leaves:
``engine/speculative.py``), so the sweep computes 1 + k·w tokens. When the chain is rejected at
a position — probability 1 - a^k over the step — and one of that position's alternatives holds
the model's token (probability s_w, the measured hit rate of the first w - 1 alternatives), the
step keeps it and one more token: E(k, w) = E(k) + s_w (1 - a^k). The search runs over k and w
together; w = 1 is the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from tierflow.tiers.plan.costmodel import ModelCosts
from tierflow.tiers.plan.hardware import HardwareProfile
from tierflow.tiers.plan.timing import sweep_times

MOST_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SpeculationPrediction:
    num_speculative_tokens: int      # k, the best for the stated acceptance
    acceptance: float                # the per-token acceptance rate it assumes
    tokens_per_sweep: float          # E(k)
    sweep_s: float                   # predicted seconds of a sweep verifying k tokens (draft included)
    plain_sweep_s: float             # and of a plain decode sweep
    bottleneck: str                  # of the verifying sweep: "disk" | "pcie" | "compute"
    tree_width: int = 1              # w: candidates per position (1: a chain)

    @property
    def speedup(self) -> float:
        """Predicted tokens/s over plain decoding's, for one sequence."""
        return self.tokens_per_sweep / self.sweep_s * self.plain_sweep_s


def expected_tokens(acceptance: float, k: int, alternative_hit: float = 0.0) -> float:
    """Tokens a sweep verifying ``k`` chain proposals yields on average (the accepted ones and
    one), plus what alternatives that hold the model's token at a rejected position at rate
    ``alternative_hit`` add."""
    chain = float(k + 1) if acceptance >= 1.0 else (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)
    return chain + alternative_hit * (1.0 - acceptance ** k)


def predict_speculation(costs: ModelCosts, hw: HardwareProfile, tiers: Sequence[str], *, context: int,
                        acceptance: float, draft_s_per_token: float = 0.0,
                        kv_tier_bytes: Mapping[str, float] | None = None,
                        most: int = MOST_SPECULATIVE_TOKENS,
                        alternative_hits: Sequence[float] = ()) -> SpeculationPrediction:
    """The best ``k`` (and tree width: ``alternative_hits[w - 2]`` is s_w, for widths 2 ..
    len + 1) for one sequence at ``context`` keys, and what it predicts."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be within [0, 1], got {acceptance}")
    if any(not 0.0 <= h <= 1.0 for h in alternative_hits):
        raise ValueError(f"alternative hit rates must be within [0, 1], got {list(alternative_hits)}")
    kv = dict(kv_tier_bytes or {})

    def sweep(tokens: int):
        return sweep_times(costs, hw, tiers, kv, tokens=tokens, logit_rows=tokens, queries=tokens,
                           keys=context + tokens, sequences=1)

    plain = sweep(1).total_s
    best = None
    hits = (0.0, *alternative_hits)
    for width, hit in enumerate(hits, start=1):
        for k in range(1, most + 1):
            times = sweep(1 + k * width)
            total = times.total_s + k * draft_s_per_token
            rate = expected_tokens(acceptance, k, hit) / total
            if best is None or rate > best[0] * (1 + 1e-9):
                best = (rate, k, width, total, times.bottleneck)
    _, k, width, total, bottleneck = best
    return SpeculationPrediction(k, acceptance, expected_tokens(acceptance, k, hits[width - 1]), total, plain,
                                 bottleneck, width)
