"""One sweep: every unit of the model, in order, over one packed batch of tokens.

For each unit the runner takes its weights — resident ones from the device pool, streamed
ones from the ``WeightStream`` (whose reads are already running ahead) — runs the adapter's
forward function in the compute worker, and releases the staging slot. If a unit fails
half-way, the rest of this sweep's streamed units are still taken and released so the
stream stays aligned with the next sweep.

On CUDA (``device.DevicePath``) the worker issues each unit's kernels on the compute stream: it
makes the stream wait for the unit's upload event, records an event before and after the
unit's kernels, and returns without waiting for them; the unit's staging slot goes back to
the ring when the "after" event has completed. An embedding kept in host memory is looked
up on the host and only its rows are copied. The sweep ends by copying the logits to the
host, which waits for the whole sweep; the events then give the device's busy time per
unit, so ``gpu_busy_s / gpu_span_s`` is the fraction of the sweep the GPU computed, and the
rest the time it sat waiting for weights.

With a paged KV store (``kv_store``) the runner drives the kv stages (``stages/kv.py``): before
the first unit it gives kv_load the plan of the off-device blocks the sweep's attention will
take, in sweep order (``plan_loads``), so their reads start at once and run ahead through the
whole sweep; after each decoder layer's compute it tells the stages the layer is done (its read
buffers are free, its new blocks are written to their tiers, off the compute thread); the
sweep ends once every spill has landed, so a spill fault is in this sweep's ``failures``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from tierflow.adapters import Adapter, ModelSpec, UnitWeights
from tierflow.adapters.base import LAYER
from tierflow.adapters.blas import SERIAL_BLAS_MACS, serial_blas
from tierflow.adapters.tree import TreeMask
from tierflow.pipeline.device import Event
from tierflow.pipeline.executor import ComputeWorker
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.device import DevicePath
from tierflow.stages.experts import ExpertStage
from tierflow.stages.kv import KVRead, KVStages, plan_loads
from tierflow.stages.kv_device import DeviceKV
from tierflow.stages.read import WeightStream, cast_weights
from tierflow.tiers.kv.handle import KVHandle
from tierflow.tiers.kv.paged import KVStore


@dataclass(frozen=True, slots=True)
class SweepBatch:
    token_ids: torch.Tensor              # [num_tokens] int64, packed over sequences
    positions: torch.Tensor              # [num_tokens] int64
    seq_slices: tuple[slice, ...]
    seq_starts: tuple[int, ...]
    kv: tuple[KVHandle, ...]             # one KV handle per sequence
    logit_rows: torch.Tensor             # packed rows whose logits are returned
    # sequence index → the candidate tree of its chunk (speculative decoding); others are causal
    trees: Mapping[int, TreeMask] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep hands back to the driver."""
    logits: torch.Tensor                           # [len(batch.logit_rows), vocab] float32, on the host
    failures: Mapping[int, BaseException]          # sequence index in the batch → why it alone failed
    gpu_busy_s: float = 0.0                        # CUDA: device time inside this sweep's unit kernels
    gpu_span_s: float = 0.0                        # CUDA: device time from its first kernel to its last


