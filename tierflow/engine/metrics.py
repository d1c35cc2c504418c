"""What the engine measures, as frozen records: stage clocks, predicted against measured decode
sweeps, and the statistics of every bounded queue, ring and budget of the pipeline.

A decode sweep's measured stage seconds are differences of two ``StageClock`` readings taken
around it; its prediction is the cost model's for exactly that sweep (its sequences and their
context lengths, the KV spread over the tiers as the blocks in use are). ``DecodeMeter``
keeps the two sums, so ``EngineStats`` can show them side by side per decode sweep.

The plan's own prediction (``TierPlan.predicted``) comes from the same function,
``timing.decode_times``, on the same hardware and placement, but for the workload the plan
was made for: every sequence at the full context the engine reserves. The sweeps that ran
are usually shorter (less attention, less KV off the device), so their largest stage may
differ from the plan's bottleneck; the reports say which is which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tierflow.engine.build import Runtime
from tierflow.outputs import EngineStats, SpeculativeStats, StageTimes
from tierflow.pipeline.cuda import BridgeStats
from tierflow.pipeline.executor import WorkerStats
from tierflow.pipeline.ring import ChannelStats, RingStats
from tierflow.pipeline.sweep_plan import BatcherStats, SweepPlan
from tierflow.stages.experts import ExpertStats
from tierflow.tiers.io.pinned import ArenaStats
from tierflow.tiers.kv.blocks import KVPoolsStats
from tierflow.tiers.kv.prefix import PrefixCacheStats
from tierflow.tiers.plan.costmodel import DEVICE
from tierflow.tiers.plan.timing import decode_times


@dataclass(frozen=True, slots=True)
class StageClock:
    """Cumulative seconds of each stage since the engine opened, read at one instant."""
    disk_s: float           # time at least one weight read was in flight
    upload_s: float         # host → device copies of streamed units
    compute_s: float        # compute busy: the worker's time on CPU, the GPU's kernel time on CUDA
    wall_s: float           # ``time.perf_counter()`` when read

    def minus(self, earlier: "StageClock") -> StageTimes:
        return StageTimes(self.disk_s - earlier.disk_s, self.upload_s - earlier.upload_s,
                          self.compute_s - earlier.compute_s, self.wall_s - earlier.wall_s)


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """``statistics()`` of every bounded queue, ring and budget of the pipeline (None where the
    engine has no such part)."""
    batcher: BatcherStats                  # running / waiting sequences, KV blocks held, preemptions
    requests: int                          # live requests (submitted, not yet removed)
    ring: RingStats | None                 # the staging ring of streamed units
    channel: ChannelStats | None           # the read-ahead units waiting for compute
    worker: WorkerStats                    # the compute worker
    kv_blocks: KVPoolsStats | None         # the paged KV store's pools per tier (None: contiguous KV)
    experts: ExpertStats | None            # the expert stage (mixture-of-experts models)
    prefix_cache: PrefixCacheStats | None  # the prefix cache
    pinned: ArenaStats | None              # CUDA: the pinned host arena
    events: BridgeStats | None             # CUDA: the CUDA-event → asyncio bridge


def _add(a: StageTimes, b: StageTimes) -> StageTimes:
    return StageTimes(a.disk_s + b.disk_s, a.pcie_s + b.pcie_s, a.compute_s + b.compute_s, a.total_s + b.total_s)


class DecodeMeter:
    """Predicted and measured stage seconds, summed over decode sweeps."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self.sweeps = 0
        self.predicted = StageTimes()
        self.measured = StageTimes()

    def clock(self) -> StageClock:
        rt = self._rt
        stream = rt.stream.statistics() if rt.stream else None
        compute = rt.device_path.gpu_busy_s if rt.device_path else rt.worker.statistics().busy_s
        return StageClock(stream.busy_s if stream else 0.0, stream.upload_s if stream else 0.0, compute,
                          time.perf_counter())

    def add(self, plan: SweepPlan, before: StageClock) -> None:
        """One decode sweep of ``plan`` ended; ``before`` was read when it started."""
        rt, now = self._rt, self.clock()
        contexts = [s.start + 1 for s in plan.seqs]
        kv_bytes = sum(rt.costs.kv_read_bytes(c) for c in contexts)   # a window's at most per layer
        kv = rt.kv_store.spread(kv_bytes) if rt.kv_store is not None else {DEVICE: kv_bytes}
        p = decode_times(rt.costs, rt.hardware, rt.plan.tiers, kv, contexts,
                         rt.experts.capacity_bytes if rt.experts else 0)
        self.sweeps += 1
        self.predicted = _add(self.predicted, StageTimes(p.disk_s, p.pcie_s, p.compute_s, p.total_s))
        self.measured = _add(self.measured, now.minus(before))

    def per_sweep(self, times: StageTimes) -> StageTimes:
        n = max(1, self.sweeps)
        return StageTimes(times.disk_s / n, times.pcie_s / n, times.compute_s / n, times.total_s / n)


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Tokens the driver has seen, since the engine opened."""
    generated: int                          # sampled tokens
    prompt: int                             # prompt tokens computed (prefilled)
    prompt_cached: int                      # prompt tokens reused from the prefix cache instead
    restored: int = 0                       # tokens of preempted requests the prefix cache gave back
    speculative: SpeculativeStats | None = None   # speculative decoding's counts (None: off)


def engine_stats(rt: Runtime, meter: DecodeMeter, tokens: TokenCounts, batcher: BatcherStats) -> EngineStats:
    """The engine's ``EngineStats`` from its runtime's parts."""
    reader = rt.reader.statistics()
    stream = rt.stream.statistics() if rt.stream else None
    modes = set(reader.modes.values())
    kvikio = rt.kvikio.statistics() if rt.kvikio is not None else None
    io_mode = modes.pop() if len(modes) == 1 else "mixed"
    if kvikio is not None:      # streamed units through kvikio, the rest through the O_DIRECT reader
        io_mode += f"+kvikio-{kvikio.mode}"
    experts = rt.experts.statistics() if rt.experts is not None else None
    device = rt.plan.memory[DEVICE]
    return EngineStats(
        bytes_read_from_disk=reader.bytes_read + (kvikio.bytes_read if kvikio else 0),
        bytes_streamed=stream.bytes_read if stream else 0,
        tokens_generated=tokens.generated, prompt_tokens=tokens.prompt,
        sweeps=rt.runner.num_sweeps,
        read_s=stream.read_s if stream else 0.0, upload_s=stream.upload_s if stream else 0.0,
        compute_s=meter.clock().compute_s, stall_s=stream.stall_s if stream else 0.0,
        io_mode=io_mode,
        units_resident=len(rt.plan.tiers) - len(rt.plan.streamed),
        units_streamed=len(rt.plan.streamed), resident_bytes=device.weights, staging_bytes=device.staging,
        decode_sweeps=meter.sweeps,
        predicted_decode=meter.per_sweep(meter.predicted),
        measured_decode=meter.per_sweep(meter.measured),
        prompt_tokens_cached=tokens.prompt_cached,
        expert_requests=experts.requests if experts else 0, expert_hits=experts.hits if experts else 0,
        expert_bytes_read=experts.bytes_read if experts else 0,
        gpu_busy_s=rt.device_path.gpu_busy_s if rt.device_path else None,
        gpu_span_s=rt.device_path.gpu_span_s if rt.device_path else None,
        kv_allocation=batcher.allocation, preemptions=batcher.preemptions,
        preempted_tokens_restored=tokens.restored,
        preempted_tokens_recomputed=max(0, batcher.preempted_tokens - tokens.restored),
        speculative=tokens.speculative)


def pipeline_stats(rt: Runtime, batcher: BatcherStats, requests: int) -> PipelineStats:
    stream = rt.stream
    return PipelineStats(
        batcher=batcher, requests=requests,
        ring=stream.ring_statistics() if stream else None,
        channel=stream.channel_statistics() if stream else None,
        worker=rt.worker.statistics(),
        kv_blocks=rt.kv_store.statistics() if rt.kv_store is not None else None,
        experts=rt.experts.statistics() if rt.experts is not None else None,
        prefix_cache=rt.prefix.cache.statistics() if rt.prefix is not None else None,
        pinned=rt.arena.statistics() if rt.arena is not None else None,
        events=rt.bridge.statistics() if rt.bridge is not None else None)
