"""The planner's search: the state of one candidate placement and how candidates are made.

A candidate fills the tiers in one order (largest units first, smallest first; weights
before KV, KV before weights) for one staging-slot cap, prefetch depth and prefill chunk,
until the first item that does not fit; ``predict`` prices it with the cost model.
``planner.plan`` tries every candidate and keeps the best; ``capacity_error`` says, for the
least demanding candidate, which budget is short and by how much. Pure: no torch, no I/O.

A candidate's KV is the blocks its sequences hold at most for its prefill chunk
(``ModelCosts.kv_blocks``: a sliding-window layer's ring peaks during a chunk). Its sweeps read
what attention reads of them: in decode, all of a full-attention layer's blocks and a window's
of a sliding one; in a prefill sweep half of a full layer's on average, a sliding one's window.
Every block of the prompt is written once, rings' blocks too (they are written, then released).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from tierflow.errors import ProfileError, TierCapacityError
from tierflow.tiers.plan.costmodel import (DEVICE, DISK, EMBED, HOST, LAYER, ModelCosts, UnitCost,
                                           Workload, decode_times, kv_read_window, sweep_times)
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides, parse_selector
from tierflow.tiers.plan.overhead import (ACTIVATION_ROUNDING_BYTES, POOL_SLACK_BYTES, DeviceOverhead,
                                          reserved_bytes, rounding_bytes)
from tierflow.tiers.plan.plan import DEFAULT_MARGIN, Prediction, TierMemory

KV_BLOCK_TOKENS = 256
_KV = "kv"


# ----------------------------------------------------------------------------- the search
@dataclass(slots=True)
class Search:
    model: ModelCosts
    hw: HardwareProfile
    work: Workload
    overrides: Overrides
    margin: float
    device_budget: int
    host_budget: int
    pins: dict[int, str]
    groups: list[tuple[int, ...]]
    kv_block_bytes: int
    kv_caps: dict[str, int] = field(default_factory=dict)
    unit_rounding: tuple[int, ...] = ()     # per unit: what the allocator rounds its resident tensors up by
    kv_tensor_bytes: int = 0                # one layer's keys of one sequence at the full context

    @property
    def kv_contiguous(self) -> bool:
        """KV that may leave the device for no other tier: the engine keeps it in the contiguous
        store (``engine_overrides`` without a paged cache), which grows by copying."""
        return self.kv_caps.get(HOST) == 0 and self.kv_caps.get(DISK) == 0

    def kv_blocks(self, chunk: int) -> int:
        """Blocks the workload's sequences hold at most, computed ``chunk`` tokens a sweep."""
        return self.work.concurrency * self.model.kv_blocks(self.work.context_tokens, chunk, KV_BLOCK_TOKENS)

    def kv_full_blocks(self) -> int:
        """Blocks the same sequences would hold with every layer that keeps keys full attention
        (what a prompt writes), and the linear-attention layers' states."""
        state = self.model.kv_layout(KV_BLOCK_TOKENS).state_blocks * (self.model.num_layers - self.model.kv_layers)
        return self.work.concurrency * (math.ceil(self.work.context_tokens / KV_BLOCK_TOKENS) * self.model.kv_layers
                                        + state)


def _budgets(hw: HardwareProfile, overrides: Overrides, margin: float) -> tuple[int, int]:
    device = int(hw.device_memory_bytes * (1 - margin))
    if overrides.device_memory_bytes is not None:
        device = min(device, overrides.device_memory_bytes)
    if hw.is_cpu:
        return device, 0
    host_limit = min(hw.host_memory_bytes, hw.pinned_memory_bytes or hw.host_memory_bytes)
    host = int(host_limit * (1 - margin))
    if overrides.host_memory_bytes is not None:
        host = min(host, overrides.host_memory_bytes)
    return device, host


def _pins(model: ModelCosts, hw: HardwareProfile, overrides: Overrides) -> dict[int, str]:
    pins: dict[int, str] = {}
    for selector, tier in overrides.tiers.items():
        if tier == HOST and hw.is_cpu:
            raise ProfileError(f"overrides.tiers.{selector}: the device is the CPU, so there is no separate host "
                               "tier; use 'device' (RAM) or 'disk'")
        first, last = parse_selector(selector, model.num_layers, overrides.source)
        pins.update({u: tier for u in range(first, last + 1)})
    head = len(model.units) - 1
    if model.tied and (0 in pins or head in pins):
        embed_tier, head_tier = pins.get(0, pins.get(head)), pins.get(head, pins.get(0))
        if embed_tier != head_tier:
            raise ProfileError("overrides.tiers: the embedding and the head share one tensor (tied embeddings); "
                               "pin them to the same tier")
        pins[0] = pins[head] = embed_tier     # pinning one of the pair pins both
    return pins


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
                          + model.attention_bytes(min(chunk, work.prompt_tokens), work.context_tokens)
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


