"""Speculative decoding: propose tokens cheaply, verify them in one sweep, keep what the model
would have produced itself.

With layers streamed from disk a sweep costs about one read of the weights whatever number of
tokens it carries, so a request that verifies k proposed tokens in the sweep that computes its
last token gets up to k + 1 tokens for the price of one. The driver asks the proposer
(``NgramProposer`` or ``DraftProposer``) for proposals of at most ``SpeculationLength`` tokens
before each sweep, the batcher schedules the request's last token and the proposal as
one chunk (``ScheduledSeq.num_draft``), the sweep returns the logits of every row of it, and
``verify`` decides which proposals stand:

- greedy: proposal i is kept while it equals the argmax at its position; the first position
  that disagrees gives the model's own token there (or, all kept, the position after the last
  proposal gives a bonus token). The tokens are exactly those of plain greedy decoding.
- sampling: the standard speculative-sampling rule (Leviathan et al., Chen et al.) with the
  proposal distribution q one-hot (both proposers are deterministic): proposal x is accepted
  with probability min(1, p(x) / q(x)) = p(x), p the request's own distribution (temperature,
  top-k, top-p: ``sampling.probabilities``), and on rejection the token is drawn from
  max(0, p - q) renormalised, i.e. p with x removed. ``verify`` realises it by the coupling
  that draws the position's token exactly as plain decoding does (``sampling.sample``, one
  draw from the request's generator) and accepts x when that token is x: P(x) = p(x), and a
  rejection's token is p conditioned on not being x. So each position consumes one draw, as in
  plain decoding, and a seeded request gives the same tokens with or without speculation,
  whatever the batch and whatever was proposed (up to the rounding of a chunk's logits).

The KV of rejected proposals is rolled back by the driver (``KVHandle.truncate``) before
anything else sees it, so the prefix cache never holds a rejected token.

``NgramProposer`` is prompt lookup (vLLM's "ngram"): the n-gram, ``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens, that ends the request's tokens so far is looked up at its most
recent earlier occurrence, and the tokens that followed it there are the proposal (a match that
runs into the end continues with the proposal itself: a loop proposes its own next turn). It costs a
scan of the request's tokens on the host per step and no model. No occurrence: no proposal, and
the request decodes one token that sweep.

``DraftProposer`` runs a small model with the target's vocabulary (``open_draft`` builds its
resident runtime and checks the vocabulary and special tokens) greedily, one draft sweep per
proposed token for all speculating requests, keeping each request's draft KV between steps
(cut back to what the target kept). A draft that fails costs that step its proposals, never a
request. ``SpeculationLength`` is the configured length, or for "auto" the cost model's best at
the acceptance measured so far (``tiers/plan/speculation.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from tierflow.config import SamplingParams, SpeculativeConfig
from tierflow.engine.sampling import sample
from tierflow.errors import ConfigError
from tierflow.outputs import SpeculativeStats
from tierflow.stages.compute import SweepBatch
from tierflow.tiers.kv.contiguous import SequenceKV
from tierflow.tiers.plan.hardware import Overrides
from tierflow.tiers.plan.speculation import predict_speculation
from tierflow.tiers.probe.profile import load_profile

if TYPE_CHECKING:
    from tierflow.engine.build import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verification made of one request's proposal."""

    tokens: tuple[int, ...]     # the tokens to append: the accepted proposals, then the model's own
    accepted: int               # proposals accepted (len(tokens) - 1)


