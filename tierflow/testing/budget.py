"""The smallest device budget a checkpoint runs at, from the engine's own planner: the budget at
which tests make the decoder layers stream from disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def streaming_budget(path: str | Path, config: Any = None) -> int:
    """The smallest device budget that runs ``path`` — at that budget the decoder layers
    stream from disk on every sweep (the embedding and head may stay resident when that is
    what makes it smallest). Pass the EngineConfig you will use: its other fields size the
    staging slots and reservations."""
    from dataclasses import replace

    from tierflow.config import EngineConfig
    from tierflow.engine.loading import resolve_device, resolve_dtype
    from tierflow.engine.planning import engine_overrides, engine_workload, index_costs, load_engine_profile
    from tierflow.tiers.checkpoint.index import CheckpointIndex
    from tierflow.tiers.plan.planner import minimum_device_bytes
    from tierflow.tiers.plan.hardware import HardwareProfile

    config = config or EngineConfig(device="cpu")
    index = CheckpointIndex.open(path)
    dtype = resolve_dtype(config.dtype, index.spec.checkpoint_dtype, resolve_device(config.device))
    # Which placements fit depends on sizes only, so any bandwidths do.
    unlimited = HardwareProfile(device="cpu", device_memory_bytes=2**60, host_memory_bytes=2**60, disk_read_gbps=1.0,
                                decode_gbps=1.0, prefill_tflops=1.0)
    overrides = replace(engine_overrides(config, load_engine_profile(config)), device_memory_bytes=None)
    return minimum_device_bytes(index_costs(index, dtype), unlimited, engine_workload(config), overrides)
