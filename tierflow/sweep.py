"""One sweep: every unit of the model, in order, over one packed batch of tokens.

For each unit the runner takes its weights — resident ones from the device pool, streamed
ones from the ``WeightStream`` (whose reads are already running ahead) — runs the adapter's
forward function in the compute worker, and releases the staging slot. If a unit fails
half-way, the rest of this sweep's streamed units are still taken and released so the
stream stays aligned with the next sweep.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from tierflow.adapters import Adapter, ModelSpec, UnitWeights
import time

from tierflow.pipeline.executor import ComputeWorker
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.stages.experts import ExpertStage
from tierflow.stages.weights import WeightStream, cast_weights


@dataclass(frozen=True, slots=True)
class SweepBatch:
    token_ids: torch.Tensor              # [num_tokens] int64, packed over sequences
    positions: torch.Tensor              # [num_tokens] int64
    seq_slices: tuple[slice, ...]
    seq_starts: tuple[int, ...]
    kv: tuple[Any, ...]                  # one SequenceKV per sequence
    logit_rows: torch.Tensor             # packed rows whose logits are returned


class SweepRunner:
    def __init__(self, spec: ModelSpec, adapter: Adapter, resident: dict[int, UnitWeights],
                 stream: WeightStream | None, worker: ComputeWorker, dtype: torch.dtype, *,
                 mlp_chunk_tokens: int | None = None, experts: ExpertStage | None = None,
                 tracer: Tracer = NULL_TRACER) -> None:
        self.spec, self.adapter, self.resident = spec, adapter, resident
        self.stream, self.worker, self.dtype = stream, worker, dtype
        self.mlp_chunk_tokens, self.experts, self.tracer = mlp_chunk_tokens, experts, tracer
        self._moe_units = {layer + 1 for layer in spec.moe_layers} if experts is not None else set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.last_failures: dict[int, BaseException] = {}    # sequence index → its error, last sweep
        self.num_sweeps = 0

    async def run(self, batch: SweepBatch) -> torch.Tensor:
        """Logits [len(batch.logit_rows), vocab] in float32."""
        self.num_sweeps += 1
        self.last_failures = {}
        self._loop = asyncio.get_running_loop()
        hidden: Any = batch
        unit = 0
        started = time.perf_counter()
        try:
            for unit in range(self.spec.num_units):
                hidden = await self._unit(unit, hidden, batch)
        except Exception:
            await self._skip_rest(unit + 1)
            raise
        finally:
            self.tracer.span("sweeps", f"sweep {self.num_sweeps}", started, time.perf_counter(),
                             tokens=len(batch.token_ids), sequences=len(batch.seq_slices))
        return hidden

    async def _unit(self, unit: int, hidden: Any, batch: SweepBatch) -> Any:
        if unit in self._moe_units:
            assert self.experts is not None
            self.experts.layer_started(unit - 1)
        try:
            if unit in self.resident:
                return await self.worker.run(self._compute, unit, self.resident[unit], hidden, batch)
            assert self.stream is not None
            loaded = await self.stream.next(unit)
            try:
                return await self.worker.run(self._compute, unit, loaded.weights, hidden, batch)
            finally:
                # CPU compute has finished when the worker returns; the CUDA path releases on an event.
                self.stream.release(loaded)
        finally:
            if unit in self._moe_units:
                assert self.experts is not None
                self.experts.release(unit - 1)

    def _fetch_experts(self, layer: int, experts: Sequence[int]) -> Mapping[int, UnitWeights]:
        """Runs in the compute worker (a MoE layer's router has spoken): the expert stage
        works on the event loop, the layer waits for its experts."""
        assert self.experts is not None and self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.experts.get(layer, experts), self._loop).result()

    def _compute(self, unit: int, weights: UnitWeights, hidden: Any, batch: SweepBatch) -> Any:
        started = time.perf_counter()
        try:
            return self._forward(unit, weights, hidden, batch)
        finally:
            self.tracer.span("compute", self.spec.unit_name(unit), started, time.perf_counter())

    def _forward(self, unit: int, weights: UnitWeights, hidden: Any, batch: SweepBatch) -> Any:
        if unit == 0:
            ctx = self.adapter.make_context(self.spec, batch.positions, batch.seq_slices, batch.seq_starts,
                                            batch.kv, batch.logit_rows, self.dtype)
            self._ctx = replace(ctx, mlp_chunk_tokens=self.mlp_chunk_tokens,
                                experts=self._fetch_experts if self.experts is not None else None)
            self.last_failures = self._ctx.failures
            hidden = batch.token_ids
        weights = cast_weights(dict(weights), self.dtype)
        with torch.inference_mode():
            return self.adapter.forward_unit(self.spec, unit, weights, hidden, self._ctx)

    async def _skip_rest(self, first: int) -> None:
        if self.stream is None:
            return
        for unit in range(first, self.spec.num_units):
            if unit in self.resident:
                continue
            try:
                self.stream.release(await self.stream.next(unit))
            except Exception:  # the sweep already failed; this unit only needs its slot back
                continue
