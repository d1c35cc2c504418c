"""The driver's side of the prefix cache: what it reuses, what it offers, what it keeps.

A just-admitted request gets the longest cached prefix of the tokens it knows (its prompt, and
after a preemption what it generated too) attached to its KV, and the batcher counts those
tokens as computed; a request's full KV blocks are offered back when its prompt's prefill
completes, when it ends, and when it is preempted, if keeping them there costs less than
computing them again. The cache's work runs in the compute worker on the compute stream
(``Runtime.on_device``). It is apart from the driver because none of it changes what a sweep
computes: without a prefix cache every call here does nothing.
"""

from __future__ import annotations

import logging
import time

from tierflow.engine.build import Runtime
from tierflow.engine.requests import Request
from tierflow.errors import RequestError, TierflowError
from tierflow.pipeline.batcher import Batcher

log = logging.getLogger(__name__)


class PrefixSharing:
    """The prefix cache as the driver uses it, and the tokens it gave (for ``stats()``)."""

    def __init__(self, rt: Runtime, batcher: Batcher) -> None:
        self.rt, self.batcher = rt, batcher
        self.cached_tokens = 0      # prompt tokens whose KV the prefix cache gave
        self.restored_tokens = 0    # tokens of preempted requests whose KV the prefix cache gave back

    async def attach(self, req: Request) -> TierflowError | None:
        """Reuse the longest cached prefix of a just-admitted request's tokens (its prompt, and
        after a preemption what it generated too). Returns why the request fails, if it does."""
        prefix = self.rt.prefix
        if prefix is None or req.score:
            return None
        started = time.perf_counter()
        known = req.prompt_ids + req.output_ids
        try:
            cached = await self.rt.worker.run(self.rt.on_device, prefix.attach, req.kv, known)
        except Exception as exc:     # the KV it was copied into failed (a spill fault): only this request fails
            log.warning("request %d failed while reusing its cached prefix: %s", req.id, exc)
            return exc if isinstance(exc, TierflowError) else RequestError(f"reusing the cached prefix failed: {exc!r}")
        self.rt.tracer.span("prefix cache", "reuse", started, time.perf_counter(), request=req.id, tokens=cached)
        if cached:
            self.batcher.mark_computed(req.id, cached)
            req.remembered_blocks = cached // prefix.block_tokens
            if req.preemptions:
                self.restored_tokens += cached
            else:
                req.cached_tokens = cached
                self.cached_tokens += cached
        return None

    async def remember(self, req: Request) -> None:
        """Offer a request's full KV blocks to the prefix cache (never fails the request)."""
        prefix = self.rt.prefix
        if prefix is None or req.score:
            return
        try:
            req.remembered_blocks = await self.rt.worker.run(self.rt.on_device, prefix.remember, req.kv,
                                                             req.prompt_ids + req.output_ids, req.remembered_blocks)
        except Exception as exc:     # noqa: BLE001 - the cache only misses these blocks
            log.warning("could not add request %d's KV to the prefix cache: %s", req.id, exc)

    def keeps_preempted(self, tokens: int) -> bool:
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
