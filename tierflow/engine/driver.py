"""The driver: one task that runs sweeps, as the design draws it.

    plan = batcher.schedule(); result = await runner.run(batch); batcher.postprocess(plan, tokens)

Between sweeps it removes finished and cancelled requests (freeing their KV, offering it to
the prefix cache), admits waiting ones (attaching a cached prefix first), and after a sweep
samples each sequence's token, lets the batcher say which tokens ended their sequence (a stop
token, or the most tokens it may reach), and finds stop strings with the detokenizer.
With speculative decoding (``engine/speculative.py``) a decoding request's proposal goes into
the sweep after its last token, verification keeps what the model agrees with, and the KV of
the rejected tokens is rolled back before the next sweep (and before the prefix cache sees it).
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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import torch

from tierflow.config import SamplingParams
from tierflow.engine.build import Runtime
from tierflow.engine.loading import eos_ids
from tierflow.engine.metrics import DecodeMeter, TokenCounts
from tierflow.engine.requests import Detokenizer, Request
from tierflow.engine.sampling import make_generator, nonfinite_rows, sample, token_logprob
from tierflow.adapters.tree import TreeMask
from tierflow.engine.proposers import DraftProposer, NgramProposer
from tierflow.engine.speculative import Candidates, SpeculationCounter, SpeculationLength, Verdict, verify
from tierflow.errors import (ConfigError, KVCapacityError, NonFiniteRow, RequestError, TierCapacityError,
                             TierflowError)
from tierflow.outputs import TokenLogprob
from tierflow.pipeline.batcher import Batcher
from tierflow.pipeline.sweep_plan import SweepPlan, TokenOutcome
from tierflow.stages.compute import SweepBatch
from tierflow.tiers.io.reader import trim_heap
from tierflow.tiers.kv.handle import KVHandle, keep_path
from tierflow.tiers.kv.layout import ContiguousLayout, KVLayout
from tierflow.tiers.plan.costmodel import DEVICE

R = TypeVar("R")

log = logging.getLogger(__name__)
TRIM_AFTER_TOKENS = 256     # sweeps of at least this many tokens return their freed heap memory to the OS


@dataclass(frozen=True, slots=True)
class Sampled:
    """What sampling a sweep's logits gave, per sequence of its plan."""

    tokens: tuple[tuple[int, ...] | None, ...]   # the tokens to append (None: nothing sampled, or failed):
                                                 # one, or after verifying proposals the accepted ones and the model's own
    logprobs: tuple[tuple[TokenLogprob, ...], ...]   # of those tokens, for requests that ask for logprobs
    failures: Mapping[int, RequestError]    # sequence index → why (its logits were not finite)
    verdicts: Mapping[int, Verdict] = field(default_factory=dict)   # sequence index → what verifying its proposal kept


