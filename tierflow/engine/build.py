"""Building the runtime an engine serves with, on the CPU or on CUDA, and taking it down.

``build_runtime`` checks the paths the config names (``paths``), opens the checkpoint, plans,
and makes every part in dependency order: the disk reader and compute worker, the kvikio reader
(CUDA, when chosen), the paged KV store (sized by ``kv_store.open_kv_store``), the prefix cache,
the weights' placement (``placement.start_host`` or ``start_device``), the expert stage and the
sweep runner. Each part's clean-up is pushed on one ``AsyncExitStack`` as it is made, so a
failure half-way gives back exactly what was made, and ``Runtime.aclose`` takes everything down
in the reverse order (the compute worker stops, and the device drains, before the pinned memory
they use is freed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from tierflow.adapters import ModelSpec
from tierflow.config import EngineConfig
from tierflow.engine.kv_store import open_kv_store
from tierflow.engine.loading import load_tokenizer, resolve_device, resolve_dtype
from tierflow.engine.paths import check_directories, check_trace_path, expanded
from tierflow.engine.placement import Placement, start_device, start_host
from tierflow.engine.planning import EnginePlan, plan_engine
from tierflow.pipeline.cuda import EventBridge
from tierflow.pipeline.device import DeviceOps, TorchCuda
from tierflow.pipeline.executor import ComputeWorker
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.compute import SweepRunner
from tierflow.stages.device import DevicePath
from tierflow.stages.experts import ExpertStage
from tierflow.stages.prefix import PrefixReuse
from tierflow.stages.read import WeightStream
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.io.kvikio import KvikioReader, choose_reader
from tierflow.tiers.io.pinned import PinnedArena
from tierflow.tiers.io.cachedir import remove_empty_dirs
from tierflow.tiers.io.reader import DiskReader
from tierflow.tiers.kv.contiguous import SequenceKV
from tierflow.tiers.kv.paged import KVStore
from tierflow.tiers.plan.costmodel import ModelCosts
from tierflow.tiers.plan.hardware import HardwareProfile
from tierflow.tiers.plan.plan import TierPlan

R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    """Everything an open engine runs with (None: the engine has no such part)."""
    index: CheckpointIndex
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    planned: EnginePlan
    reader: DiskReader                      # O_DIRECT reads of the checkpoint's files
    worker: ComputeWorker                   # the one thread compute runs in
    tracer: Tracer
    stack: AsyncExitStack                   # every part's clean-up, in the order they were made
    runner: SweepRunner | None = None       # made last: runs sweeps over the parts below
    ops: DeviceOps | None = None            # CUDA: the device's streams and memory
    kvikio: KvikioReader | None = None      # CUDA: streamed units read straight into device memory
    kv_store: KVStore | None = None         # the paged KV cache (None: contiguous KV per request)
    prefix: PrefixReuse | None = None       # the prefix cache
    placement: Placement | None = None      # resident units and the weight stream
    experts: ExpertStage | None = None      # mixture-of-experts models: the routed experts
    draft: "Runtime | None" = None          # speculative decoding with a draft model: its own runtime, resident

    @property
    def spec(self) -> ModelSpec:
        return self.index.spec

    @property
    def plan(self) -> TierPlan:
        return self.planned.plan

    @property
    def hardware(self) -> HardwareProfile:
        return self.planned.hardware

    @property
    def costs(self) -> ModelCosts:
        return self.planned.costs

    @property
    def stream(self) -> WeightStream | None:
        return self.placement.stream if self.placement is not None else None

    @property
    def device_path(self) -> DevicePath | None:
        return self.placement.path if self.placement is not None else None

    @property
    def arena(self) -> PinnedArena | None:
        return self.placement.arena if self.placement is not None else None

    @property
    def bridge(self) -> EventBridge | None:
        return self.placement.bridge if self.placement is not None else None

    def contiguous_kv(self, most_tokens: int) -> SequenceKV:
        """A sequence's contiguous KV on the device (no paged store): room for ``most_tokens``,
        the layers' sliding windows as rings that take the plan's prefill chunk."""
        spec = self.spec
        return SequenceKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype=self.dtype, device=self.device,
                          max_tokens=most_tokens, windows=[spec.window(layer) for layer in range(spec.num_layers)],
                          max_chunk_tokens=self.plan.prefill_chunk_tokens)

    def on_device(self, fn: Callable[..., R], *args: Any) -> R:
        """In the compute worker: ``fn`` with its device work on the compute stream (on CUDA), so
        it is ordered with the sweeps' kernels and what it allocates belongs to that stream, not
        to the legacy default stream."""
        path = self.device_path
        if path is None:
            return fn(*args)
        with path.ops.using(path.compute):
            return fn(*args)

    async def aclose(self) -> None:
        await self.stack.aclose()


async def build_runtime(model: str | Path, config: EngineConfig, device_ops: DeviceOps | None) -> Runtime:
    """Open ``model`` and make every part of its runtime; on failure, give back what was made
    (and remove the directories this open created, as far as they are empty)."""
    check_trace_path(config)
    made_dirs = check_directories(config)
    try:
        return await _build(model, config, device_ops)
    except BaseException:
        for directory in made_dirs:
            remove_empty_dirs(directory)
        raise


async def _build(model: str | Path, config: EngineConfig, device_ops: DeviceOps | None) -> Runtime:
    index = await asyncio.to_thread(CheckpointIndex.open, model)
    ops = device_ops
    if ops is None:
        device = resolve_device(config.device)
        ops = TorchCuda(device) if device.type == "cuda" else None
    device = ops.device if ops is not None else torch.device("cpu")
    dtype = resolve_dtype(config.dtype, index.spec.checkpoint_dtype, device)
    planned = await plan_engine(index, config, device, dtype, kind=ops.kind if ops is not None else "cpu")
    tokenizer = await asyncio.to_thread(load_tokenizer, index.directory)
    plan = planned.plan
    tracer = Tracer() if config.trace_path is not None else NULL_TRACER
    stack = AsyncExitStack()
    reader = DiskReader(index.files, io_threads=plan.io_threads, block_bytes=plan.io_block_bytes,
                        direct_io=config.direct_io)
    stack.callback(reader.close)
    if config.trace_path is not None:           # runs last: the trace covers the whole run
        stack.push_async_callback(_write_trace, tracer, config.trace_path)
    worker = ComputeWorker(bind_thread=ops.bind_thread if ops is not None else None)
    stack.callback(worker.close)
    rt = Runtime(index, config, device, dtype, tokenizer, planned, reader, worker, tracer, stack, ops=ops)
    try:
        await _start(rt)
    except BaseException:
        await stack.aclose()
        raise
    return rt


async def _start(rt: Runtime) -> None:
    config, plan, ops, stack = rt.config, rt.plan, rt.ops, rt.stack
    if ops is not None and choose_reader(rt.planned.overrides.reader, ops.kind) == "kvikio":
        rt.kvikio = KvikioReader(rt.index.files, threads=plan.io_threads, task_bytes=plan.io_block_bytes)
        stack.callback(rt.kvikio.close)
    if config.paged_kv:
        rt.kv_store = open_kv_store(config, plan, rt.spec, rt.costs, rt.dtype, rt.device, rt.tracer, ops)
        stack.callback(rt.kv_store.close)
        if ops is not None:          # page-locking the KV host pool takes a while: off the event loop
            await asyncio.to_thread(rt.kv_store.pin_host_memory, ops.pin, ops.unpin)
    if config.prefix_cache:
        rt.prefix = await asyncio.to_thread(functools.partial(
            PrefixReuse.for_model, rt.index, rt.dtype, plan.kv_block_tokens, memory_bytes=config.prefix_cache_bytes,
            directory=expanded(config.prefix_cache_dir), disk_bytes=config.prefix_cache_disk_bytes))
        stack.push_async_callback(asyncio.to_thread, rt.prefix.cache.close)
    if ops is None:
        rt.placement = await start_host(rt.index, plan, rt.dtype, rt.reader, rt.worker, tracer=rt.tracer)
    else:
        rt.placement = await start_device(ops, rt.index, plan, rt.dtype, rt.reader, rt.worker,
                                          direct_reader=rt.kvikio, tracer=rt.tracer)
        if rt.placement.arena is not None:
            stack.callback(rt.placement.arena.close)
        if rt.placement.bridge is not None:
            stack.callback(rt.placement.bridge.close)
        if rt.placement.path is not None:
            stack.callback(rt.placement.path.close)
        stack.callback(ops.synchronize)         # the device is done with pinned memory before it is freed
    stack.callback(rt.worker.close)             # compute stops before the device drains
    if rt.stream is not None:
        rt.stream.start()
        stack.push_async_callback(rt.stream.close)
    if rt.index.experts:
        capacity = config.expert_cache_bytes
        rt.experts = ExpertStage(rt.index.experts, rt.reader, rt.dtype,
                                 plan.expert_cache_bytes if capacity is None else capacity,
                                 read_all=config.expert_reads == "all", tracer=rt.tracer, ops=ops,
                                 compute=rt.device_path.compute if rt.device_path is not None else None)
        stack.push_async_callback(rt.experts.close)
        if rt.experts.capacity_bytes >= rt.experts.total_bytes:   # every expert fits: keep them all
            await rt.experts.preload()
    rt.runner = SweepRunner(rt.spec, rt.index.adapter, rt.placement.resident, rt.stream, rt.worker, rt.dtype,
                            mlp_chunk_tokens=plan.mlp_chunk_tokens, experts=rt.experts, tracer=rt.tracer,
                            device=rt.device_path, kv_store=rt.kv_store)
    speculative = config.speculative
    if speculative is not None and speculative.method == "draft":
        from tierflow.engine.proposers import open_draft     # it builds a runtime of its own
        rt.draft = await open_draft(rt, speculative)
        stack.push_async_callback(rt.draft.aclose)


async def _write_trace(tracer: Tracer, path: str | os.PathLike[str]) -> None:
    try:
        await asyncio.to_thread(tracer.write, path)
    except OSError as error:
        log.error("could not write the trace to %s: %s", path, error)