class NgramProposer:
    """Prompt lookup over a request's own tokens (see the module)."""

    method = "ngram"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens if isinstance(config.num_speculative_tokens, int) else None
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, tokens: Sequence[int], most: int) -> tuple[int, ...]:
        """Up to ``most`` tokens (and ``num_speculative_tokens``, when an int) that may follow
        ``tokens`` (() when no n-gram recurs)."""
        limit = min(self.k, most) if self.k is not None else most
        if limit < 1:
            return ()
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = list(tokens[length - n:])
            last = suffix[-1]
            # the most recent earlier occurrence: ends at i + n - 1 < length - 1
            for i in range(length - n - 1, -1, -1):
                if tokens[i + n - 1] == last and list(tokens[i:i + n]) == suffix:
                    return _continue(tokens, i + n, limit)
        return ()


    async def propose_all(self, wanted: Mapping[int, tuple[Sequence[int], int, int]]) -> dict[int, tuple[int, ...]]:
        """Request id → (its tokens so far, the most it may propose, the most tokens it may
        reach) in; proposals out (none for a request whose n-gram does not recur)."""
        drafts = {}
        for req_id, (tokens, most, _) in wanted.items():
            if draft := self.propose(tokens, most):
                drafts[req_id] = draft
        return drafts


@dataclass(slots=True)
class _DraftSeq:
    kv: SequenceKV
    fed: list[int]              # the tokens whose KV the draft holds, in order


class DraftProposer:
    """A small resident model proposes its greedy continuation (see the module). One draft
    sweep carries every speculating request: the tokens its draft KV lacks (the prompt, at
    first; after a step, the tokens verification kept), then one token per further proposal.
    Greedy proposals make q one-hot, so ``verify``'s rule is exact for sampling requests too."""

    method = "draft"

    def __init__(self, rt: "Runtime", config: SpeculativeConfig) -> None:
        self.rt = rt
        self.chunk = rt.plan.prefill_chunk_tokens
        self.context = rt.spec.max_position_embeddings    # the draft's context window
        self._seqs: dict[int, _DraftSeq] = {}

    async def propose_all(self, wanted: Mapping[int, tuple[Sequence[int], int, int]]) -> dict[int, tuple[int, ...]]:
        """As ``NgramProposer.propose_all``. A request that is not decoding now (finished,
        cancelled, preempted) loses its draft KV; one past the draft's context window gets none."""
        for req_id in [i for i in self._seqs if i not in wanted]:
            self._seqs.pop(req_id).kv.free()
        limits, proposals = {}, {}
        for req_id, (tokens, most, most_tokens) in wanted.items():
            limit = min(most, self.context - len(tokens))
            if limit < 1:
                continue
            seq = self._seqs.get(req_id)
            if seq is None:
                seq = self._seqs[req_id] = _DraftSeq(self.rt.contiguous_kv(min(most_tokens, self.context)), [])
            common = _common_prefix(seq.fed, tokens, len(tokens) - 1)   # the last token is fed again: its logits
            seq.kv.truncate(common)
            del seq.fed[common:]
            limits[req_id], proposals[req_id] = limit, []
        pending = {req_id: list(wanted[req_id][0][len(self._seqs[req_id].fed):]) for req_id in limits}
        try:
            while pending:                   # each round: up to a chunk of tokens over the requests
                batch, last = [], {}
                budget = self.chunk
                for req_id, todo in pending.items():
                    if budget < 1:
                        break
                    take = todo[:budget]
                    del todo[:len(take)]
                    budget -= len(take)
                    batch.append((req_id, take, not todo))
                logits = await self._sweep(batch)
                for (req_id, _, done), row in zip(batch, logits):
                    if done:
                        last[req_id] = row
                pending = {req_id: todo for req_id, todo in pending.items() if todo}
                for req_id, row in last.items():
                    proposals[req_id].append(int(torch.argmax(row)))
            for step in range(1, max(limits.values(), default=0)):
                batch = [(req_id, [proposals[req_id][-1]], True) for req_id in limits if limits[req_id] > step]
                for (req_id, _, _), row in zip(batch, await self._sweep(batch)):
                    proposals[req_id].append(int(torch.argmax(row)))
        except Exception as exc:     # the draft failing costs speed, never the request: no proposals
            log.warning("the draft model failed, decoding this step without proposals: %s", exc)
            for req_id in limits:
                self._seqs.pop(req_id).kv.free()
            return {}
        return {req_id: tuple(p) for req_id, p in proposals.items() if p}

    async def _sweep(self, batch: list[tuple[int, list[int], bool]]) -> torch.Tensor:
        """One draft sweep: each (request, tokens, wants logits) appends its tokens to its draft
        KV; returns the last token's logits of each that wants them, in order."""
        ids, positions, slices, starts, kvs, rows = [], [], [], [], [], []
        for req_id, tokens, want in batch:
            seq = self._seqs[req_id]
            start = len(seq.fed)
            slices.append(slice(len(ids), len(ids) + len(tokens)))
            starts.append(start)
            ids += tokens
            positions += range(start, start + len(tokens))
            kvs.append(seq.kv)
            if want:
                rows.append(len(ids) - 1)
            seq.fed += tokens
        result = await self.rt.runner.run(SweepBatch(torch.tensor(ids), torch.tensor(positions), tuple(slices),
                                                     tuple(starts), tuple(kvs), torch.tensor(rows, dtype=torch.long)))
        if result.failures:
            raise next(iter(result.failures.values()))
        return result.logits.cpu()


