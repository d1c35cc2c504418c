"""The driver: one task that runs sweeps, as the design draws it.

    plan = batcher.schedule(); result = await runner.run(batch); batcher.postprocess(plan, tokens)

Between sweeps it removes finished and cancelled requests (freeing their KV, offering it to
the prefix cache), admits waiting ones (attaching a cached prefix first), and after a sweep
samples each sequence's token, lets the batcher say which tokens ended their sequence (a stop
token, or the most tokens it may reach), and finds stop strings with the detokenizer.
With speculative decoding (``engine/speculative.py``) a decoding request's proposal goes into
the sweep after its last token, verification keeps what the model agrees with, and the KV of
the rejected tokens is rolled back before the next sweep (and before the prefix cache sees it).
The driver keeps only the loop and the requests' records; sampling a sweep's logits
(``sweep_sampling``), the prefix cache's reuse (``prefix``) and speculative decoding's proposals
and roll-back (``spec_decode``) are each their own module's.
Requests only talk to the driver through their own record and event, so a failing request
(or a failing sweep) is reported to the requests it concerns and the driver goes on serving
the others.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
import time
from typing import Mapping

import torch

from tierflow.config import SamplingParams
from tierflow.engine.build import Runtime
from tierflow.engine.kv_store import capacity_remedy, capacity_settings
from tierflow.engine.loading import eos_ids
from tierflow.engine.metrics import DecodeMeter, TokenCounts
from tierflow.engine.prefix import PrefixSharing
from tierflow.engine.requests import Detokenizer, Request
from tierflow.engine.sampling import make_generator
from tierflow.adapters.tree import TreeMask
from tierflow.engine.spec_decode import SpecDecode
from tierflow.engine.speculative import Candidates
from tierflow.engine.sweep_sampling import Sampled, sample_sweep
from tierflow.errors import KVCapacityError, RequestError, TierCapacityError, TierflowError
from tierflow.outputs import TokenLogprob
from tierflow.pipeline.batcher import Batcher
from tierflow.pipeline.sweep_plan import SweepPlan, TokenOutcome
from tierflow.stages.compute import SweepBatch
from tierflow.tiers.io.reader import trim_heap
from tierflow.tiers.kv.handle import KVHandle
from tierflow.tiers.kv.layout import ContiguousLayout, KVLayout
from tierflow.tiers.plan.costmodel import DEVICE

log = logging.getLogger(__name__)
TRIM_AFTER_TOKENS = 256     # sweeps of at least this many tokens return their freed heap memory to the OS


class Driver:
    def __init__(self, rt: Runtime, max_context_tokens: int) -> None:
        self.rt, self.max_context_tokens = rt, max_context_tokens
        plan, config = rt.plan, rt.config
        if rt.kv_store is not None:      # paged: blocks of every tier, sliding-window rings counted
            layout, capacity = rt.kv_store.layout, rt.kv_store.tables.capacity_blocks
        else:                            # one contiguous tensor per layer, counted in token-layers as it grows
            # linear-attention layers (window 0) keep a fixed-size state, not keys that grow
            layout = rt.costs.contiguous_layout()
            capacity = plan.kv_blocks[DEVICE] * plan.kv_block_tokens
        self.layout: KVLayout | ContiguousLayout = layout
        self.batcher = Batcher(max_num_seqs=config.max_num_seqs, max_sweep_tokens=plan.prefill_chunk_tokens,
                               kv=layout, kv_capacity_blocks=capacity, allocation=config.kv_allocation,
                               watermark_blocks=max(layout.num_layers, capacity // 100))
        self.requests: dict[int, Request] = {}
        self.meter = DecodeMeter(rt)
        self._eos_ids = eos_ids(rt.index, rt.tokenizer)
        self._to_remove: set[int] = set()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._generated = self._prompt = 0
        self.prefix = PrefixSharing(rt, self.batcher)
        self.speculation = SpecDecode(rt, config.speculative, self.batcher) \
            if config.speculative is not None else None

    def capacity_tokens(self) -> int:
        """The most tokens one sequence may reach with the whole KV cache to itself."""
        capacity = self.batcher.kv_capacity_blocks
        assert capacity is not None
        return min(self.max_context_tokens, self.layout.tokens_within(capacity, self.batcher.max_sweep_tokens))

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(self._generated, self._prompt, self.prefix.cached_tokens, self.prefix.restored_tokens,
                           self.speculation.statistics() if self.speculation is not None else None)

    # ----------------------------------------------------------------------------- requests
    def submit(self, ids: list[int], params: SamplingParams, *, score: bool = False) -> Request:
        """Queue a request of prompt ``ids`` (already checked against the context window)."""
        most = len(ids) if score else min(len(ids) + params.max_new_tokens, self.max_context_tokens)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos_ids)
        seq_id = next(self._ids)
        try:
            self.batcher.add(seq_id, len(ids), most, stop_token_ids=frozenset() if score else stops)
        except KVCapacityError:
            paged = self.rt.kv_store is not None
            raise TierCapacityError(
                f"the prompt ({len(ids)} tokens) and up to {most - len(ids)} new tokens need KV cache for {most} "
                f"tokens, but this engine's KV cache holds at most {self.capacity_tokens()} tokens for one request; "
                f"shorten the prompt, lower max_new_tokens, or {capacity_remedy(self.rt.config, paged)}",
                settings=capacity_settings(self.rt.config, paged)) from None
        kv = self._new_kv(seq_id, most)
        req = Request(seq_id, ids, params, kv, Detokenizer(self.rt.tokenizer, params.stop), make_generator(params),
                      score=score, most_tokens=most)
        self.requests[req.id] = req
        self._wake.set()
        return req

    def _new_kv(self, seq_id: int, most: int) -> KVHandle:
        rt = self.rt
        if rt.kv_store is not None:
            return rt.kv_store.sequence(seq_id)
        return rt.contiguous_kv(most)

    def cancel(self, req: Request) -> None:
        if not req.done:
            req.finish_reason = "cancelled"
        self._to_remove.add(req.id)
        self._wake.set()

    def finish(self, req: Request, reason: str | None = None, error: BaseException | None = None) -> None:
        if not req.done:
            req.finish_reason, req.error = reason, error
            req.finished_s = time.perf_counter()
        self._to_remove.add(req.id)
        req.changed.set()

    # ----------------------------------------------------------------------------- the loop
    async def run(self) -> None:
        while True:
            await self._between_sweeps()
            drafts = await self.speculation.propose(self.requests.values()) if self.speculation is not None else {}
            plan = self.batcher.schedule({seq_id: len(candidates) for seq_id, candidates in drafts.items()})
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            for seq_id in plan.preempted:
                await self._preempt(self.requests[seq_id])
            if not plan.seqs:
                continue
            reqs = [self.requests[s.seq_id] for s in plan.seqs]
            # what the batcher kept of each proposal (any prefix of the flat tree is a tree)
            drafts = {s.seq_id: drafts[s.seq_id].cut(s.num_draft) for s in plan.seqs if s.num_draft}
            decode = all(s.num_tokens == 1 and s.start >= len(r.prompt_ids) for s, r in zip(plan.seqs, reqs))
            before = self.meter.clock()
            try:
                result = await self.rt.runner.run(self._batch(plan, reqs, drafts))
                sampled = await self.rt.worker.run(self._sample, plan, reqs, result.logits, drafts)
            except Exception as exc:   # the sweep failed: fail its requests, keep serving
                log.warning("sweep failed: %s", exc)
                for req in reqs:
                    self.finish(req, error=exc if isinstance(exc, TierflowError) else
                                RequestError(f"request failed in a sweep: {exc!r}"))
                continue
            # single sequences: KV faults (the sweep's) and non-finite logits (the sampler's)
            for index, error in {**sampled.failures, **result.failures}.items():
                log.warning("request %d failed in a sweep: %s", reqs[index].id, error)
                self.finish(reqs[index], error=error)
            if decode:
                self.meter.add(plan, before)
            elif plan.num_tokens >= TRIM_AFTER_TOKENS:     # a prefill chunk: hand its activations back
                await self.rt.worker.run(trim_heap)
            emitted = self._postprocess(plan, reqs, sampled)
            if self.speculation is not None and any(item.num_draft for item in plan.seqs):
                for req, error in await self.speculation.roll_back(plan, reqs, sampled, emitted, drafts):
                    self.finish(req, error=error)
            for item, req in zip(plan.seqs, reqs):   # a prompt's prefill just completed: offer its blocks
                if item.sample and item.start + item.num_tokens == len(req.prompt_ids) and not req.done:
                    await self.prefix.remember(req)
            for req in reqs:
                req.changed.set()

    async def _between_sweeps(self) -> None:
        for seq_id in list(self._to_remove):
            self.batcher.remove(seq_id)
            req = self.requests.pop(seq_id, None)
            if req is not None:
                if req.error is None:
                    await self.prefix.remember(req)
                req.kv.free()
        self._to_remove.clear()
        # a request submitted while another's prefix is attached is admitted by the next round
        while admitted := self.batcher.admit():
            for seq_id in admitted:
                req = self.requests[seq_id]
                error = await self.prefix.attach(req)
                if error is not None:
                    self.finish(req, error=error)

    def _batch(self, plan: SweepPlan, reqs: list[Request], drafts: Mapping[int, Candidates]) -> SweepBatch:
        ids, positions, slices, rows = [], [], [], []
        trees = {}
        offset = 0
        for index, (item, req) in enumerate(zip(plan.seqs, reqs)):
            span = range(item.start, item.start + item.num_tokens)
            ids += [req.token(p) for p in range(item.start, item.known_end)]
            candidates = drafts.get(req.id)
            ids += candidates.tokens if candidates is not None else []
            if candidates is not None and not candidates.is_chain:
                # a tree: its root is the one known token; each candidate sits at its depth's position
                tree = TreeMask((-1, *(parent + 1 for parent in candidates.parents)))
                trees[index] = tree
                positions += tree.positions(item.start)
            else:
                positions += list(span)
            slices.append(slice(offset, offset + item.num_tokens))
            if req.score or item.num_draft:        # prompt logits, or every position a proposal is verified at
                rows += range(offset, offset + item.num_tokens)
            elif item.sample:
                rows.append(offset + item.num_tokens - 1)
            offset += item.num_tokens
            prefilled = min(span.stop, len(req.prompt_ids))    # each prompt token counted once, recomputed or not
            self._prompt += max(0, prefilled - max(span.start, req.prompt_done))
            req.prompt_done = max(req.prompt_done, prefilled)
        # on the host: the sweep moves what the device needs there (a host embedding reads the ids here)
        return SweepBatch(torch.tensor(ids), torch.tensor(positions), tuple(slices), tuple(s.start for s in plan.seqs),
                          tuple(r.kv for r in reqs), torch.tensor(rows, dtype=torch.long), trees)

    _sample = staticmethod(sample_sweep)      # runs in the compute worker, on the sweep's logits

    def _postprocess(self, plan: SweepPlan, reqs: list[Request], sampled: Sampled) -> Counter[int]:
        """Append what the sweep sampled; returns how many tokens each request got (a stop
        string may end one before the tokens verification kept run out)."""
        for item, req in zip(plan.seqs, reqs):
            if req.score and item.sample and not req.done:
                self.finish(req, "stop")
        kept = [None if req.done else tokens for req, tokens in zip(reqs, sampled.tokens)]   # cancelled while it ran
        logprobs = {item.seq_id: iter(lp) for item, lp in zip(plan.seqs, sampled.logprobs)}
        emitted: Counter[int] = Counter()
        for outcome in self.batcher.postprocess(plan, kept):
            req = self.requests[outcome.seq_id]
            if not req.done:
                self._append(req, outcome, next(logprobs[req.id], None))
                emitted[req.id] += 1
        return emitted

    def _append(self, req: Request, outcome: TokenOutcome, logprob: TokenLogprob | None) -> None:
        if not req.output_ids:
            req.first_token_s = time.perf_counter()
        req.output_ids.append(outcome.token)
        if logprob is not None:
            req.logprobs.append(logprob)
        self._generated += 1
        if outcome.finish_reason != "stop":      # a stop token is not part of the text
            req.detok.add(outcome.token)
        if outcome.finish_reason == "stop" or req.detok.stopped:
            self.finish(req, "stop")
        elif outcome.finish_reason is not None:
            self.finish(req, outcome.finish_reason)

    async def _preempt(self, req: Request) -> None:
        """The batcher took ``req``'s KV to make room: offer its blocks to the prefix cache (which
        gives them back on resumption, if it still holds them), then drop them. The request
        waits with every token it knows and recomputes the rest when it is admitted again."""
        if self.prefix.keeps_preempted(req.kv.num_tokens):
            await self.prefix.remember(req)
        await self.rt.worker.run(req.kv.free)
        req.kv = self._new_kv(req.id, req.most_tokens)
        req.remembered_blocks = 0
        req.preemptions += 1
        log.info("request %d preempted (KV cache full): %d tokens to recompute", req.id,
                 len(req.prompt_ids) + len(req.output_ids))
