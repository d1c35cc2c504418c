"""The Engine: open a checkpoint, then ``generate`` / ``stream`` / ``logits``, then ``close``.

This is the public face only. ``build.build_runtime`` makes the runtime (reader, planner's
plan, KV store, prefix cache, placed weights, expert stage, sweep runner) on the CPU or on
CUDA; ``driver.Driver`` runs the sweeps; ``metrics`` turns what they measured into
``EngineStats`` and ``PipelineStats``. A request waits on its own record's event, with its
timeout, and cancelling the waiter cancels the request.

Closing gives everything back and removes the engine's files (the KV spill file). An Engine is
an async context manager, ``async with await Engine.open(...) as engine:``, so it closes however
the block is left: returning, an exception, or cancellation — which is how a signal becomes a
clean shutdown: ``loop.add_signal_handler(signal.SIGTERM, main_task.cancel)`` (``tierflow run``
does this). An engine still open when its event loop shuts down (the end of ``asyncio.run``,
which cancels every task) closes itself then: its driver task is cancelled without ``close``
having been called, and gives the runtime back before it ends. Only a process killed outright
(SIGKILL, or a SIGTERM no handler catches) leaves its spill file; the next engine to use that
``kv_cache_dir`` removes it (``tiers/io/spill.py``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from collections.abc import Mapping
from typing import Any, AsyncIterator

import torch

from tierflow.adapters.attention import attention_backend
from tierflow.config import EngineConfig, SamplingParams, engine_config_from, sampling_params_from
from tierflow.engine.build import Runtime, build_runtime
from tierflow.engine.driver import Driver
from tierflow.engine.kv_store import context_window
from tierflow.engine.metrics import PipelineStats, engine_stats, pipeline_stats
from tierflow.engine.requests import Prompt, Request, check_stop_token_ids, deadline_after, encode_prompt
from tierflow.errors import EngineClosedError, EventLoopError, PromptError, RequestTimeoutError
from tierflow.outputs import Completion, EngineStats, StreamChunk
from tierflow.pipeline.device import DeviceOps

log = logging.getLogger(__name__)


class Engine:
    """Use ``await Engine.open(model, EngineConfig(...))``; then ``generate`` / ``stream``."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = rt = runtime
        self.index, self.config, self.device, self.dtype = rt.index, rt.config, rt.device, rt.dtype
        self.spec, self.tokenizer = rt.spec, rt.tokenizer
        self.plan, self.hardware, self.costs = rt.plan, rt.hardware, rt.costs
        self.overrides, self.hardware_source = rt.planned.overrides, rt.planned.provenance
        self.max_context_tokens = context_window(rt.config, self.spec)
        self._driver = Driver(rt, self.max_context_tokens)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._released = False          # the runtime was given back (by close, or when the loop shut down)

    @classmethod
    async def open(cls, model: str | Path, config: EngineConfig | Mapping[str, Any] | None = None, *,
                   device_ops: DeviceOps | None = None) -> "Engine":
        """Open ``model`` (a local directory, a GGUF file or a hub id in the local cache).
        ``config``: an EngineConfig, a dict of its fields (``{"device": "cpu"}`` is
        ``EngineConfig(device="cpu")``; an unknown key is a ConfigError naming the closest
        field), or None for the defaults.
        ``device_ops`` replaces the CUDA device's streams and memory (for other backends, or
        ``tierflow.testing.SimulatedCuda`` in tests); by default ``config.device`` decides."""
        rt = await build_runtime(model, engine_config_from(config), device_ops)
        try:
            engine = cls(rt)
        except BaseException:
            await rt.aclose()
            raise
        engine._loop = asyncio.get_running_loop()
        engine._task = asyncio.create_task(engine._serve(), name="tierflow-driver")
        plan = rt.plan
        log.info("opened %s on %s: %d units resident, %d streamed, dtype %s, attention %s; predicted %.4f s per "
                 "token (%s bound)", rt.index.directory, rt.device, len(rt.index.units) - len(plan.streamed),
                 len(plan.streamed), rt.dtype, engine.attention_backend, plan.predicted.decode_s_per_token,
                 plan.predicted.bottleneck)
        return engine

    def _check_loop(self) -> None:
        """Raise at once when called from a loop other than the engine's: its driver task lives
        there (and is gone if that loop has ended), so a request would never be served."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            ended = " (and that loop has ended)" if self._loop.is_closed() else ""
            raise EventLoopError(f"this engine was opened on another event loop{ended}: an Engine serves the loop it "
                                 "was opened on, so open and use it inside one loop (one asyncio.run around all of "
                                 "it), or use tierflow.SyncEngine, which runs its own")

    async def _serve(self) -> None:
        """The driver task. Cancelled without ``close`` (the loop is shutting down with the engine
        open) it gives the runtime back before it ends; the engine, bound to a loop that is
        gone, is unusable after."""
        try:
            await self._driver.run()
        except asyncio.CancelledError:
            if not self._closed and not self._released:
                self._released = True
                log.info("the event loop shut down with the engine open: closing it")
                self._fail_requests("the event loop this engine served shut down while this request ran")
                await self._runtime.aclose()
            raise
        except Exception as exc:      # a driver bug: fail what waits on it rather than leave it hanging
            log.exception("the engine's driver failed")
            self._fail_requests(f"the engine's driver failed: {type(exc).__name__}: {exc}")
            raise

    def _fail_requests(self, why: str) -> None:
        for req in list(self._driver.requests.values()):
            self._driver.finish(req, error=EngineClosedError(why))

    async def close(self) -> None:
        if self._closed:
            return
        self._check_loop()
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_requests("the engine was closed while this request ran")
        if not self._released:
            self._released = True
            await self._runtime.aclose()

    async def __aenter__(self) -> "Engine":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def attention_backend(self) -> str:
        """The attention kernels this engine's sequences use: "flash-attn", "sdpa" or "sdpa-cpu"."""
        return attention_backend(self.device, self.dtype, head_dim=self.spec.head_dim)

    @property
    def closed(self) -> bool:
        """Closed, or given back when its event loop shut down."""
        return self._closed or self._released

    # ----------------------------------------------------------------------------- requests
    async def generate(self, prompt: Prompt, params: SamplingParams | Mapping[str, Any] | None = None, *,
                       timeout_s: float | None = None) -> Completion:
        """Generate a completion. ``params``: SamplingParams, a dict of its fields
        (``{"max_new_tokens": 8}``; an unknown key is a SamplingError naming the closest field),
        or None for the defaults. A bad prompt is a PromptError, bad params (stop_token_ids
        beyond the vocabulary included) a SamplingError, raised before anything is queued: the
        engine serves the next request as if this one had not come. ``timeout_s`` bounds the
        whole request (queueing included): past it the request is cancelled and
        ``RequestTimeoutError`` raised."""
        req = self._submit(prompt, params)
        await self._wait(req, deadline_after(timeout_s))
        return Completion(req.detok.text, tuple(req.output_ids),
                          req.finish_reason or "stop", tuple(req.prompt_ids),
                          req.first_token_s - req.submitted_s, req.finished_s - req.submitted_s,
                          req.cached_tokens, tuple(req.logprobs))

    async def stream(self, prompt: Prompt, params: SamplingParams | Mapping[str, Any] | None = None, *,
                     timeout_s: float | None = None) -> AsyncIterator[StreamChunk]:
        """Stream a completion chunk by chunk; leaving the loop early cancels the request.
        ``prompt`` and ``params`` as for ``generate`` (their errors come at the first chunk)."""
        req = self._submit(prompt, params)
        deadline = deadline_after(timeout_s)
        sent = 0
        try:
            while True:
                await self._changed(req, deadline)
                if req.error is not None:
                    raise req.error
                new_ids = tuple(req.output_ids[sent:])
                logprobs = tuple(req.logprobs[sent:])
                sent = len(req.output_ids)
                text = req.detok.take(final=req.done)
                if new_ids or text or req.done:
                    yield StreamChunk(text, new_ids, req.finish_reason, logprobs, len(req.prompt_ids),
                                      req.cached_tokens)
                if req.done:
                    return
        finally:
            if not req.done:
                self._driver.cancel(req)

    async def logits(self, prompt: Prompt) -> torch.Tensor:
        """Float32 logits [num_prompt_tokens, vocab] of every prompt position (for checks
        against other implementations and for scoring)."""
        req = self._submit(prompt, SamplingParams(max_new_tokens=1), score=True)
        await self._wait(req, None)
        return torch.cat(req.logits)

    def _submit(self, prompt: Prompt, params: SamplingParams | Mapping[str, Any] | None,
                score: bool = False) -> Request:
        if self._closed:
            raise EngineClosedError("the engine is closed; open a new one with Engine.open()")
        self._check_loop()
        params = sampling_params_from(params)
        check_stop_token_ids(params, self.spec.vocab_size)
        ids = encode_prompt(prompt, self.tokenizer, self.spec.vocab_size)
        if len(ids) + (0 if score else 1) > self.max_context_tokens:
            raise PromptError(f"the prompt has {len(ids)} tokens but the context window holds "
                              f"{self.max_context_tokens} (prompt plus at least one new token); shorten it")
        return self._driver.submit(ids, params, score=score)

    async def _changed(self, req: Request, deadline: float | None) -> None:
        """Wait for news of ``req``; past ``deadline`` (loop time) cancel it and raise."""
        if deadline is None:
            await req.changed.wait()
        else:
            try:
                await asyncio.wait_for(req.changed.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                self._driver.cancel(req)
                raise RequestTimeoutError(f"the request did not finish within its timeout "
                                          f"({len(req.output_ids)} tokens generated); it was cancelled") from None
        req.changed.clear()

    async def _wait(self, req: Request, deadline: float | None) -> None:
        """Wait for ``req`` to finish; cancelling the waiter cancels the request."""
        try:
            while not req.done:
                await self._changed(req, deadline)
        finally:
            if not req.done:
                self._driver.cancel(req)
        if req.error is not None:
            raise req.error

    # ----------------------------------------------------------------------------- statistics
    def stats(self) -> EngineStats:
        return engine_stats(self._runtime, self._driver.meter, self._driver.tokens, self._driver.batcher.statistics())

    def pipeline_statistics(self) -> PipelineStats:
        """Every bounded queue, ring and budget of the pipeline (``statistics()`` of each): the
        batcher (running / waiting sequences, KV blocks held, preemptions), the staging ring and the
        channel of read-ahead units, the compute worker, the KV pools, the expert stage, the
        prefix cache, and on CUDA the pinned arena and the event bridge."""
        return pipeline_stats(self._runtime, self._driver.batcher.statistics(), len(self._driver.requests))