def expert_cache_bytes(s: Search, memory: dict[str, TierMemory]) -> int:
    """Routed experts get the device memory the rest of the plan leaves (up to all of them):
    per byte, a resident layer saves a read on every sweep, a cached expert only when the
    router picks it, so experts come last."""
    if s.model.experts is None:
        return 0
    device = memory[DEVICE]
    return max(0, min(s.model.experts.all_resident_bytes, device.budget - device.total))


def predict(s: Search, st: State) -> tuple[Prediction, dict[str, TierMemory]]:
    model, hw, work = s.model, s.hw, s.work
    memory = st.memory()
    cache = expert_cache_bytes(s, memory)
    memory[DEVICE] = replace(memory[DEVICE], weights=memory[DEVICE].weights + cache)
    kv_bytes = {tier: n * s.kv_block_bytes for tier, n in st.kv.items()}
    k = work.concurrency
    per_seq = max(1, st.kv_blocks // k)        # the blocks one sequence holds at most
    decode_read = model.kv_read_blocks(work.context_tokens, KV_BLOCK_TOKENS) / per_seq
    decode = decode_times(model, hw, st.tiers, {tier: n * min(1.0, decode_read) for tier, n in kv_bytes.items()},
                          (work.context_tokens,) * k, cache)
    prefill_tokens = k * work.prompt_tokens
    chunk = min(st.chunk, prefill_tokens)
    sweeps = math.ceil(prefill_tokens / chunk)
    prefill_read = model.kv_read_blocks(work.context_tokens, KV_BLOCK_TOKENS, full_share=0.5) / per_seq
    per_sweep = sweep_times(model, hw, st.tiers, kv_bytes, tokens=chunk, logit_rows=1, queries=chunk,
                            keys=max(1, work.prompt_tokens // 2), sequences=1, kv_read_fraction=min(1.0, prefill_read),
                            expert_cache_bytes=cache)
    written = s.kv_full_blocks() / max(1, st.kv_blocks)       # rings write blocks they later release
    spill_s = kv_bytes[DISK] * written / (hw.kv_write_gbps * 1e9)
    prediction = Prediction(
        decode.total_s, k / decode.total_s if decode.total_s else math.inf, sweeps * per_sweep.total_s + spill_s,
        memory[DEVICE].total, memory[HOST].total, model.checkpoint_bytes + kv_bytes[DISK],
        st.kv_blocks * s.kv_block_bytes, decode.bottleneck, decode, 0.0)
    new_tokens = max(1, work.new_tokens)
    prediction = replace(prediction, s_per_token=prediction.prefill_s / new_tokens + prediction.decode_s_per_token)
    return prediction, memory


def make_search(model: ModelCosts, hw: HardwareProfile, work: Workload, overrides: Overrides) -> Search:
    margin = DEFAULT_MARGIN if overrides.safety_margin is None else overrides.safety_margin
    device_budget, host_budget = _budgets(hw, overrides, margin)
    n = len(model.units)
    groups = [(u,) for u in range(n) if not (model.tied and u in (0, n - 1))]
    if model.tied:
        groups.append((0, n - 1))
    block_bytes = KV_BLOCK_TOKENS * model.kv_bytes_per_token_layer
    # a tier's token budget holds that many tokens of every layer that keeps keys, and (when it holds
    # any) the workload's linear-attention states beside them
    states = work.concurrency * model.kv_layout(KV_BLOCK_TOKENS).state_blocks * (model.num_layers - model.kv_layers)
    caps = {tier: math.ceil(tokens / KV_BLOCK_TOKENS) * max(1, model.kv_layers) + (states if tokens else 0)
            for tier, tokens in overrides.kv_budget_tokens.items()}
    rounding = tuple(rounding_bytes(u.tensor_bytes or (u.resident_bytes,)) for u in model.units)
    return Search(model, hw, work, overrides, margin, device_budget, host_budget, _pins(model, hw, overrides),
                  groups, block_bytes, caps, rounding, work.context_tokens * model.kv_bytes_per_token_layer // 2)


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


def largest_read(model: ModelCosts) -> int:
    """The largest decoder layer read: what the read pattern (and the disk probe) is sized by."""
    return max((u.stream_bytes for u in model.units if u.kind == LAYER), default=0)


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
