"""The planner's search: what it searches with and how it prices a candidate placement.

``Search`` holds what every candidate shares: the model's costs, the machine, the workload,
the memory budgets less their margin, the units pinned by ``overrides.tiers``, the KV block's
size and the tiers' KV caps (``make_search`` works them out). A candidate is made by
``candidates`` and filled as a ``state.State``; ``predict`` prices it with the cost model.
``planner.plan`` tries every candidate and keeps the best. Every use the search makes of the
KV block size (``KV_BLOCK_TOKENS``: the block counts, the KV caps, ``predict``) lives in this
module, so one setting sizes them all. Pure: no torch, no I/O.

A candidate's KV is the blocks its sequences hold at most for its prefill chunk
(``ModelCosts.kv_blocks``: a sliding-window layer's ring peaks during a chunk). Its sweeps read
what attention reads of them: in decode, all of a full-attention layer's blocks and a window's
of a sliding one; in a prefill sweep half of a full layer's on average, a sliding one's window.
Every block of the prompt is written once, rings' blocks too (they are written, then released).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tierflow.errors import ProfileError
from tierflow.tiers.plan.costmodel import DEVICE, DISK, HOST, LAYER, ModelCosts, Workload
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides, parse_selector
from tierflow.tiers.plan.overhead import rounding_bytes
from tierflow.tiers.plan.plan import DEFAULT_MARGIN, Prediction, TierMemory
from tierflow.tiers.plan.timing import decode_times, sweep_times

if TYPE_CHECKING:
    from tierflow.tiers.plan.state import State

KV_BLOCK_TOKENS = 256


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


def largest_read(model: ModelCosts) -> int:
    """The largest decoder layer read: what the read pattern (and the disk probe) is sized by."""
    return max((u.stream_bytes for u in model.units if u.kind == LAYER), default=0)
