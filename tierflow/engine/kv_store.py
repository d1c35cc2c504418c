"""How large an engine's KV cache is: its paged KV store opened as large as its tiers hold.

``open_kv_store`` turns the configured budgets (``kv_device_bytes``, ``kv_host_bytes``,
``kv_disk_bytes``), else the plan's, into block counts per tier; the disk share defaults to the
free space of ``kv_cache_dir`` less a margin (``disk_kv_bytes``), and all of them together are
bounded by ``max_num_seqs`` sequences of the whole context window (``context_window``).
``capacity_settings`` and ``capacity_remedy`` name the settings that make the KV cache larger,
for a request too long for it. It is apart from ``build``, which makes and closes the store in
its turn, because how large the KV cache is follows from the config, the plan and the disk alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tierflow.adapters import ModelSpec
from tierflow.config import EngineConfig
from tierflow.engine.paths import expanded
from tierflow.errors import ConfigError
from tierflow.pipeline.device import DeviceOps
from tierflow.pipeline.trace import NULL_TRACER, Tracer
from tierflow.tiers.io.spill import remove_orphaned_spills
from tierflow.tiers.kv.paged import KVStore, block_bytes
from tierflow.tiers.plan.costmodel import ModelCosts
from tierflow.tiers.plan.plan import TierPlan

DISK_MARGIN_BYTES = 1 << 30        # the KV spill leaves at least this much of its disk free
DISK_MARGIN_FRACTION = 0.05        # ... or this fraction of the free space, whichever is more


def context_window(config: EngineConfig, spec: ModelSpec) -> int:
    """The most tokens (prompt and generated) one sequence may reach."""
    return min(config.max_context_tokens or 2**62, spec.max_position_embeddings)


def disk_kv_bytes(config: EngineConfig) -> int:
    """Bytes the KV spill file may take: ``kv_disk_bytes``, else the free space of
    ``kv_cache_dir`` (its nearest existing parent) less a margin, DISK_MARGIN_FRACTION of it
    but at least DISK_MARGIN_BYTES, and never more than half of it."""
    if config.kv_cache_dir is None:
        return 0
    if config.kv_disk_bytes is not None:
        return config.kv_disk_bytes
    directory = Path(config.kv_cache_dir).expanduser().absolute()
    remove_orphaned_spills(directory)       # the spill files of dead processes are free space
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    return free - min(free // 2, max(DISK_MARGIN_BYTES, int(free * DISK_MARGIN_FRACTION)))


def open_kv_store(config: EngineConfig, plan: TierPlan, spec: ModelSpec, costs: ModelCosts, dtype: torch.dtype,
                  device: torch.device, tracer: Tracer = NULL_TRACER, ops: DeviceOps | None = None) -> KVStore:
    """Pools for an engine's paged KV cache, as large as its tiers hold: the device share from
    ``kv_device_bytes`` (else the plan's), the host share from ``kv_host_bytes`` (else the
    plan's), the disk share from ``kv_disk_bytes`` (else the free space of ``kv_cache_dir``
    less a margin); all of them together never more than ``max_num_seqs`` sequences of the
    whole context window hold."""
    bt = plan.kv_block_tokens
    per_block = block_bytes(spec.num_kv_heads, spec.head_dim, bt, dtype)
    layout = costs.kv_layout(bt)      # the planner's: windows keep rings, a linear layer's state whole blocks
    bound = config.max_num_seqs * layout.most_blocks(context_window(config, spec), plan.prefill_chunk_tokens)
    device_blocks = config.kv_device_bytes // per_block if config.kv_device_bytes is not None else \
        plan.kv_blocks["device"]
    host_blocks = config.kv_host_bytes // per_block if config.kv_host_bytes is not None else \
        plan.kv_blocks.get("host", 0)
    device_blocks = min(device_blocks, bound)
    host_blocks = min(host_blocks, bound - device_blocks)
    stride = -(-per_block // 4096) * 4096
    disk_blocks = min(max(0, disk_kv_bytes(config)) // stride, bound - device_blocks - host_blocks)
    if device_blocks + host_blocks + disk_blocks == 0:
        remedy = "raise EngineConfig.kv_disk_bytes" if config.kv_cache_dir is not None else \
            "set EngineConfig.kv_cache_dir to spill KV blocks to disk"
        raise ConfigError(f"the paged KV cache has no room for a single block of {per_block} bytes: the device and "
                          f"host budgets (kv_device_bytes, kv_host_bytes) hold none and the disk holds none; "
                          f"{remedy}, or raise kv_device_bytes / kv_host_bytes",
                          settings=("kv_cache_dir", "kv_disk_bytes", "kv_device_bytes", "kv_host_bytes"))
    return KVStore(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=dtype,
                   device=device, block_tokens=bt, device_blocks=device_blocks, host_blocks=host_blocks,
                   disk_blocks=disk_blocks, spill_dir=expanded(config.kv_cache_dir), tracer=tracer, layout=layout,
                   allocate=ops.alloc if ops is not None else None,
                   bind_thread=ops.bind_thread if ops is not None else None)


def capacity_settings(config: EngineConfig, paged: bool) -> tuple[str, ...]:
    """The EngineConfig fields that make the KV cache larger (``paged``: a paged KV store, else
    contiguous KV per request)."""
    if not paged:
        return ("kv_reserve_tokens", "kv_cache_dir")
    return ("kv_disk_bytes", "kv_cache_dir") if config.kv_cache_dir is not None else \
        ("kv_cache_dir", "kv_host_bytes", "kv_device_bytes")


def capacity_remedy(config: EngineConfig, paged: bool) -> str:
    if not paged:
        return ("open the engine with a larger EngineConfig.kv_reserve_tokens, or page the KV cache to disk "
                "with EngineConfig.kv_cache_dir")
    if config.kv_cache_dir is not None:
        return ("give the KV spill more room: raise EngineConfig.kv_disk_bytes, or point "
                "EngineConfig.kv_cache_dir at a disk with more free space")
    return ("let the KV cache spill to disk with EngineConfig.kv_cache_dir, or raise EngineConfig.kv_host_bytes / "
            "EngineConfig.kv_device_bytes")
