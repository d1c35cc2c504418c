"""What would help most: the plan again on a slightly better machine, one change at a time.

Pure, like the planner: each variant is a ``HardwareProfile`` (and cap) with one resource
raised, planned with the same workload, and compared by predicted seconds per token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tierflow.errors import TierCapacityError
from tierflow.tiers.plan.costmodel import ModelCosts, Workload
from tierflow.tiers.plan.planner import TierPlan, plan
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides

GIB = 2**30
MIN_SPEEDUP = 1.05


@dataclass(frozen=True, slots=True)
class Improvement:
    change: str                 # "+4 GiB RAM"
    speedup: float              # predicted decode speed-up over the plan as it is
    decode_s_per_token: float


def _memory_step(nbytes: int) -> int:
    """About half again, in whole GiB (at least 1 GiB)."""
    return max(GIB, round(nbytes / 2 / GIB) * GIB)


def improvements(model: ModelCosts, hw: HardwareProfile, work: Workload, overrides: Overrides,
                 base: TierPlan) -> list[Improvement]:
    """Variants that predict at least 5% faster decoding, best first."""
    budget = base.memory["device"].budget
    step = _memory_step(budget)
    device_name = "RAM" if hw.is_cpu else "GPU memory"
    variants = [(f"+{step // GIB} GiB {device_name}", replace(hw, device_memory_bytes=hw.device_memory_bytes + step),
                 replace(overrides, device_memory_bytes=None if overrides.device_memory_bytes is None
                         else overrides.device_memory_bytes + step))]
    if not hw.is_cpu:
        host_step = _memory_step(base.memory["host"].budget)
        variants.append((f"+{host_step // GIB} GiB RAM", replace(hw, host_memory_bytes=hw.host_memory_bytes + host_step,
                                                                pinned_memory_bytes=None),
                         replace(overrides, host_memory_bytes=None if overrides.host_memory_bytes is None
                                 else overrides.host_memory_bytes + host_step)))
        variants.append(("2x faster PCIe", replace(hw, h2d_gbps=2 * (hw.h2d_gbps or 0), d2h_gbps=2 * (hw.d2h_gbps or 0)),
                         overrides))
    variants.append((f"a 2x faster disk ({2 * hw.disk_read_gbps:.1f} GB/s)",
                     replace(hw, disk_read_gbps=2 * hw.disk_read_gbps,
                             kv_disk_read_gbps=hw.kv_disk_read_gbps and 2 * hw.kv_disk_read_gbps,
                             kv_disk_write_gbps=hw.kv_disk_write_gbps and 2 * hw.kv_disk_write_gbps), overrides))
    variants.append(("2x faster compute", replace(hw, decode_gbps=2 * hw.decode_gbps,
                                                  prefill_tflops=2 * hw.prefill_tflops), overrides))
    found = []
    for change, better_hw, better_overrides in variants:
        try:
            better = plan(model, better_hw, work, better_overrides)
        except TierCapacityError:
            continue
        speedup = base.predicted.decode_s_per_token / better.predicted.decode_s_per_token
        if speedup >= MIN_SPEEDUP:
            found.append(Improvement(change, speedup, better.predicted.decode_s_per_token))
    return sorted(found, key=lambda i: -i.speedup)
