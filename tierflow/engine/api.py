"""The Engine: open a checkpoint, place its units, and serve generate / stream calls.

One driver task runs sweeps: ``plan = batcher.schedule(); logits = await runner.run(batch);
sample; batcher.update(plan, appended)``. Requests only talk to the driver through their
own record and an event, so a failing request (or a failing sweep) is reported to the
requests it concerns and the engine goes on serving the others. Finished or cancelled
sequences are removed, and their KV freed, at the next sweep boundary.

On CUDA the engine also owns the device path: a compute stream and a copy stream, the
pinned host arena (host-resident units and the read buffers of streamed ones), a staging
slot in device memory per read buffer, and the event bridge through which slots return to
the ring when the device has finished with them (see ``stages.upload`` and ``sweep``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

import torch

from tierflow.adapters.attention import attention_backend
from tierflow.config import EngineConfig, SamplingParams
from tierflow.errors import (ConfigError, EngineClosedError, PromptError, RequestError, RequestTimeoutError,
                             TierCapacityError, TierflowError)
from tierflow.outputs import Completion, EngineStats, StageTimes, StreamChunk
from tierflow.pipeline.batcher import Batcher, KVCapacityError, SweepPlan
from tierflow.pipeline.cuda import DeviceOps, EventBridge, TorchCuda
from tierflow.pipeline.executor import ComputeWorker
from tierflow.pipeline.ring import SlotRing
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.engine.loading import eos_ids, load_tokenizer, resolve_device, resolve_dtype
from tierflow.engine.prompts import Detokenizer, Prompt, encode_prompt
from tierflow.engine.requests import Request, deadline_after
from tierflow.engine.sampling import make_generator, sample
from tierflow.stages.experts import ExpertStage
from tierflow.stages.prefix import PrefixReuse
from tierflow.engine.build import open_kv_store, start_device
from tierflow.stages.resident import load_units
from tierflow.stages.upload import SameDevice
from tierflow.stages.read import WeightStream
from tierflow.stages.compute import DevicePath, SweepBatch, SweepRunner
from tierflow.engine.planning import EnginePlan, plan_engine
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import DEVICE, sweep_times
from tierflow.tiers.kv.contiguous import SequenceKV
from tierflow.tiers.io.kvikio import KvikioReader, choose_reader
from tierflow.tiers.kv.paged import KVStore
from tierflow.tiers.io.pinned import PinnedArena
from tierflow.tiers.io.reader import DiskReader, aligned_empty, trim_heap

log = logging.getLogger(__name__)
TRIM_AFTER_TOKENS = 256     # sweeps of at least this many tokens return their freed heap memory to the OS


class Engine:
    """Use ``await Engine.open(model, EngineConfig(...))``; then ``generate`` / ``stream``."""

    def __init__(self, index: CheckpointIndex, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 tokenizer: Any, planned: EnginePlan, reader: DiskReader, worker: ComputeWorker,
                 ops: DeviceOps | None = None) -> None:
        self.index, self.config, self.device, self.dtype = index, config, device, dtype
        self._ops = ops                              # the device path (CUDA); None on CPU
        self._device_path: DevicePath | None = None
        self._bridge: EventBridge | None = None
        self._arena: PinnedArena | None = None
        self._kvikio: KvikioReader | None = None     # streamed units read straight into device memory
        self.spec, self.tokenizer = index.spec, tokenizer
        self.plan, self.hardware, self.costs = planned.plan, planned.hardware, planned.costs
        self.overrides = planned.overrides
        self.hardware_source = planned.provenance
        self._reader, self._worker = reader, worker
        self._eos_ids = eos_ids(index, tokenizer)
        self.max_context_tokens = min(config.max_context_tokens or 2**62, self.spec.max_position_embeddings)
        self._kv_store: KVStore | None = None        # made in _start when the KV cache is paged
        self._prefix: PrefixReuse | None = None      # made in _start when the prefix cache is on
        self._tracer = Tracer() if config.trace_path is not None else NULL_TRACER
        kv_tokens = self.plan.kv_blocks[DEVICE] // max(1, self.spec.num_layers) * self.plan.kv_block_tokens
        self._batcher = Batcher(max_num_seqs=config.max_num_seqs, max_sweep_tokens=self.plan.prefill_chunk_tokens,
                                kv_capacity_tokens=kv_tokens)
        self._requests: dict[int, Request] = {}
        self._to_remove: set[int] = set()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._closed = False
        self._driver: asyncio.Task[None] | None = None
        self._stream: WeightStream | None = None
        self._experts: ExpertStage | None = None     # mixture-of-experts models: the routed experts
        self._runner: SweepRunner | None = None
        self._tokens_generated = self._prompt_tokens = self._prompt_tokens_cached = 0
        self._decode_sweeps = 0
        self._predicted = [0.0, 0.0, 0.0, 0.0]    # disk, pcie, compute, total: summed over decode sweeps
        self._measured = [0.0, 0.0, 0.0, 0.0]

    # ----------------------------------------------------------------------------- lifecycle
    @classmethod
    async def open(cls, model: str | Path, config: EngineConfig | None = None, *,
                   device_ops: DeviceOps | None = None) -> "Engine":
        """Open ``model`` (a local directory, a GGUF file or a hub id in the local cache).
        ``device_ops`` replaces the CUDA device's streams and memory (for other backends, or
        ``tierflow.testing.SimulatedCuda`` in tests); by default ``config.device`` decides."""
        config = config or EngineConfig()
        if config.trace_path is not None:
            parent = Path(config.trace_path).expanduser().absolute().parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise ConfigError(f"EngineConfig.trace_path {str(config.trace_path)!r}: the directory {parent} does "
                                  "not exist or is not writable")
        index = await asyncio.to_thread(CheckpointIndex.open, model)
        ops = device_ops
        if ops is None:
            device = resolve_device(config.device)
            ops = TorchCuda(device) if device.type == "cuda" else None
        device = ops.device if ops is not None else torch.device("cpu")
        dtype = resolve_dtype(config.dtype, index.spec.checkpoint_dtype, device)
        planned = await plan_engine(index, config, device, dtype, kind=ops.kind if ops is not None else "cpu")
        tokenizer = await asyncio.to_thread(load_tokenizer, index.directory)
        reader = DiskReader(index.files, io_threads=planned.plan.io_threads, block_bytes=planned.plan.io_block_bytes,
                            direct_io=config.direct_io)
        engine = cls(index, config, device, dtype, tokenizer, planned, reader, ComputeWorker(), ops)
        try:
            if ops is not None and choose_reader(planned.overrides.reader, ops.kind) == "kvikio":
                engine._kvikio = KvikioReader(index.files, threads=planned.plan.io_threads,
                                              task_bytes=planned.plan.io_block_bytes)
            await engine._start()
        except BaseException:
            await engine.close()
            raise
        plan = planned.plan
        log.info("opened %s on %s: %d units resident, %d streamed, dtype %s, attention %s; predicted %.4f s per "
                 "token (%s bound)", index.directory, device, len(index.units) - len(plan.streamed),
                 len(plan.streamed), dtype, engine.attention_backend, plan.predicted.decode_s_per_token,
                 plan.predicted.bottleneck)
        return engine

    async def _start(self) -> None:
        if self.config.paged_kv:
            self._kv_store = open_kv_store(self.config, self.plan, self.spec, self.dtype, self.device,
                                                self._tracer)
            if self._ops is not None:
                self._kv_store.pin_host_memory(self._ops.pin, self._ops.unpin)
            self._batcher.kv_capacity_tokens = self._kv_store.capacity_tokens
        if self.config.prefix_cache:
            self._prefix = await asyncio.to_thread(PrefixReuse.open, self.index, self.config, self.dtype,
                                                   self.plan.kv_block_tokens)
        if self._ops is None:
            resident, _ = await load_units(self.index, self.plan.tiers, self._reader, self._worker, self.dtype)
            streamed = [self.index.units[u] for u in self.plan.streamed]
            if streamed:
                ring = SlotRing([aligned_empty(self.plan.device_slot_bytes) for _ in range(self.plan.num_slots)])
                self._stream = WeightStream(streamed, self._reader, ring, SameDevice(), self._tracer)
        else:
            started = await start_device(self._ops, self.index, self.plan, self.dtype, self._reader, self._worker,
                                         direct_reader=self._kvikio, tracer=self._tracer)
            resident, self._stream, self._device_path = started.resident, started.stream, started.path
            self._arena, self._bridge = started.arena, started.bridge
        if self._stream is not None:
            self._stream.start()
        if self.index.experts:
            capacity = self.config.expert_cache_bytes
            self._experts = ExpertStage(self.index.experts, self._reader, self.dtype,
                                        self.plan.expert_cache_bytes if capacity is None else capacity,
                                        read_all=self.config.expert_reads == "all", tracer=self._tracer,
                                        device=self.device)
            if self._experts.capacity_bytes >= self._experts.total_bytes:   # every expert fits: keep them all
                await self._experts.preload()
        self._runner = SweepRunner(self.spec, self.index.adapter, resident, self._stream, self._worker, self.dtype,
                                   mlp_chunk_tokens=self.plan.mlp_chunk_tokens, experts=self._experts,
                                   tracer=self._tracer, device=self._device_path)
        self._driver = asyncio.create_task(self._drive(), name="tierflow-driver")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        for req in list(self._requests.values()):
            self._finish(req, error=EngineClosedError("the engine was closed while this request ran"))
        if self._stream is not None:
            await self._stream.close()
        if self._experts is not None:
            await self._experts.close()
        self._worker.close()
        if self._ops is not None:
            self._ops.synchronize()
        if self._bridge is not None:
            self._bridge.close()
        if self._arena is not None:
            self._arena.close()
        if self._kv_store is not None:
            self._kv_store.close()
        if self._prefix is not None:
            await asyncio.to_thread(self._prefix.cache.close)
        self._reader.close()
        if self._kvikio is not None:
            self._kvikio.close()
        if self.config.trace_path is not None:
            try:
                await asyncio.to_thread(self._tracer.write, self.config.trace_path)
            except OSError as exc:
                log.error("could not write the trace to %s: %s", self.config.trace_path, exc)

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
        return self._closed

    # ----------------------------------------------------------------------------- requests
    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, *,
                       timeout_s: float | None = None) -> Completion:
        """Generate a completion. ``timeout_s`` bounds the whole request (queueing included):
        past it the request is cancelled and ``RequestTimeoutError`` raised."""
        req = self._submit(prompt, params or SamplingParams())
        await self._wait(req, deadline_after(timeout_s))
        return Completion(req.detok.text, tuple(req.output_ids),
                          req.finish_reason or "stop", tuple(req.prompt_ids),
                          req.first_token_s - req.submitted_s, req.finished_s - req.submitted_s,
                          req.cached_tokens)

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None, *,
                     timeout_s: float | None = None) -> AsyncIterator[StreamChunk]:
        """Stream a completion chunk by chunk; leaving the loop early cancels the request."""
        req = self._submit(prompt, params or SamplingParams())
        deadline = deadline_after(timeout_s)
        sent = 0
        try:
            while True:
                await self._changed(req, deadline)
                if req.error is not None:
                    raise req.error
                new_ids = tuple(req.output_ids[sent:])
                sent = len(req.output_ids)
                text = req.detok.take(final=req.done)
                if new_ids or text or req.done:
                    yield StreamChunk(text, new_ids, req.finish_reason)
                if req.done:
                    return
        finally:
            if not req.done:
                self._cancel(req)

    async def logits(self, prompt: Prompt) -> torch.Tensor:
        """Float32 logits [num_prompt_tokens, vocab] of every prompt position (for checks
        against other implementations and for scoring)."""
        req = self._submit(prompt, SamplingParams(max_new_tokens=1), score=True)
        await self._wait(req, None)
        return torch.cat(req.logits)

    async def _changed(self, req: Request, deadline: float | None) -> None:
        """Wait for news of ``req``; past ``deadline`` (loop time) cancel it and raise."""
        if deadline is None:
            await req.changed.wait()
        else:
            try:
                await asyncio.wait_for(req.changed.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                self._cancel(req)
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
                self._cancel(req)
        if req.error is not None:
            raise req.error

    def _submit(self, prompt: Prompt, params: SamplingParams, score: bool = False) -> Request:
        if self._closed:
            raise EngineClosedError("the engine is closed; open a new one with Engine.open()")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = encode_prompt(prompt, self.tokenizer, self.spec.vocab_size)
        if len(ids) + (0 if score else 1) > self.max_context_tokens:
            raise PromptError(f"the prompt has {len(ids)} tokens but the context window holds "
                              f"{self.max_context_tokens} (prompt plus at least one new token); shorten it")
        most = len(ids) if score else min(len(ids) + params.max_new_tokens, self.max_context_tokens)
        seq_id = next(self._ids)
        try:
            self._batcher.add(seq_id, len(ids), most)
        except KVCapacityError:
            raise TierCapacityError(
                f"the prompt ({len(ids)} tokens) and up to {most - len(ids)} new tokens need KV cache for {most} "
                f"tokens, but this engine's KV capacity is {self._batcher.kv_capacity_tokens} tokens for all "
                "requests together; shorten the prompt, lower max_new_tokens, or open the engine with a larger "
                "kv_reserve_tokens") from None
        kv: Any = self._kv_store.sequence(seq_id) if self._kv_store is not None else \
            SequenceKV(self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, dtype=self.dtype,
                       device=self.device, max_tokens=most)
        req = Request(seq_id, ids, params, kv, Detokenizer(self.tokenizer, params.stop),
                       make_generator(params), score=score)
        self._requests[req.id] = req
        self._wake.set()
        return req

    def _cancel(self, req: Request) -> None:
        if not req.done:
            req.finish_reason = "cancelled"
        self._to_remove.add(req.id)
        self._wake.set()

    def _finish(self, req: Request, reason: str | None = None, error: BaseException | None = None) -> None:
        if not req.done:
            req.finish_reason, req.error = reason, error
            req.finished_s = time.perf_counter()
        self._to_remove.add(req.id)
        req.changed.set()

    # ----------------------------------------------------------------------------- driver
    async def _drive(self) -> None:
        while True:
            for seq_id in list(self._to_remove):
                self._batcher.remove(seq_id)
                req = self._requests.pop(seq_id, None)
                if req is not None:
                    if req.error is None:
                        await self._remember(req)
                    req.kv.free()
            self._to_remove.clear()
            # a request submitted while another's prefix is attached is admitted by the next round
            while admitted := self._batcher.admit():
                for seq_id in admitted:
                    await self._attach_prefix(self._requests[seq_id])
            plan = self._batcher.schedule()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            reqs = [self._requests[s.seq_id] for s in plan.seqs]
            decode = all(s.num_tokens == 1 and s.start >= len(r.prompt_ids) for s, r in zip(plan.seqs, reqs))
            before = self._stage_clock()
            try:
                result = await self._runner.run(self._batch(plan, reqs))
                tokens = await self._worker.run(self._sample, plan, reqs, result.logits)
            except Exception as exc:   # the sweep failed: fail its requests, keep serving
                log.warning("sweep failed: %s", exc)
                for req in reqs:
                    self._finish(req, error=exc if isinstance(exc, TierflowError) else
                                 RequestError(f"request failed in a sweep: {exc!r}"))
                continue
            for index, error in result.failures.items():   # KV faults of single sequences
                log.warning("request %d failed in a sweep: %s", reqs[index].id, error)
                self._finish(reqs[index], error=error)
            if decode:
                self._account_decode(plan, before)
            elif plan.num_tokens >= TRIM_AFTER_TOKENS:     # a prefill chunk: hand its activations back
                await self._worker.run(trim_heap)
            self._batcher.update(plan, self._apply(plan, reqs, tokens))
            for item, req in zip(plan.seqs, reqs):   # a prompt's prefill just completed: offer its blocks
                if item.sample and item.start + item.num_tokens == len(req.prompt_ids) and not req.done:
                    await self._remember(req)
            for req in reqs:
                req.changed.set()

    async def _attach_prefix(self, req: Request) -> None:
        """Reuse the longest cached prefix of a just-admitted request's prompt."""
        if self._prefix is None or req.score:
            return
        started = time.perf_counter()
        try:
            req.cached_tokens = await self._worker.run(self._prefix.attach, req.kv, req.prompt_ids)
        except Exception as exc:     # the KV it was copied into failed (a spill fault): only this request fails
            log.warning("request %d failed while reusing its cached prefix: %s", req.id, exc)
            self._finish(req, error=exc if isinstance(exc, TierflowError) else
                         RequestError(f"reusing the cached prefix failed: {exc!r}"))
            return
        self._tracer.span("prefix cache", "reuse", started, time.perf_counter(), request=req.id,
                          tokens=req.cached_tokens)
        if req.cached_tokens:
            self._batcher.mark_computed(req.id, req.cached_tokens)
            self._prompt_tokens_cached += req.cached_tokens

    async def _remember(self, req: Request) -> None:
        """Offer a request's full KV blocks to the prefix cache (never fails the request)."""
        if self._prefix is None or req.score:
            return
        try:
            req.remembered_blocks = await self._worker.run(self._prefix.remember, req.kv,
                                                           req.prompt_ids + req.output_ids, req.remembered_blocks)
        except Exception as exc:     # noqa: BLE001 - the cache only misses these blocks
            log.warning("could not add request %d's KV to the prefix cache: %s", req.id, exc)

    def _batch(self, plan: SweepPlan, reqs: list[Request]) -> SweepBatch:
        ids, positions, slices, rows = [], [], [], []
        offset = 0
        for item, req in zip(plan.seqs, reqs):
            span = range(item.start, item.start + item.num_tokens)
            ids += [req.token(p) for p in span]
            positions += list(span)
            slices.append(slice(offset, offset + item.num_tokens))
            if req.score:
                rows += range(offset, offset + item.num_tokens)
            elif item.sample:
                rows.append(offset + item.num_tokens - 1)
            offset += item.num_tokens
            self._prompt_tokens += sum(1 for p in span if p < len(req.prompt_ids))
        # on the host: the sweep moves what the device needs there (a host embedding reads the ids here)
        return SweepBatch(torch.tensor(ids), torch.tensor(positions), tuple(slices), tuple(s.start for s in plan.seqs),
                          tuple(r.kv for r in reqs), torch.tensor(rows, dtype=torch.long))

    def _sample(self, plan: SweepPlan, reqs: list[Request], logits: torch.Tensor) -> list[int | None]:
        """Runs in the compute worker: one sampled token per sequence (None: nothing sampled)."""
        tokens: list[int | None] = []
        row = 0
        logits = logits.cpu()
        for item, req in zip(plan.seqs, reqs):
            if req.score:
                req.logits.append(logits[row:row + item.num_tokens])
                row += item.num_tokens
                tokens.append(None)
            elif item.sample:
                tokens.append(sample(logits[row], req.params, req.generator))
                row += 1
            else:
                tokens.append(None)
        return tokens

    def _apply(self, plan: SweepPlan, reqs: list[Request], tokens: list[int | None]) -> set[int]:
        appended: set[int] = set()
        for item, req, token in zip(plan.seqs, reqs, tokens):
            if req.done:         # cancelled while the sweep ran
                continue
            if req.score and item.sample:
                self._finish(req, "stop")
            elif token is not None:
                self._append(req, token)
                appended.add(req.id)
        return appended

    def _append(self, req: Request, token: int) -> None:
        if not req.output_ids:
            req.first_token_s = time.perf_counter()
        req.output_ids.append(token)
        self._tokens_generated += 1
        params = req.params
        is_stop_token = token in params.stop_token_ids or (token in self._eos_ids and not params.ignore_eos)
        if not is_stop_token:
            req.detok.add(token)
        if is_stop_token or req.detok.stopped:
            self._finish(req, "stop")
        elif len(req.output_ids) >= params.max_new_tokens or \
                len(req.prompt_ids) + len(req.output_ids) >= self.max_context_tokens:
            self._finish(req, "length")

    # ----------------------------------------------------------------------------- stats
    def _stage_clock(self) -> tuple[float, float, float, float]:
        """Cumulative (disk busy, upload, compute busy, wall) seconds."""
        stream = self._stream.statistics() if self._stream else None
        compute = self._device_path.gpu_busy_s if self._device_path else self._worker.statistics().busy_s
        return (stream.busy_s if stream else 0.0, stream.upload_s if stream else 0.0, compute, time.perf_counter())

    def _account_decode(self, plan: SweepPlan, before: tuple[float, float, float, float]) -> None:
        """Add one decode sweep's measured stage seconds, and the cost model's prediction for
        exactly that sweep (its sequences and their context lengths), to the running sums."""
        now = self._stage_clock()
        k = len(plan.seqs)
        tokens = sum(s.start + 1 for s in plan.seqs)
        kv_bytes = tokens * self.costs.kv_bytes_per_token
        kv = self._kv_store.spread(kv_bytes) if self._kv_store is not None else {DEVICE: kv_bytes}
        predicted = sweep_times(self.costs, self.hardware, self.plan.tiers, kv, tokens=k, logit_rows=k, queries=1,
                                keys=tokens // k, sequences=k,
                                expert_cache_bytes=self._experts.capacity_bytes if self._experts else 0)
        self._decode_sweeps += 1
        for i, value in enumerate((predicted.disk_s, predicted.pcie_s, predicted.compute_s, predicted.total_s)):
            self._predicted[i] += value
        for i in range(4):
            self._measured[i] += now[i] - before[i]

    def pipeline_statistics(self) -> dict[str, Any]:
        """Every bounded queue, ring and budget of the pipeline (``statistics()`` of each): the
        batcher (running / waiting sequences, KV tokens reserved), the staging ring and the
        channel of read-ahead units, the compute worker, and the live requests."""
        stream = self._stream
        return {"batcher": self._batcher.statistics(), "requests": len(self._requests),
                "ring": stream.ring_statistics() if stream else None,
                "channel": stream.channel_statistics() if stream else None,
                "worker": self._worker.statistics(),
                "kv_blocks": self._kv_store.statistics() if self._kv_store is not None else None,
                "experts": self._experts.statistics() if self._experts is not None else None,
                "prefix_cache": self._prefix.cache.statistics() if self._prefix is not None else None,
                "pinned": self._arena.statistics() if self._arena is not None else None,
                "events": self._bridge.statistics() if self._bridge is not None else None}

    def stats(self) -> EngineStats:
        reader = self._reader.statistics()
        stream = self._stream.statistics() if self._stream else None
        modes = set(reader.modes.values())
        kvikio = self._kvikio.statistics() if self._kvikio is not None else None
        io_mode = modes.pop() if len(modes) == 1 else "mixed"
        if kvikio is not None:      # streamed units through kvikio, the rest through the O_DIRECT reader
            io_mode += f"+kvikio-{kvikio.mode}"
        n = max(1, self._decode_sweeps)
        experts = self._experts.statistics() if self._experts is not None else None
        device = self.plan.memory[DEVICE]
        return EngineStats(
            bytes_read_from_disk=reader.bytes_read + (kvikio.bytes_read if kvikio else 0),
            bytes_streamed=stream.bytes_read if stream else 0,
            tokens_generated=self._tokens_generated, prompt_tokens=self._prompt_tokens,
            sweeps=self._runner.num_sweeps if self._runner else 0,
            read_s=stream.read_s if stream else 0.0, upload_s=stream.upload_s if stream else 0.0,
            compute_s=self._stage_clock()[2], stall_s=stream.stall_s if stream else 0.0,
            io_mode=io_mode,
            units_resident=len(self.plan.tiers) - len(self.plan.streamed),
            units_streamed=len(self.plan.streamed), resident_bytes=device.weights, staging_bytes=device.staging,
            decode_sweeps=self._decode_sweeps,
            predicted_decode=StageTimes(*(x / n for x in self._predicted)),
            measured_decode=StageTimes(*(x / n for x in self._measured)),
            prompt_tokens_cached=self._prompt_tokens_cached,
            expert_requests=experts.requests if experts else 0, expert_hits=experts.hits if experts else 0,
            expert_bytes_read=experts.bytes_read if experts else 0,
            gpu_busy_s=self._device_path.gpu_busy_s if self._device_path else None,
            gpu_span_s=self._device_path.gpu_span_s if self._device_path else None)
