"""The tier planner: where every unit's weights and every KV block live, and what it costs.

``plan(model, hardware, workload, overrides) -> TierPlan`` is a pure function (no torch, no
I/O), so it is tested with synthetic machines and can plan for a machine one does not have.

Objective: the least predicted seconds per generated token of the workload within the
memory budgets (each measured budget less a safety margin, or the user's cap; the device's
holds the runtime's overhead, the allocator's rounding and the KV growth transient too, as
``TierMemory.overhead``: see ``tiers.plan.overhead``): decode seconds per token plus
the prefill amortised over the new tokens, so memory goes to a larger prefill chunk only
when that saves more time than it costs decoding. Bytes of device (then host) memory go to what saves
the most time per byte: a layer kept resident saves its read (and copy) on every sweep; a
KV block kept resident saves reading it back on every sweep. Placements are built by filling
the tiers in a few orders (largest units first, smallest first; weights before KV, KV before
weights) for every staging-slot size, prefetch depth and prefill chunk, each order filled
until the first item that does not fit; the best prediction wins. Because every candidate
only moves items towards faster tiers as memory grows, and no candidate depends on
bandwidths, more memory or a faster disk never predicts a slower plan (by that objective).
"""

from __future__ import annotations

import math
from dataclasses import replace

from tierflow.errors import TierCapacityError
from tierflow.tiers.plan.candidates import candidate, capacity_error, fill_orders, kv_fits, slot_caps
from tierflow.tiers.plan.costmodel import DEVICE, ModelCosts, Workload
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides
from tierflow.tiers.plan.plan import DEFAULT_MARGIN, Prediction, TierMemory, TierPlan
from tierflow.tiers.plan.reads import io_block_for
from tierflow.tiers.plan.search import KV_BLOCK_TOKENS, expert_cache_bytes, largest_read, make_search, predict
from tierflow.tiers.plan.state import State

__all__ = ["DEFAULT_MARGIN", "KV_BLOCK_TOKENS", "Prediction", "TierMemory", "TierPlan", "largest_read",
           "minimum_device_bytes", "plan"]

PREFILL_CHUNKS = (64, 128, 256, 512, 1024, 2048, 4096)
PREFETCH_DEPTHS = (2, 1)              # the preferred depth first
DEFAULT_IO_THREADS = 4


def plan(model: ModelCosts, hw: HardwareProfile, work: Workload | None = None,
         overrides: Overrides | None = None) -> TierPlan:
    """The fastest predicted placement within the budgets; TierCapacityError when none fits."""
    work, overrides = work or Workload(), overrides or Overrides()
    s = make_search(model, hw, work, overrides)
    depths = (overrides.prefetch_depth,) if overrides.prefetch_depth else PREFETCH_DEPTHS
    total_prefill = work.concurrency * work.prompt_tokens
    chunks = (overrides.prefill_chunk_tokens,) if overrides.prefill_chunk_tokens else \
        tuple(sorted({min(c, max(PREFILL_CHUNKS[0], 2 ** math.ceil(math.log2(total_prefill))))
                      for c in PREFILL_CHUNKS}))
    best: tuple[tuple[float, ...], State, Prediction, dict[str, TierMemory]] | None = None
    for depth in depths:
        for chunk in chunks:
            for order in fill_orders(s):
                for cap in slot_caps(s):
                    st = candidate(s, depth, chunk, order, cap)
                    if st is None or not kv_fits(s, st):
                        continue
                    prediction, memory = predict(s, st)
                    key = (prediction.s_per_token, prediction.decode_s_per_token,
                           abs(depth - PREFETCH_DEPTHS[0]), prediction.peak_device_bytes + prediction.peak_host_bytes)
                    if best is None or key < best[0]:
                        best = (key, st, prediction, memory)
    if best is None:
        raise capacity_error(s, depths, chunks)
    _, st, prediction, memory = best
    device_slot, host_slot, convert = st.staging()
    streams = any(t != DEVICE for t in st.tiers)
    threads = overrides.io_threads or DEFAULT_IO_THREADS
    return TierPlan(model.name, hw.device, work, tuple(u.name for u in model.units), tuple(st.tiers),
                    dict(st.kv), KV_BLOCK_TOKENS, st.depth, st.depth + 1 if streams else 0,
                    device_slot if streams else 0, host_slot, convert, st.chunk, st.mlp_chunk,
                    threads, overrides.io_block_bytes or io_block_for(largest_read(model), threads),
                    memory, prediction, s.margin, expert_cache_bytes(s, st.memory()), st.device_overhead())


def minimum_device_bytes(model: ModelCosts, hw: HardwareProfile, work: Workload | None = None,
                         overrides: Overrides | None = None) -> int:
    """The smallest device budget (a cap, no margin) at which a plan exists."""
    overrides = overrides or Overrides()
    # room for every unit twice over, and for the device overhead (which on CUDA may dwarf a small model)
    low, high = 0, max(1, sum(u.resident_bytes + 2 * u.stream_bytes for u in model.units) * 4
                       + 2 * plan(model, replace(hw, device_memory_bytes=2**60), work,
                                  replace(overrides, device_memory_bytes=None)).device_overhead.total_bytes)
    big = replace(hw, device_memory_bytes=10 * high)
    plan(model, big, work, replace(overrides, device_memory_bytes=high))   # raises if even that cannot fit
    while high - low > 1:
        mid = (low + high) // 2
        try:
            plan(model, big, work, replace(overrides, device_memory_bytes=mid))
            high = mid
        except TierCapacityError:
            low = mid
    return high
