"""Speculative decoding: propose tokens cheaply, verify them in one sweep, keep what the model
would have produced itself.

With layers streamed from disk a sweep costs about one read of the weights whatever number of
tokens it carries, so a request that verifies k proposed tokens in the sweep that computes its
last token gets up to k + 1 tokens for the price of one. The driver asks the proposer
(``engine/proposers.py``: prompt lookup or a draft model) for a ``Proposal`` before each sweep —
a chain of up to k tokens and, per position, the next best alternatives — and flattens it into
``Candidates``: the chain, plus up to ``width - 1`` alternatives at each of its positions, a
candidate tree whose alternatives are leaves (the chain's siblings). The batcher schedules the
request's last token and the candidates as one chunk (``ScheduledSeq.num_draft``); with
alternatives the chunk carries a tree mask (``adapters/tree.py``), so each candidate attends to
its own ancestors only and sits at its own depth's position. The sweep returns the logits of
every row of it, and ``verify`` walks the tree:

- at each position it draws the token exactly as plain decoding would (greedy: the argmax;
  sampling: ``sampling.sample``, one draw from the request's generator) from the row of the
  path accepted so far; if a candidate child carries that token the walk moves to it, else the
  drawn token ends the step. So the tokens are exactly those of plain decoding, greedy or seeded.
- for sampling this is the standard speculative-sampling rule (Leviathan et al., Chen et al.)
  with every proposal distribution q one-hot (both proposers are deterministic): a candidate x
  stands with probability min(1, p(x) / q(x)) = p(x), p the request's own distribution
  (temperature, top-k, top-p), and on rejection the token comes from the normalised residual
  max(0, p - q), i.e. p without x — which the coupling realises by accepting x when plain
  decoding's draw is x. With several candidates at a position (the tree) the rule is the same
  with q spread over them one-hot each, and the coupling extends as written: the drawn token is
  accepted when any candidate carries it. Each position consumes one draw, as in plain
  decoding, whatever was proposed and whatever shares the sweep (up to the rounding of a
  chunk's logits).

After verification the driver keeps the KV of the accepted path only (``tiers/kv/handle.keep_path``:
a chain's is a truncation; an accepted alternative's KV is moved down to its position's slot),
before anything else sees it, so the prefix cache never holds a rejected token.

``SpeculationShape`` is how many chain tokens and candidates per position a step proposes: the
configured ints, or for "auto" the cost model's best (``tiers/plan/speculation.py``) at the
chain acceptance and the alternatives' hit rate measured so far. The hit rate of every width up
to ``tree_width`` is measured whatever width was proposed: a proposal always carries its
alternatives, and after a rejection the driver checks which rank, if any, held the model's token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Container, Sequence

import torch

from tierflow.config import SamplingParams, SpeculativeConfig
from tierflow.engine.sampling import sample
from tierflow.errors import NonFiniteRow
from tierflow.outputs import SpeculativeStats
from tierflow.tiers.plan.speculation import predict_speculation

if TYPE_CHECKING:
    from tierflow.engine.build import Runtime


@dataclass(frozen=True, slots=True)
class Proposal:
    """What a proposer offers for one request: its chain and, per chain position, other
    candidates for that position, best first (never the chain's own token)."""

    chain: tuple[int, ...]
    alternatives: tuple[tuple[int, ...], ...] = ()

    def candidates(self, width: int) -> "Candidates":
        """The chain, then up to ``width - 1`` alternatives at each of its positions (depth
        order), as a flat tree: every parent comes before its children, so any prefix of the
        tokens is a tree too (the batcher may cut a proposal short)."""
        tokens, parents = list(self.chain), list(range(-1, len(self.chain) - 1))
        for depth, others in enumerate(self.alternatives[:len(self.chain)]):
            for token in others[:width - 1]:
                tokens.append(token)
                parents.append(depth - 1)       # a sibling of chain token ``depth``
        return Candidates(tuple(tokens), tuple(parents), self)


@dataclass(frozen=True, slots=True)
class Candidates:
    """A flattened candidate tree: ``parents[i]`` is the index of token i's parent, -1 for a
    child of the request's last known token."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    proposal: Proposal

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, n: int) -> "Candidates":
        return Candidates(self.tokens[:n], self.parents[:n], self.proposal)

    @property
    def chain_length(self) -> int:
        """How many of the tokens are the proposal's chain (they come first)."""
        return min(len(self.proposal.chain), len(self.tokens))

    @property
    def is_chain(self) -> bool:
        return self.chain_length == len(self.tokens)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verification made of one request's proposal."""

    tokens: tuple[int, ...]     # the tokens to append: the accepted proposals, then the model's own
    accepted: int               # proposals accepted (len(tokens) - 1)
    path: tuple[int, ...] = ()  # the accepted candidates' indices (0 .. accepted - 1 for a chain)


def verify(logits: torch.Tensor, draft: Sequence[int], params: SamplingParams,
           generator: torch.Generator | None, parents: Sequence[int] | None = None,
           bad: Container[int] = ()) -> Verdict:
    """Which of ``draft`` stand, from float32 host ``logits`` [len(draft) + 1, vocab]: row 0 is
    the model's prediction after the last known token, row i + 1 after candidate i and its
    ancestors. ``parents`` (default: a chain) gives each candidate's parent (-1: the last known
    token). Rows in ``bad`` (not finite) raise ``NonFiniteRow`` when the walk reaches one, and
    only then: a row past the first rejection is one plain decoding never computes."""
    if len(draft) + 1 != logits.shape[0]:
        raise ValueError(f"{len(draft)} proposed tokens need {len(draft) + 1} logit rows, got {logits.shape[0]}")
    parents = range(-1, len(draft) - 1) if parents is None else parents
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    tokens: list[int] = []
    path: list[int] = []
    node = -1
    while True:
        if node + 1 in bad:
            raise NonFiniteRow(node + 1, len(tokens))
        choice = sample(logits[node + 1], params, generator)     # what plain decoding would emit here
        node = next((c for c in children.get(node, ()) if draft[c] == choice), None)
        if node is None:
            return Verdict((*tokens, choice), len(tokens), tuple(path))
        tokens.append(choice)
        path.append(node)


@dataclass(frozen=True, slots=True)
class SpeculationShape:
    """What a step proposes: up to ``tokens`` chain tokens, ``width`` candidates per position."""

    tokens: int
    width: int = 1


class SpeculationLength:
    """The shape a step proposes: the configured ints, or for "auto" the cost model's best
    (``tiers/plan/speculation.py``) at the chain acceptance and alternative hit rates measured
    so far in the run (priors worth ``PRIOR_PROPOSALS`` proposals until there are
    measurements), per context length rounded to a ``CONTEXT_STEP`` (memoised: it changes
    slowly)."""

    PRIOR, PRIOR_HIT, PRIOR_PROPOSALS, CONTEXT_STEP = 0.5, 0.05, 8, 256

    def __init__(self, rt: "Runtime", config: SpeculativeConfig, counter: "SpeculationCounter") -> None:
        self.fixed = config.num_speculative_tokens if isinstance(config.num_speculative_tokens, int) else None
        self.most_width = config.tree_width
        self.rt, self.counter = rt, counter
        draft = rt.draft
        self.draft_s = draft.plan.predicted.decode_s_per_token if draft is not None else 0.0
        self._memo: dict[tuple[int, ...], SpeculationShape] = {}

    def acceptance(self) -> float:
        c = self.counter
        return (c.chain_accepted + self.PRIOR * self.PRIOR_PROPOSALS) / (c.chain_proposed + self.PRIOR_PROPOSALS)

    def alternative_hits(self) -> tuple[float, ...]:
        """For widths 2 .. ``tree_width``: how often, after the chain was rejected at a position,
        one of the first width - 1 alternatives held the model's token there."""
        c, hits, rates = self.counter, 0.0, []
        for rank in range(self.most_width - 1):
            hits += c.alternative_hits.get(rank, 0) + self.PRIOR_HIT * self.PRIOR_PROPOSALS
            rates.append(min(1.0, hits / (c.rejections + self.PRIOR_PROPOSALS)))
        return tuple(rates)

    def __call__(self, context: int) -> SpeculationShape:
        if self.fixed is not None:
            return SpeculationShape(self.fixed, self.most_width)
        key = (-(-context // self.CONTEXT_STEP), round(self.acceptance() * 20),
               *(round(h * 20) for h in self.alternative_hits()))
        if key not in self._memo:
            rt = self.rt
            best = predict_speculation(rt.costs, rt.hardware, rt.plan.tiers, context=key[0] * self.CONTEXT_STEP,
                                       acceptance=key[1] / 20, draft_s_per_token=self.draft_s,
                                       alternative_hits=[h / 20 for h in key[2:]])
            self._memo[key] = SpeculationShape(best.num_speculative_tokens, best.tree_width)
        return self._memo[key]


class SpeculationCounter:
    """The driver's running counts of one method, read out as ``SpeculativeStats``."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.proposed = self.accepted = self.steps = self.emitted = 0
        self.chain_proposed = self.chain_accepted = 0
        self.rejections = 0                       # chain positions rejected (a step's first, if any)
        self.alternative_hits: dict[int, int] = {}  # rank among the alternatives → times it held the model's token
        self.alternatives_proposed = self.alternatives_accepted = 0

    def add(self, candidates: Candidates, verdict: Verdict, emitted: int) -> None:
        """One request verified ``candidates`` in a sweep, ``verdict`` says what stood, and
        ``emitted`` tokens were appended (fewer than accepted + 1 past a stop)."""
        chain = candidates.chain_length
        on_chain = sum(1 for i in verdict.path if i < chain)
        self.proposed += len(candidates)
        self.accepted += verdict.accepted
        self.steps += 1
        self.emitted += emitted
        self.chain_proposed += chain
        self.chain_accepted += on_chain
        self.alternatives_proposed += len(candidates) - chain
        self.alternatives_accepted += verdict.accepted - on_chain
        alternatives = candidates.proposal.alternatives
        if on_chain < chain:     # the chain was rejected here: was the model's token among the ranks?
            self.rejections += 1
            others = alternatives[on_chain] if on_chain < len(alternatives) else ()
            token = verdict.tokens[on_chain]
            if token in others:
                rank = others.index(token)
                self.alternative_hits[rank] = self.alternative_hits.get(rank, 0) + 1

    def statistics(self) -> SpeculativeStats:
        return SpeculativeStats(self.method, self.proposed, self.accepted, self.steps, self.emitted,
                                self.alternatives_proposed, self.alternatives_accepted)