def _common_prefix(a: Sequence[int], b: Sequence[int], most: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if n >= most or x != y:
            break
        n += 1
    return n


async def open_draft(target: "Runtime", config: SpeculativeConfig) -> "Runtime":
    """The draft model's runtime: the target's device and dtype, every unit resident (the
    target's unit overrides and KV tiers do not apply to it), no prefix cache. Its vocabulary
    and special tokens must equal the target's, else a ConfigError naming the difference."""
    from tierflow.engine.build import build_runtime
    tc = target.config
    draft_config = dataclasses.replace(
        tc, speculative=None, profile=_without_overrides(tc.profile), kv_cache_dir=None, prefix_cache_dir=None,
        prefix_cache_bytes=0, trace_path=None, kv_device_bytes=None, kv_host_bytes=None)
    try:
        draft = await build_runtime(config.model, draft_config, target.ops)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"could not open the draft model {config.model}: {exc}",
                          settings=("speculative",)) from exc
    try:
        check_same_vocabulary(target, draft, config.model)
    except BaseException:
        await draft.aclose()
        raise
    log.info("speculative decoding: draft model %s, %d layers, resident on %s", config.model,
             draft.spec.num_layers, draft.device)
    return draft


def _without_overrides(profile: Any) -> dict[str, Any] | None:
    """The hardware part of the target's profile (the target's open has read it already): its
    unit overrides name the target's units."""
    if profile is None:
        return None
    return dataclasses.replace(load_profile(profile), overrides=Overrides()).to_json()


def check_same_vocabulary(target: "Runtime", draft: "Runtime", model: Any) -> None:
    """A draft proposes token ids: they mean the same only with the same vocabulary."""
    where = f"the draft model {model}"
    if draft.spec.vocab_size != target.spec.vocab_size:
        raise ConfigError(f"{where} has a vocabulary of {draft.spec.vocab_size} tokens, the target "
                          f"{target.spec.vocab_size}: a draft must share the target's tokenizer",
                          settings=("speculative",))
    t, d = target.tokenizer, draft.tokenizer
    if (t is None) != (d is None):
        which = "the target has a tokenizer and the draft none" if d is None else "the draft has a tokenizer and the target none"
        raise ConfigError(f"{where}: {which}, so their tokens cannot be shown to match", settings=("speculative",))
    if t is None:
        return
    if t.get_vocab() != d.get_vocab():
        differ = sorted(set(t.get_vocab().items()) ^ set(d.get_vocab().items()))[:3]
        raise ConfigError(f"{where}: its vocabulary differs from the target's (e.g. {differ}): a draft must share "
                          "the target's tokenizer", settings=("speculative",))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(t, name, None) != getattr(d, name, None):
            raise ConfigError(f"{where}: its {name} is {getattr(d, name, None)}, the target's "
                              f"{getattr(t, name, None)}: a draft must share the target's special tokens",
                              settings=("speculative",))


