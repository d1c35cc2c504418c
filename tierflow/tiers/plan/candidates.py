"""How the planner's candidates are made, and what the least demanding one lacks when none fits.

A candidate fills the tiers in one order (largest units first, smallest first; weights
before KV, KV before weights) for one staging-slot cap, prefetch depth and prefill chunk,
until the first item that does not fit. ``capacity_error`` says, for the least demanding
candidate, which budget is short and by how much. Pure: no torch, no I/O.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

from tierflow.errors import TierCapacityError
from tierflow.tiers.plan.costmodel import DEVICE, DISK, HOST
from tierflow.tiers.plan.search import Search
from tierflow.tiers.plan.state import State

_KV = "kv"


def fill_orders(s: Search) -> Iterator[list[Any]]:
    """Fill orders. On CUDA an embedding kept on the host costs nothing per sweep (only the
    looked-up rows are copied), so it comes last; otherwise every weight byte off the device
    costs the same per sweep, and the orders differ in unit size and in KV's turn."""
    free = [g for g in s.groups if not any(u in s.pins for u in g)]
    size = lambda g: sum(s.model.units[u].resident_bytes for u in g)   # noqa: E731
    last = lambda g: not s.hw.is_cpu and g == (0,)                     # noqa: E731
    for by_size in (sorted(free, key=lambda g: (last(g), -size(g), g)),
                    sorted(free, key=lambda g: (last(g), size(g), g))):
        yield by_size + [_KV]
        yield [_KV] + by_size


def slot_caps(s: Search) -> list[float]:
    """Staging-slot sizes to try: one per cluster of unit sizes within 2% of each other (layers
    differ by a few pages of alignment; forcing the slightly larger ones resident would save
    a few KiB of staging and scatter the placement), plus no cap."""
    clusters: list[list[int]] = []
    for size in sorted({max(u.stream_bytes, u.resident_bytes) for u in s.model.units}):
        if clusters and size <= clusters[-1][0] * 1.02:
            clusters[-1][1] = size
        else:
            clusters.append([size, size])
    return [float(high) for _, high in clusters] + [math.inf]


def forced_state(s: Search, depth: int, chunk: int, cap: float) -> State:
    """A placement with only what must be off the disk: the pinned units, and the units too
    large to stream through slots of ``cap`` bytes."""
    st = State(s, depth, chunk)
    for u, tier in s.pins.items():
        st.tiers[u] = tier
    for group in s.groups:
        too_big = any(max(s.model.units[u].stream_bytes, s.model.units[u].resident_bytes) > cap for u in group)
        if too_big and all(u not in s.pins for u in group):
            for u in group:     # on CUDA an embedding on the host needs no staging slot
                st.tiers[u] = HOST if not s.hw.is_cpu and group == (0,) else DEVICE
    return st


def candidate(s: Search, depth: int, chunk: int, order: list[Any], cap: float) -> State | None:
    st = forced_state(s, depth, chunk, cap)
    if not st.fits():
        return None
    for tier in (DEVICE,) if s.hw.is_cpu else (DEVICE, HOST):
        for item in order:
            if item == _KV:
                if not st.try_kv(tier):
                    break
            elif st.tiers[item[0]] == DISK and not st.try_units(item, tier):
                break
    return st


def kv_fits(s: Search, st: State) -> bool:
    """The KV left on disk is within the disk's KV cap and the spill directory's free space."""
    spilled = st.kv[DISK]
    if spilled > s.kv_caps.get(DISK, spilled):
        return False
    return s.hw.disk_free_bytes is None or spilled * s.kv_block_bytes <= s.hw.disk_free_bytes


def least_state(s: Search, depth: int, chunk: int, cap: float) -> State:
    """The least demanding placement for a slot size: the forced one, with KV on disk except
    what the disk's KV cap forbids."""
    st = forced_state(s, depth, chunk, cap)
    excess = max(0, st.kv[DISK] - s.kv_caps.get(DISK, st.kv[DISK]))
    for tier in (HOST, DEVICE):
        if tier == HOST and s.hw.is_cpu:
            continue
        moved = min(excess, s.kv_caps.get(tier, excess))
        st.kv[DISK] -= moved
        st.kv[tier] += moved
        excess -= moved
    return st


def _overhead_text(st: State) -> str:
    o = st.device_overhead()
    if not o.total_bytes:
        return ""
    return (f", overhead {o.total_bytes}: runtime {o.runtime_bytes}{' (assumed)' if o.runtime_assumed else ''}, "
            f"allocator rounding {o.rounding_bytes}, KV growth {o.kv_growth_bytes}")


def capacity_error(s: Search, depths: Sequence[int], chunks: Sequence[int]) -> TierCapacityError:
    """Name the budget that is short, and by how much, for the least demanding placement."""
    def shortfall(st: State) -> int:
        return sum(max(0, m.total - m.budget) for m in st.memory().values())

    least = min((least_state(s, min(depths), min(chunks), cap) for cap in slot_caps(s)), key=shortfall)
    parts = []
    for tier, m in least.memory().items():
        if m.total > m.budget:
            parts.append(f"{tier} memory is short by {m.total - m.budget} bytes: the least it needs is {m.total} "
                         f"(weights that cannot stream {m.weights}, staging {m.staging}, KV {m.kv}, "
                         f"activations {m.workspace}{_overhead_text(least) if tier == DEVICE else ''}) and its "
                         f"budget is {m.budget}")
    if least.kv[DISK] > s.kv_caps.get(DISK, least.kv[DISK]):
        parts.append(f"{least.kv[DISK] * s.kv_block_bytes} bytes of KV cache fit no tier that may hold them")
    if not parts:
        parts.append(f"disk space is short: the KV cache needs {least.kv_blocks * s.kv_block_bytes} bytes and the "
                     f"spill directory has {s.hw.disk_free_bytes} free")
    pinned = f" (with {len(s.pins)} units pinned by overrides.tiers)" if s.pins else ""
    return TierCapacityError("no placement fits" + pinned + ": " + "; ".join(parts) +
                             ". Raise that budget, or lower the context (the KV reservation), the concurrency, "
                             "the prefill chunk or the prefetch depth.")
