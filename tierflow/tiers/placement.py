"""Placement: which units stay resident in device memory and which stream from disk.

A pure function of sizes and a budget — no torch, no I/O — so it is tested with synthetic
inputs, and the measuring planner can later feed it (or replace it) without touching the
engine. The device budget holds: resident units + staging slots (one per unit in flight,
each as large as the largest streamed unit's read) + the fixed part (KV reservation and
activation workspace).

Every byte streamed from disk costs the same time per token, so the objective is the
fewest bytes streamed per sweep; the staging slots (as large as the largest streamed unit)
are what make the choice of *which* units stay resident matter. Tied embeddings make the
embedding and the head one
group (both resident, sharing the tensor, or both streamed, the head reading it again).
"""

from __future__ import annotations

from dataclasses import dataclass

from tierflow.errors import TierCapacityError

DEVICE = "device"
DISK = "disk"


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    resident_bytes: tuple[int, ...]      # per unit: device bytes when resident (compute dtype)
    stream_bytes: tuple[int, ...]        # per unit: bytes of one read into a staging slot
    convert_bytes: tuple[int, ...]       # per unit: extra device bytes while a streamed unit is cast
    fixed_bytes: int                     # KV reservation + activation workspace
    num_slots: int                       # staging slots = prefetch depth + 1
    budget_bytes: int | None             # None: no cap
    tied: tuple[int, int] | None = None  # (embedding unit, head unit) sharing one tensor
    tied_bytes: int = 0                  # resident bytes of that shared tensor


@dataclass(frozen=True, slots=True)
class Placement:
    tiers: tuple[str, ...]       # per unit: "device" | "disk"
    num_slots: int               # staging slots (0 when nothing streams)
    slot_bytes: int              # size of one staging slot
    convert_bytes: int           # workspace for casting a streamed unit
    resident_bytes: int
    fixed_bytes: int
    budget_bytes: int | None

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(u for u, tier in enumerate(self.tiers) if tier == DISK)

    @property
    def staging_bytes(self) -> int:
        return self.num_slots * self.slot_bytes + self.convert_bytes

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.staging_bytes + self.fixed_bytes


def _groups(req: PlacementRequest) -> list[tuple[int, ...]]:
    units = range(len(req.resident_bytes))
    groups = [(u,) for u in units if not req.tied or u not in req.tied]
    if req.tied:
        groups.append(req.tied)
    return groups


def evaluate(req: PlacementRequest, resident: set[int]) -> Placement:
    """The placement that keeps exactly ``resident`` on the device (budget not checked)."""
    streamed = [u for u in range(len(req.resident_bytes)) if u not in resident]
    resident_bytes = sum(req.resident_bytes[u] for u in resident)
    if req.tied and set(req.tied) <= resident:
        resident_bytes -= req.tied_bytes
    slot = max((req.stream_bytes[u] for u in streamed), default=0)
    convert = max((req.convert_bytes[u] for u in streamed), default=0)
    return Placement(tuple(DEVICE if u in resident else DISK for u in range(len(req.resident_bytes))),
                     req.num_slots if streamed else 0, slot, convert, resident_bytes, req.fixed_bytes,
                     req.budget_bytes)


def _larger_than(req: PlacementRequest, groups: list[tuple[int, ...]], slot_bytes: int) -> set[int]:
    """Units of every group that has a unit too large to stream through ``slot_bytes`` slots."""
    return {u for g in groups if any(req.stream_bytes[u] > slot_bytes for u in g) for u in g}


def place_units(req: PlacementRequest) -> Placement:
    """Keep as much resident as fits; raise TierCapacityError if even streaming does not fit.

    Staging slots are as large as the largest streamed unit, so for every candidate slot
    size the units larger than it are forced resident first; the rest are then added
    largest first while they fit. Of these candidates the one streaming the fewest bytes
    per sweep wins (ties: the least memory)."""
    everything = set(range(len(req.resident_bytes)))
    if req.budget_bytes is None:
        return evaluate(req, everything)
    groups = sorted(_groups(req), key=lambda g: (-sum(req.resident_bytes[u] for u in g), g))
    candidates = []
    for slot in sorted({0, *req.stream_bytes}):
        resident = _larger_than(req, groups, slot)
        if evaluate(req, resident).total_bytes > req.budget_bytes:
            continue
        for group in groups:
            if evaluate(req, resident | set(group)).total_bytes <= req.budget_bytes:
                resident |= set(group)
        candidates.append(evaluate(req, resident))
    if not candidates:
        least = min((evaluate(req, _larger_than(req, groups, slot)) for slot in set(req.stream_bytes)),
                    key=lambda p: p.total_bytes)
        raise TierCapacityError(
            f"device_memory_bytes={req.budget_bytes} is too small: the least this model needs is "
            f"{least.total_bytes} bytes ({least.num_slots} staging slots x {least.slot_bytes} + cast workspace "
            f"{least.convert_bytes} + resident {least.resident_bytes} + KV reservation and activations "
            f"{least.fixed_bytes}). Raise the budget by {least.total_bytes - req.budget_bytes} bytes, or lower "
            "prefetch_depth, kv_reserve_tokens or prefill_chunk_tokens.")
    return min(candidates, key=lambda p: (sum(req.stream_bytes[u] for u in p.streamed), p.total_bytes))