class SweepRunner:
    def __init__(self, spec: ModelSpec, adapter: Adapter, resident: dict[int, UnitWeights],
                 stream: WeightStream | None, worker: ComputeWorker, dtype: torch.dtype, *,
                 mlp_chunk_tokens: int | None = None, experts: ExpertStage | None = None,
                 tracer: Tracer = NULL_TRACER, device: DevicePath | None = None,
                 kv_store: KVStore | None = None) -> None:
        self.spec, self.adapter, self.resident = spec, adapter, resident
        self.device = device
        self._events: list[tuple[int, Event, Event]] = []     # this sweep's (unit, before, after), CUDA
        self.stream, self.worker, self.dtype = stream, worker, dtype
        self.mlp_chunk_tokens, self.experts, self.tracer = mlp_chunk_tokens, experts, tracer
        self._moe_units = {layer + 1 for layer in spec.moe_layers} if experts is not None else set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_sweeps = 0
        self.kv: KVStages | None = None
        if kv_store is not None:
            self.kv = KVStages(kv_store, DeviceKV(kv_store, device.ops, device.compute) if device else None)

    async def run(self, batch: SweepBatch) -> SweepResult:
        """Run every unit over ``batch``. A sequence whose KV fails (or that the adapter refuses)
        is reported in ``SweepResult.failures`` and the others go on; a unit that fails for all
        raises."""
        self.num_sweeps += 1
        self._loop = asyncio.get_running_loop()
        hidden: Any = batch
        unit = 0
        busy_before, span_before = (self.device.gpu_busy_s, self.device.gpu_span_s) if self.device else (0.0, 0.0)
        started = time.perf_counter()
        self._events = []
        if self.device is not None and self.device.staging is not None:
            self.device.staging.begin_sweep()
        if self.kv is not None:
            def failed(i: int) -> bool:
                return batch.kv[i].failure is not None

            # the next sweep, if every sequence goes on: each from where this sweep leaves it; a
            # linear layer's state is written anew by this sweep after its compute, so the reads
            # ahead stop there rather than race that write
            after = tuple(start + s.stop - s.start for start, s in zip(batch.seq_starts, batch.seq_slices))
            layout = self.kv.store.layout

            def ahead(layer: int) -> Sequence[KVRead] | None:
                return None if layout.keeps_state(layer) else plan_loads(self.spec, batch.kv, after, failed,
                                                                         (layer,)).reads

            self.kv.begin(plan_loads(self.spec, batch.kv, batch.seq_starts, failed), batch.kv, ahead=ahead)
        try:
            for unit in range(self.spec.num_units):
                hidden = await self._unit(unit, hidden, batch)
            if self.device is not None:     # waits for the sweep's kernels
                hidden = await self.worker.run(self._to_host, hidden)
        except Exception:
            await self._skip_rest(unit + 1)
            raise
        finally:
            if self.kv is not None:         # every spill has landed: a fault is in this sweep's failures
                await self.kv.end()
            self.tracer.span("sweeps", f"sweep {self.num_sweeps}", started, time.perf_counter(),
                             tokens=len(batch.token_ids), sequences=len(batch.seq_slices))
        failures = dict(self._ctx.refused)
        failures.update({i: kv.failure for i, kv in enumerate(batch.kv) if kv.failure is not None and i not in failures})
        busy, span = (self.device.gpu_busy_s, self.device.gpu_span_s) if self.device else (0.0, 0.0)
        return SweepResult(hidden, failures, busy - busy_before, span - span_before)

    def _to_host(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits on the host; then the device timing of the sweep, which is complete."""
        assert self.device is not None
        ops, compute = self.device.ops, self.device.compute
        with ops.using(compute):
            logits = logits.to("cpu")
            ops.record(compute).synchronize()      # the copy waited for the sweep; this says so explicitly
        d, events = self.device, self._events
        if events:
            busy = sum(before.elapsed_time(after) for _, before, after in events) / 1e3
            d.gpu_busy_s += busy
            d.gpu_span_s += events[0][1].elapsed_time(events[-1][2]) / 1e3
            if self.tracer.enabled:
                for unit, before, after in events:
                    self.tracer.span("gpu compute", self.spec.unit_name(unit), d.timeline.time_of(before),
                                     d.timeline.time_of(after))
        if d.uploader is not None:
            d.uploader.collect()
        return logits

    async def _unit(self, unit: int, hidden: Any, batch: SweepBatch) -> Any:
        if unit in self._moe_units:
            assert self.experts is not None
            self.experts.layer_started(unit - 1)
        try:
            at_hand = self.resident.get(unit)
            if at_hand is None and self.device is not None:
                at_hand = self.device.host_units.get(unit)
            if at_hand is not None:
                return (await self.worker.run(self._compute, unit, at_hand, hidden, batch, None))[0]
            assert self.stream is not None
            loaded = await self.stream.next(unit)
            done: Event | None = None
            try:
                hidden, done = await self.worker.run(self._compute, unit, loaded.weights, hidden, batch, loaded.ready)
                return hidden
            finally:
                # CPU compute has finished when the worker returns; on CUDA the slot goes back
                # once the event after the unit's kernels has completed on the device.
                if done is None and self.device is not None:
                    done = self.device.ops.record(self.device.compute)
                self.stream.release(loaded, after=done)
        finally:
            if unit in self._moe_units:
                assert self.experts is not None
                self.experts.release(unit - 1)

    def _fetch_experts(self, layer: int, experts: Sequence[int]) -> Mapping[int, UnitWeights]:
        """Runs in the compute worker (a MoE layer's router has spoken): the expert stage
        works on the event loop, the layer waits for its experts."""
        assert self.experts is not None and self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.experts.get(layer, experts), self._loop).result()

    def _compute(self, unit: int, weights: UnitWeights, hidden: Any, batch: SweepBatch,
                 ready: Event | None) -> tuple[Any, Event | None]:
        started = time.perf_counter()
        try:
            if self.device is None:
                out = self._forward(unit, weights, hidden, batch)
                self._layer_done(unit)
                return out, None
            ops, compute = self.device.ops, self.device.compute
            with ops.using(compute):
                if ready is not None:
                    ops.wait(compute, ready)
                before = ops.record(compute)
                out = self._forward(unit, weights, hidden, batch)
                self._layer_done(unit)
                after = ops.record(compute)
            self._events.append((unit, before, after))
            return out, after
        finally:
            if self.tracer.enabled:
                self.tracer.span("compute", self.spec.unit_name(unit), started, time.perf_counter())

    def _layer_done(self, unit: int) -> None:
        if self.kv is not None and self.spec.unit_kind(unit) == LAYER:
            self.kv.after_layer(unit - 1)

    def _forward(self, unit: int, weights: UnitWeights, hidden: Any, batch: SweepBatch) -> Any:
        on_host = self.device is not None and unit in self.device.host_units
        if unit == 0:
            placed = batch if self.device is None else self.device.to_device(batch)
            ctx = self.adapter.make_context(self.spec, placed.positions, placed.seq_slices, placed.seq_starts,
                                            placed.kv, placed.logit_rows, self.dtype)
            self._ctx = replace(ctx, mlp_chunk_tokens=self.mlp_chunk_tokens,
                                experts=self._fetch_experts if self.experts is not None else None,
                                trees={i: tree.on(placed.positions.device) for i, tree in batch.trees.items()})
            hidden = placed.token_ids if not on_host else batch.token_ids
        weights = cast_weights(dict(weights), self.dtype)
        # on the CPU, a unit whose every product is small (a decode token's projections) keeps
        # MKL off its thread team: the other core stays free for the KV readers (adapters/blas.py)
        small = self.device is None and unit not in self._moe_units and len(batch.token_ids) * max(
            (w.numel() for w in weights.values() if w.dim() == 2), default=0) < SERIAL_BLAS_MACS
        with torch.inference_mode(), serial_blas(small):
            out = self.adapter.forward_unit(self.spec, unit, weights, hidden, self._ctx)
        if on_host:        # only the looked-up rows go to the device
            out = self.device.upload(out)
        return out

    async def _skip_rest(self, first: int) -> None:
        """Take and release the rest of a failed sweep's streamed units. On CUDA a unit's upload
        may still be in flight: its slot goes back only after an event of the compute stream,
        made to wait for the upload first — never while a copy still reads or writes it."""
        if self.stream is None:
            return
        for unit in range(first, self.spec.num_units):
            if unit in self.resident:
                continue
            try:
                loaded = await self.stream.next(unit)
            except Exception:  # the sweep already failed; this unit only needs its slot back
                continue
            after: Event | None = None
            if self.device is not None:
                ops, compute = self.device.ops, self.device.compute
                if loaded.ready is not None:
                    ops.wait(compute, loaded.ready)
                after = ops.record(compute)
            self.stream.release(loaded, after=after)
