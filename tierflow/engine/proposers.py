"""The proposers of speculative decoding (``engine/speculative.py`` verifies what they propose).

``NgramProposer`` is prompt lookup (vLLM's "ngram"): the n-gram, ``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens, that ends the request's tokens so far is looked up at its most
recent earlier occurrence, and the tokens that followed it there are the chain (a match that
runs into the end continues with the proposal itself: a loop proposes its own next turn). With
``tree_width`` > 1 the scan goes on to further occurrences (longest n-grams first, most recent
first) and the tokens their continuations put at a chain position after agreeing with the chain
up to it are that position's alternatives — the siblings of the main branch of the trie of
continuations. It costs a scan of the request's tokens on the host per step and no model. No
occurrence: no proposal, and the request decodes one token that sweep.

``DraftProposer`` runs a small model with the target's vocabulary (``open_draft`` builds its
resident runtime and checks the vocabulary and special tokens) greedily, one draft sweep per
proposed token for all speculating requests, keeping each request's draft KV between steps
(cut back to what the target kept). Its next most likely tokens at each position are that
position's alternatives: the logits are there already, so a tree costs the draft nothing. A
draft that fails costs that step its proposals, never a request.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from tierflow.config import SpeculativeConfig
from tierflow.engine.speculative import Proposal
from tierflow.errors import ConfigError
from tierflow.stages.compute import SweepBatch
from tierflow.tiers.kv.contiguous import SequenceKV
from tierflow.tiers.plan.hardware import Overrides
from tierflow.tiers.probe.profile import load_profile

if TYPE_CHECKING:
    from tierflow.engine.build import Runtime

log = logging.getLogger(__name__)
MORE_MATCHES = 4        # ngram with a tree: continuations looked at per alternative wanted

Wanted = Mapping[int, tuple[Sequence[int], int, int]]   # request id → (tokens so far, most to propose, most tokens)


class NgramProposer:
    """Prompt lookup over a request's own tokens (see the module)."""

    method = "ngram"

    def __init__(self, config: SpeculativeConfig) -> None:
        self.k = config.num_speculative_tokens if isinstance(config.num_speculative_tokens, int) else None
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.alternatives = config.tree_width - 1

    def propose(self, tokens: Sequence[int], most: int) -> tuple[int, ...]:
        """Up to ``most`` tokens (and ``num_speculative_tokens``, when an int) that may follow
        ``tokens`` (() when no n-gram recurs)."""
        return self.proposal(tokens, most).chain

    def proposal(self, tokens: Sequence[int], most: int) -> Proposal:
        """``propose``'s chain, and the alternatives of its positions (with ``tree_width`` > 1)."""
        limit = min(self.k, most) if self.k is not None else most
        if limit < 1:
            return Proposal(())
        wanted = 1 + self.alternatives * MORE_MATCHES
        found: list[tuple[int, ...]] = []
        ends: set[int] = set()        # a shorter n-gram matches where a longer one did: one continuation each
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = list(tokens[length - n:])
            last = suffix[-1]
            # the most recent earlier occurrence first: ends at i + n - 1 < length - 1
            for i in range(length - n - 1, -1, -1):
                if tokens[i + n - 1] == last and i + n not in ends and list(tokens[i:i + n]) == suffix:
                    ends.add(i + n)
                    found.append(_continue(tokens, i + n, limit))
                    if len(found) == wanted:
                        return _with_alternatives(found, self.alternatives)
        return _with_alternatives(found, self.alternatives) if found else Proposal(())

    async def propose_all(self, wanted: Wanted) -> dict[int, Proposal]:
        """Request id → (its tokens so far, the most it may propose, the most tokens it may
        reach) in; proposals out (none for a request whose n-gram does not recur)."""
        drafts = {}
        for req_id, (tokens, most, _) in wanted.items():
            if (proposal := self.proposal(tokens, most)).chain:
                drafts[req_id] = proposal
        return drafts


def _with_alternatives(found: Sequence[tuple[int, ...]], most: int) -> Proposal:
    """The first continuation as the chain; at each of its positions, the tokens other
    continuations that agree with it up to there put there (in the order found, at most ``most``)."""
    chain = found[0]
    if most < 1:
        return Proposal(chain)
    alternatives = []
    for depth in range(len(chain)):
        others: list[int] = []
        for other in found[1:]:
            if (len(other) > depth and other[:depth] == chain[:depth] and other[depth] != chain[depth]
                    and other[depth] not in others and len(others) < most):
                others.append(other[depth])
        alternatives.append(tuple(others))
    return Proposal(chain, tuple(alternatives))


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
        self.alternatives = config.tree_width - 1

    async def propose_all(self, wanted: Wanted) -> dict[int, Proposal]:
        """As ``NgramProposer.propose_all``. A request that is not decoding now (finished,
        cancelled, preempted) loses its draft KV; one past the draft's context window gets none."""
        for req_id in [i for i in self._seqs if i not in wanted]:
            self._seqs.pop(req_id).kv.free()
        limits: dict[int, int] = {}
        proposals: dict[int, list[int]] = {}
        others: dict[int, list[tuple[int, ...]]] = {}
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
            limits[req_id], proposals[req_id], others[req_id] = limit, [], []
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
                    self._pick(row, proposals[req_id], others[req_id])
            for step in range(1, max(limits.values(), default=0)):
                batch = [(req_id, [proposals[req_id][-1]], True) for req_id in limits if limits[req_id] > step]
                for (req_id, _, _), row in zip(batch, await self._sweep(batch)):
                    self._pick(row, proposals[req_id], others[req_id])
        except Exception as exc:     # the draft failing costs speed, never the request: no proposals
            log.warning("the draft model failed, decoding this step without proposals: %s", exc)
            for req_id in limits:
                self._seqs.pop(req_id).kv.free()
            return {}
        return {req_id: Proposal(tuple(p), tuple(others[req_id]) if self.alternatives else ())
                for req_id, p in proposals.items() if p}

    def _pick(self, row: torch.Tensor, chain: list[int], others: list[tuple[int, ...]]) -> None:
        """The draft's greedy token from ``row`` onto ``chain``; its next most likely ones onto
        ``others`` (the position's alternatives)."""
        token = int(torch.argmax(row))
        chain.append(token)
        if self.alternatives:
            best = torch.topk(row, min(self.alternatives + 1, row.shape[-1])).indices.tolist()
            others.append(tuple(t for t in best if t != token)[:self.alternatives])

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