def _continue(tokens: Sequence[int], start: int, count: int) -> tuple[int, ...]:
    """``count`` tokens from ``start`` on, where running past the end continues with the tokens
    proposed so far: a match ``p`` tokens back proposes the last ``p`` tokens repeating (a loop
    of period 2 proposes all ``count``, not 2)."""
    proposal: list[int] = []
    for j in range(count):
        at = start + j
        proposal.append(tokens[at] if at < len(tokens) else proposal[at - len(tokens)])
    return tuple(proposal)


def verify(logits: torch.Tensor, draft: Sequence[int], params: SamplingParams,
           generator: torch.Generator | None) -> Verdict:
    """Which of ``draft`` stand, from float32 host ``logits`` [len(draft) + 1, vocab]: row i is
    the model's prediction after the last known token and the first i proposals."""
    if len(draft) + 1 != logits.shape[0]:
        raise ValueError(f"{len(draft)} proposed tokens need {len(draft) + 1} logit rows, got {logits.shape[0]}")
    tokens: list[int] = []
    for i, proposed in enumerate(draft):
        choice = sample(logits[i], params, generator)     # what plain decoding would emit here
        if choice != proposed:
            return Verdict((*tokens, choice), i)
        tokens.append(int(proposed))
    return Verdict((*tokens, sample(logits[len(draft)], params, generator)), len(draft))


class SpeculationLength:
    """How many tokens a step proposes: the configured int, or for "auto" the cost model's best
    (``tiers/plan/speculation.py``) at the acceptance measured so far in the run (a prior of
    0.5 worth ``PRIOR_PROPOSALS`` proposals until there are measurements), per context length
    rounded to a ``CONTEXT_STEP`` (memoised: it changes slowly)."""

    PRIOR, PRIOR_PROPOSALS, CONTEXT_STEP = 0.5, 8, 256

    def __init__(self, rt: "Runtime", config: SpeculativeConfig, counter: "SpeculationCounter") -> None:
        self.fixed = config.num_speculative_tokens if isinstance(config.num_speculative_tokens, int) else None
        self.rt, self.counter = rt, counter
        draft = rt.draft
        self.draft_s = draft.plan.predicted.decode_s_per_token if draft is not None else 0.0
        self._memo: dict[tuple[int, int], int] = {}

    def acceptance(self) -> float:
        c = self.counter
        return (c.accepted + self.PRIOR * self.PRIOR_PROPOSALS) / (c.proposed + self.PRIOR_PROPOSALS)

    def __call__(self, context: int) -> int:
        if self.fixed is not None:
            return self.fixed
        key = (-(-context // self.CONTEXT_STEP), round(self.acceptance() * 20))
        if key not in self._memo:
            rt = self.rt
            self._memo[key] = predict_speculation(rt.costs, rt.hardware, rt.plan.tiers,
                                                  context=key[0] * self.CONTEXT_STEP, acceptance=key[1] / 20,
                                                  draft_s_per_token=self.draft_s).num_speculative_tokens
        return self._memo[key]


class SpeculationCounter:
    """The driver's running counts of one method, read out as ``SpeculativeStats``."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.proposed = self.accepted = self.steps = self.emitted = 0

    def add(self, proposed: int, accepted: int, emitted: int) -> None:
        """One request verified ``proposed`` tokens in a sweep, ``accepted`` of them stood, and
        ``emitted`` tokens were appended (fewer than accepted + 1 past a stop)."""
        self.proposed += proposed
        self.accepted += accepted
        self.steps += 1
        self.emitted += emitted

    def statistics(self) -> SpeculativeStats:
        return SpeculativeStats(self.method, self.proposed, self.accepted, self.steps, self.emitted)
