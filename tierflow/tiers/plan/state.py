"""One candidate placement as the planner's search fills it (``State``): each unit's tier,
the KV blocks on each tier, and the memory that takes per tier, staging, KV read buffers,
workspace and the device's overhead included. Pure: no torch, no I/O.
"""

from __future__ import annotations

import math

from tierflow.tiers.plan.costmodel import DEVICE, DISK, EMBED, HOST, ModelCosts, UnitCost
from tierflow.tiers.plan.overhead import (ACTIVATION_ROUNDING_BYTES, POOL_SLACK_BYTES, DeviceOverhead,
                                          reserved_bytes, rounding_bytes)
from tierflow.tiers.plan.plan import TierMemory
from tierflow.tiers.plan.reads import kv_read_window
from tierflow.tiers.plan.search import Search


def _mlp_chunk(model: ModelCosts, chunk: int, override: int | None) -> int:
    """MLP intermediates are computed this many tokens at a time, so they take no more
    memory than the rest of the layer's activations."""
    if override is not None:
        return min(override, chunk)
    per_token = 3 * model.intermediate_size * model.dtype_bytes
    rest = model.activation_bytes(chunk, 0)
    return max(1, min(chunk, 2 ** int(math.log2(max(1, rest // per_token)))))


class State:
    """One candidate placement being filled; its memory is recomputed from the tiers at each
    step (plans have tens of units, and the whole search takes tens of milliseconds)."""

    def __init__(self, s: Search, depth: int, chunk: int) -> None:
        self.s, self.depth, self.chunk = s, depth, chunk
        n = len(s.model.units)
        self.tiers = [DISK] * n
        self.kv_blocks = s.kv_blocks(chunk)
        self.kv = {DEVICE: 0, HOST: 0, DISK: self.kv_blocks}
        self.mlp_chunk = _mlp_chunk(s.model, chunk, s.overrides.mlp_chunk_tokens)
        work, model = s.work, s.model
        # a MoE layer holds the experts its tokens were routed to while it computes, cached or not
        experts = math.ceil(model.experts.distinct(chunk)) * model.experts.resident_bytes if model.experts else 0
        self.workspace = (model.activation_bytes(chunk, self.mlp_chunk)
                          + max(model.attention_bytes(min(chunk, work.prompt_tokens), work.context_tokens),
                                model.attention_bytes(1, work.context_tokens))      # a decode step's
                          + max(1, work.concurrency) * model.vocab_size * 4 + experts)

    def weights(self, tier: str) -> int:
        return self.s.model.tier_weight_bytes(self.tiers, tier)

    def _upload_bytes(self, unit: UnitCost, tier: str) -> int:
        return unit.stream_bytes if tier == DISK else unit.resident_bytes

    def staging(self) -> tuple[int, int, int]:
        """(device slot, host slot, convert workspace) for the units that are not on the device."""
        units, cpu = self.s.model.units, self.s.hw.is_cpu
        off = [(u, t) for u, t in zip(units, self.tiers) if t != DEVICE and not (t == HOST and u.kind == EMBED)]
        on_disk = [u for u, t in off if t == DISK]
        device_slot = max((self._upload_bytes(u, t) for u, t in off if cpu or u.kind != EMBED or t == DISK),
                          default=0)
        host_slot = 0 if cpu else max((u.stream_bytes for u in on_disk), default=0)
        convert = max((u.convert_bytes for u in on_disk), default=0)
        return device_slot, host_slot, convert

    def memory(self) -> dict[str, TierMemory]:
        s = self.s
        device_slot, host_slot, convert = self.staging()
        slots = self.depth + 1
        # buffers spilled KV blocks are read back into (none where KV may not spill: the search
        # starts with all KV on disk and moves it, and must not be charged for that)
        spills = self.kv[DISK] if s.kv_caps.get(DISK) != 0 else 0
        kv_reads = kv_read_window(spills, s.kv_block_bytes) * -(-s.kv_block_bytes // 4096) * 4096
        device = TierMemory(s.device_budget, self.weights(DEVICE), slots * device_slot + convert,
                            self.kv[DEVICE] * s.kv_block_bytes, self.workspace + (kv_reads if s.hw.is_cpu else 0),
                            self._overhead(slots, device_slot, convert).total_bytes)
        host = TierMemory(s.host_budget, self.weights(HOST), slots * host_slot + (0 if s.hw.is_cpu else kv_reads),
                          self.kv[HOST] * s.kv_block_bytes)
        return {DEVICE: device, HOST: host}

    def device_overhead(self) -> DeviceOverhead:
        """What the device holds beside this placement's buffers (see ``tiers.plan.overhead``)."""
        device_slot, _, convert = self.staging()
        return self._overhead(self.depth + 1, device_slot, convert)

    def _overhead(self, slots: int, device_slot: int, convert: int) -> DeviceOverhead:
        s, hw = self.s, self.s.hw
        kv_bytes = self.kv[DEVICE] * s.kv_block_bytes
        contiguous = s.kv_contiguous and kv_bytes > 0
        growth = s.kv_tensor_bytes if contiguous else 0
        if hw.is_cpu:
            return DeviceOverhead(hw.runtime_overhead_bytes, 0, growth, hw.device_overhead_bytes is None)
        weights = sum(r for r, t in zip(s.unit_rounding, self.tiers) if t == DEVICE)
        buffers = slots * rounding_bytes((device_slot,)) + rounding_bytes((convert,))
        if contiguous:      # keys and values of every layer of every sequence, one tensor each
            kv = 2 * s.model.kv_layers * s.work.concurrency * rounding_bytes((s.kv_tensor_bytes,))
        else:               # one pool
            kv = rounding_bytes((kv_bytes,))
        rounding = POOL_SLACK_BYTES + ACTIVATION_ROUNDING_BYTES + weights + buffers + kv
        return DeviceOverhead(hw.runtime_overhead_bytes, rounding, reserved_bytes(growth),
                              hw.device_overhead_bytes is None)

    def fits(self) -> bool:
        return all(m.total <= m.budget for m in self.memory().values())

    def try_units(self, group: tuple[int, ...], tier: str) -> bool:
        before = [self.tiers[u] for u in group]
        for u in group:
            self.tiers[u] = tier
        if self.fits():
            return True
        for u, t in zip(group, before):
            self.tiers[u] = t
        return False

    def try_kv(self, tier: str) -> bool:
        """Move as many KV blocks from disk to ``tier`` as fit (and its cap allows); True if all moved."""
        cap = self.s.kv_caps.get(tier, self.kv_blocks) - self.kv[tier]
        budget = self.memory()[tier]
        room = max(0, budget.budget - budget.total) // max(1, self.s.kv_block_bytes)
        moved = min(self.kv[DISK], cap, room)
        self.kv[DISK] -= moved
        self.kv[tier] += moved
        while moved and not self.fits():     # the device's overhead grows with its KV (rounding, growth)
            over = max(m.total - m.budget for m in self.memory().values())
            back = min(moved, max(1, -(-over // max(1, self.s.kv_block_bytes))))
            self.kv[DISK] += back
            self.kv[tier] -= back
            moved -= back
        return self.kv[DISK] == 0
