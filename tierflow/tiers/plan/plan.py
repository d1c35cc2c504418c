"""What the planner decides and predicts: ``TierPlan`` and its parts, and their JSON form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from tierflow.tiers.plan.costmodel import DISK, Workload
from tierflow.tiers.plan.overhead import DeviceOverhead
from tierflow.tiers.plan.timing import SweepTimes

DEFAULT_MARGIN = 0.10


@dataclass(frozen=True, slots=True)
class TierMemory:
    budget: int
    weights: int = 0
    staging: int = 0
    kv: int = 0
    workspace: int = 0
    overhead: int = 0       # device: what the runtime and the allocator hold beside the rest (DeviceOverhead)

    @property
    def total(self) -> int:
        return self.weights + self.staging + self.kv + self.workspace + self.overhead


@dataclass(frozen=True, slots=True)
class Prediction:
    decode_s_per_token: float           # one decode sweep at the full context: every sequence gets one token
    tokens_per_s: float                 # all sequences together
    prefill_s: float                    # every sequence's prompt
    peak_device_bytes: int
    peak_host_bytes: int                # 0 on CPU, where the device tier is RAM
    disk_bytes: int                     # the checkpoint plus spilled KV
    kv_bytes: int
    bottleneck: str                     # "disk" | "pcie" | "compute": the largest stage of ``decode``
    decode: SweepTimes                  # per resource, of that sweep (timing.decode_times)
    s_per_token: float                  # the objective: (prefill_s + new_tokens × decode) / new_tokens


@dataclass(frozen=True, slots=True)
class TierPlan:
    model: str
    device: str
    workload: Workload
    unit_names: tuple[str, ...]
    tiers: tuple[str, ...]              # per unit: "device" | "host" | "disk"
    kv_blocks: Mapping[str, int]        # blocks of KV_BLOCK_TOKENS tokens of one layer, per tier
    kv_block_tokens: int
    prefetch_depth: int
    num_slots: int                      # staging slots (0 when nothing streams)
    device_slot_bytes: int              # one staging slot in device memory
    host_slot_bytes: int                # one pinned read buffer (CUDA only)
    convert_bytes: int                  # workspace to cast a streamed unit
    prefill_chunk_tokens: int
    mlp_chunk_tokens: int
    io_threads: int
    io_block_bytes: int
    memory: Mapping[str, TierMemory]    # "device", "host"
    predicted: Prediction
    margin: float = DEFAULT_MARGIN
    expert_cache_bytes: int = 0         # device memory for routed experts (mixture-of-experts models)
    device_overhead: DeviceOverhead = DeviceOverhead()   # its parts; memory["device"].overhead is their total

    def units_in(self, tier: str) -> tuple[int, ...]:
        return tuple(u for u, t in enumerate(self.tiers) if t == tier)

    @property
    def streamed(self) -> tuple[int, ...]:
        return self.units_in(DISK)

    def to_json(self) -> dict[str, Any]:
        p, o = self.predicted, self.device_overhead
        return {
            "model": self.model, "device": self.device,
            "workload": {"context_tokens": self.workload.context_tokens, "concurrency": self.workload.concurrency,
                         "new_tokens": self.workload.new_tokens},
            "units": list(self.unit_names), "placement": list(self.tiers),
            "kv_blocks": dict(self.kv_blocks), "kv_block_tokens": self.kv_block_tokens,
            "prefetch_depth": self.prefetch_depth, "staging_slots": self.num_slots,
            "device_slot_bytes": self.device_slot_bytes, "host_slot_bytes": self.host_slot_bytes,
            "convert_bytes": self.convert_bytes, "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "mlp_chunk_tokens": self.mlp_chunk_tokens, "io_threads": self.io_threads,
            "io_block_bytes": self.io_block_bytes, "safety_margin": self.margin,
            "expert_cache_bytes": self.expert_cache_bytes,
            "memory": {tier: {"budget": m.budget, "weights": m.weights, "staging": m.staging, "kv": m.kv,
                              "workspace": m.workspace, "overhead": m.overhead, "total": m.total}
                       for tier, m in self.memory.items()},
            "device_overhead": {"runtime_bytes": o.runtime_bytes, "rounding_bytes": o.rounding_bytes,
                                "kv_growth_bytes": o.kv_growth_bytes, "runtime_assumed": o.runtime_assumed},
            "predicted": {"decode_s_per_token": p.decode_s_per_token, "tokens_per_s": p.tokens_per_s,
                          "prefill_s": p.prefill_s, "peak_device_bytes": p.peak_device_bytes,
                          "peak_host_bytes": p.peak_host_bytes, "disk_bytes": p.disk_bytes, "kv_bytes": p.kv_bytes,
                          "bottleneck": p.bottleneck, "disk_s": p.decode.disk_s, "pcie_s": p.decode.pcie_s,
                          "compute_s": p.decode.compute_s, "s_per_token": p.s_per_token},
        }