class Driver:
    def __init__(self, rt: Runtime, max_context_tokens: int) -> None:
        self.rt, self.max_context_tokens = rt, max_context_tokens
        plan, spec, config = rt.plan, rt.spec, rt.config
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
        self._generated = self._prompt = self._prompt_cached = 0
        self._restored = 0          # tokens of preempted requests whose KV the prefix cache gave back
        speculative = config.speculative
        if speculative is not None and spec.linear_layers:
            raise ConfigError(f"speculative decoding cannot serve {spec.architecture}: its linear-attention layers "
                              "fold every token into one state, which cannot be rolled back past rejected tokens; "
                              "open the engine without EngineConfig.speculative", settings=("speculative",))
        self.proposer: NgramProposer | DraftProposer | None = None
        if speculative is not None:
            self.proposer = DraftProposer(rt.draft, speculative) if rt.draft is not None else NgramProposer(speculative)
        self.speculation = SpeculationCounter(speculative.method) if speculative is not None else None
        self.speculation_length = SpeculationLength(rt, speculative, self.speculation) \
            if speculative is not None else None

    def capacity_tokens(self) -> int:
        """The most tokens one sequence may reach with the whole KV cache to itself."""
        capacity = self.batcher.kv_capacity_blocks
        assert capacity is not None
        return min(self.max_context_tokens, self.layout.tokens_within(capacity, self.batcher.max_sweep_tokens))

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(self._generated, self._prompt, self._prompt_cached, self._restored,
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
            raise TierCapacityError(
                f"the prompt ({len(ids)} tokens) and up to {most - len(ids)} new tokens need KV cache for {most} "
                f"tokens, but this engine's KV cache holds at most {self.capacity_tokens()} tokens for one request; "
                f"shorten the prompt, lower max_new_tokens, or {self._capacity_remedy()}",
                settings=self._capacity_settings()) from None
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

    def _capacity_settings(self) -> tuple[str, ...]:
        """The EngineConfig fields that make the KV cache larger."""
        if self.rt.kv_store is None:
            return ("kv_reserve_tokens", "kv_cache_dir")
        return ("kv_disk_bytes", "kv_cache_dir") if self.rt.config.kv_cache_dir is not None else \
            ("kv_cache_dir", "kv_host_bytes", "kv_device_bytes")

    def _capacity_remedy(self) -> str:
        if self.rt.kv_store is None:
            return ("open the engine with a larger EngineConfig.kv_reserve_tokens, or page the KV cache to disk "
                    "with EngineConfig.kv_cache_dir")
        if self.rt.config.kv_cache_dir is not None:
            return ("give the KV spill more room: raise EngineConfig.kv_disk_bytes, or point "
                    "EngineConfig.kv_cache_dir at a disk with more free space")
        return ("let the KV cache spill to disk with EngineConfig.kv_cache_dir, or raise EngineConfig.kv_host_bytes / "
                "EngineConfig.kv_device_bytes")

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
            drafts = await self._propose()
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
            if any(item.num_draft for item in plan.seqs):
                await self._roll_back(plan, reqs, sampled, emitted, drafts)
            for item, req in zip(plan.seqs, reqs):   # a prompt's prefill just completed: offer its blocks
                if item.sample and item.start + item.num_tokens == len(req.prompt_ids) and not req.done:
                    await self._remember(req)
            for req in reqs:
                req.changed.set()

    async def _between_sweeps(self) -> None:
        for seq_id in list(self._to_remove):
            self.batcher.remove(seq_id)
            req = self.requests.pop(seq_id, None)
            if req is not None:
                if req.error is None:
                    await self._remember(req)
                req.kv.free()
        self._to_remove.clear()
        # a request submitted while another's prefix is attached is admitted by the next round
        while admitted := self.batcher.admit():
            for seq_id in admitted:
                await self._attach_prefix(self.requests[seq_id])

    async def _propose(self) -> dict[int, Candidates]:
        """Speculative decoding: each decoding request's candidates, by request id (none when
        off, or when its proposer has none); the batcher schedules those of decoding sequences."""
        if self.proposer is None:
            return {}
        wanted, widths = {}, {}
        for req in self.requests.values():
            if req.output_ids and not req.done and not req.score and self.batcher.is_decoding(req.id):
                known = req.prompt_ids + req.output_ids
                shape = self.speculation_length(len(known))
                wanted[req.id] = (known, min(shape.tokens, req.most_tokens - len(known) - 1), req.most_tokens)
                widths[req.id] = shape.width
        proposals = await self.proposer.propose_all(wanted)
        return {req_id: proposal.candidates(widths[req_id]) for req_id, proposal in proposals.items()}

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

    def _sample(self, plan: SweepPlan, reqs: list[Request], logits: torch.Tensor,
                drafts: Mapping[int, Candidates]) -> Sampled:
        """Runs in the compute worker: each sequence's tokens (None: nothing sampled) — one
        sampled token, or what verifying its proposal kept — and the sequences whose logits hold
        a NaN or an infinity, which fail."""
        tokens: list[tuple[int, ...] | None] = []
        logprobs: list[tuple[TokenLogprob, ...]] = []
        failures: dict[int, RequestError] = {}
        verdicts: dict[int, Verdict] = {}
        row = 0
        logits = logits.cpu()
        bad = nonfinite_rows(logits)
        for index, (item, req) in enumerate(zip(plan.seqs, reqs)):
            rows = range(row, row + (item.num_tokens if req.score else item.num_draft + 1 if item.sample else 0))
            row = rows.stop
            chosen: tuple[int, ...] | None = None
            if item.num_draft and not req.score:
                # only the rows the walk samples from matter: a rejected candidate's row is one plain
                # decoding never computes
                candidates = drafts[req.id]
                try:
                    verdicts[index] = verify(logits[rows.start:rows.stop], candidates.tokens, req.params,
                                             req.generator, parents=None if candidates.is_chain else candidates.parents,
                                             bad={r - rows.start for r in rows if r in bad})
                    chosen = verdicts[index].tokens
                except NonFiniteRow as exc:       # the row predicting the next kept position
                    failures[index] = _nonfinite_error(req, item.known_end + exc.depth, bad[rows.start + exc.row],
                                                       exc.depth)
            elif any(r in bad for r in rows):
                first = next(r for r in rows if r in bad)
                position = item.start + item.num_tokens + first - rows.start if not req.score \
                    else item.start + first - rows.start + 1
                failures[index] = _nonfinite_error(req, position, bad[first])
            elif req.score:
                req.logits.append(logits[rows.start:rows.stop])
            elif item.sample:
                chosen = (sample(logits[rows.start], req.params, req.generator),)
            tokens.append(chosen)
            # each token's row: the one after the path it extends (0, then each accepted candidate's)
            after = (0, *(i + 1 for i in verdicts[index].path)) if index in verdicts else range(len(chosen or ()))
            logprobs.append(tuple(token_logprob(logits[rows.start + r], token, req.params.logprobs)
                                  for r, token in zip(after, chosen))
                            if chosen is not None and req.params.logprobs is not None else ())
        return Sampled(tuple(tokens), tuple(logprobs), failures, verdicts)

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

    async def _roll_back(self, plan: SweepPlan, reqs: list[Request], sampled: Sampled, emitted: Counter[int],
                         drafts: Mapping[int, Candidates]) -> None:
        """Speculative decoding: count what verification kept, and keep only the KV of the last
        known token and of the accepted candidates (no more than were appended), moved to their
        positions' slots, before the prefix cache or the next sweep sees it."""
        cuts = []
        for index, (item, req) in enumerate(zip(plan.seqs, reqs)):
            if not item.num_draft:
                continue
            verdict = sampled.verdicts.get(index)
            if verdict is not None and self.speculation is not None:
                self.speculation.add(drafts[req.id], verdict, emitted[req.id])
            if req.error is None:
                path = verdict.path[:emitted[req.id]] if verdict is not None else ()
                cuts.append((req, item.known_end, path))
        failed = await self.rt.worker.run(self._on_device, _keep_paths, [(req.kv, n, p) for req, n, p in cuts])
        for index, exc in failed.items():       # its KV is not what its tokens say: that request fails
            req = cuts[index][0]
            log.warning("request %d: rolling back its rejected tokens' KV failed: %s", req.id, exc)
            self.finish(req, error=exc if isinstance(exc, RequestError) else
                        RequestError(f"rolling back the KV of rejected speculative tokens failed: {exc}"))

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
        if self._keep_preempted_kv(req.kv.num_tokens):
            await self._remember(req)
        await self.rt.worker.run(req.kv.free)
        req.kv = self._new_kv(req.id, req.most_tokens)
        req.remembered_blocks = 0
        req.preemptions += 1
        log.info("request %d preempted (KV cache full): %d tokens to recompute", req.id,
                 len(req.prompt_ids) + len(req.output_ids))

    def _keep_preempted_kv(self, tokens: int) -> bool:
        """Whether handing ``tokens`` of a preempted request's KV to the prefix cache (and
        reading it back on resumption) costs less than computing it again, by the plan's
        figures: the cache's memory (at about the decode rate's bandwidth) or its disk (the KV
        spill's figures) twice over, against the prefill FLOPs at the measured rate."""
        rt = self.rt
        if rt.prefix is None or not tokens:
            return False
        hw, nbytes = rt.hardware, tokens * rt.costs.kv_bytes_per_token
        gbps = (hw.decode_gbps, hw.decode_gbps) if rt.config.prefix_cache_bytes else \
            (hw.kv_write_gbps, hw.kv_read_gbps)
        keep_s = nbytes / (gbps[0] * 1e9) + nbytes / (gbps[1] * 1e9)
        recompute_s = tokens * 2 * sum(u.matmul_params for u in rt.costs.units) / (hw.prefill_tflops * 1e12)
        return keep_s < recompute_s

    # ----------------------------------------------------------------------------- prefix cache
    def _on_device(self, fn: Callable[..., R], *args: Any) -> R:
        """In the compute worker: ``fn`` with its device work on the compute stream (on CUDA), so
        it is ordered with the sweeps' kernels and what it allocates belongs to that stream, not
        to the legacy default stream."""
        path = self.rt.device_path
        if path is None:
            return fn(*args)
        with path.ops.using(path.compute):
            return fn(*args)

    async def _attach_prefix(self, req: Request) -> None:
        """Reuse the longest cached prefix of a just-admitted request's tokens (its prompt, and
        after a preemption what it generated too)."""
        prefix = self.rt.prefix
        if prefix is None or req.score:
            return
        started = time.perf_counter()
        known = req.prompt_ids + req.output_ids
        try:
            cached = await self.rt.worker.run(self._on_device, prefix.attach, req.kv, known)
        except Exception as exc:     # the KV it was copied into failed (a spill fault): only this request fails
            log.warning("request %d failed while reusing its cached prefix: %s", req.id, exc)
            self.finish(req, error=exc if isinstance(exc, TierflowError) else
                        RequestError(f"reusing the cached prefix failed: {exc!r}"))
            return
        self.rt.tracer.span("prefix cache", "reuse", started, time.perf_counter(), request=req.id, tokens=cached)
        if cached:
            self.batcher.mark_computed(req.id, cached)
            req.remembered_blocks = cached // prefix.block_tokens
            if req.preemptions:
                self._restored += cached
            else:
                req.cached_tokens = cached
                self._prompt_cached += cached

    async def _remember(self, req: Request) -> None:
        """Offer a request's full KV blocks to the prefix cache (never fails the request)."""
        prefix = self.rt.prefix
        if prefix is None or req.score:
            return
        try:
            req.remembered_blocks = await self.rt.worker.run(self._on_device, prefix.remember, req.kv,
                                                             req.prompt_ids + req.output_ids, req.remembered_blocks)
        except Exception as exc:     # noqa: BLE001 - the cache only misses these blocks
            log.warning("could not add request %d's KV to the prefix cache: %s", req.id, exc)


def _keep_paths(cuts: list[tuple[KVHandle, int, tuple[int, ...]]]) -> dict[int, Exception]:
    """Cut each handle back to its known tokens and accepted path; what failed, by index (the
    others are cut all the same)."""
    failed = {}
    with torch.inference_mode():        # the tails it writes were made by the sweeps, in inference mode
        for index, (kv, known, path) in enumerate(cuts):
            try:
                keep_path(kv, known, path)
            except Exception as exc:
                failed[index] = exc
    return failed


def _nonfinite_error(req: Request, position: int, found: str, ahead: int = 0) -> RequestError:
    """``ahead``: verified speculative tokens before the output token the logits predict."""
    what = (f"the logits predicting position {position} (prompt logits)" if req.score else
            f"the logits of output token {len(req.output_ids) + ahead} (position {position} of the sequence)")
    return RequestError(
        f"the model produced non-finite logits: {what} hold {found}, so no token can be chosen. The "
        "checkpoint's weights are damaged (NaN or inf in them: download it again), or float16 overflowed: "
        "open the engine with EngineConfig(dtype='float32') or 'bfloat16'", settings=("dtype",))
