"""From an EngineConfig and a checkpoint to the planner's inputs, and to a plan.

The engine, ``tierflow plan`` and the test helpers all build the planner's inputs here, so
they plan the same way: the model's costs from its checkpoint (or from config.json alone),
the hardware from the profile JSON (or measured by the probe), and the overrides from the
profile with the EngineConfig's explicit fields on top.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from tierflow.adapters import ModelSpec, model_from_config
from tierflow.config import EngineConfig
from tierflow.errors import ConfigError
from tierflow.tiers.checkpoint.files import read_config, resolve_checkpoint
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import ModelCosts, Workload, costs_from_spec
from tierflow.tiers.kv.contiguous import SequenceKV
from tierflow.tiers.plan.planner import TierPlan, plan
from tierflow.tiers.probe.cache import ProbeCache, default_cache
from tierflow.tiers.probe.probe import probe
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides, Profile
from tierflow.tiers.probe.profile import load_profile

COLD_BYTES = 256 * 2**20       # more than any last-level cache
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def index_costs(index: CheckpointIndex, dtype: torch.dtype) -> ModelCosts:
    """Costs of a checkpoint at hand: its real read sizes, and whether any tensor needs a cast;
    for routed experts, the largest one's read, its tensors' element sizes (packed ones as
    stored) and whether its float tensors are cast, as the expert stage holds them."""
    cast = any(t.dtype != dtype and t.dtype.is_floating_point for u in index.units for t in u.tensors)
    expert = max(index.experts.values(), key=lambda e: e.buffer_bytes, default=None)
    tensors = expert.tensors if expert is not None else ()
    return costs_from_spec(index.spec, index.adapter, DTYPE_NAMES[dtype], [u.buffer_bytes for u in index.units],
                           name=index.directory.name, cast=cast,
                           expert_stream_bytes=expert.buffer_bytes if expert is not None else None,
                           expert_element_bytes={t.local: t.dtype.itemsize for t in tensors} or None,
                           expert_cast=any(t.dtype != dtype and t.dtype.is_floating_point for t in tensors)
                           if expert is not None else None)


def config_spec(model: str | Path) -> tuple[ModelSpec, Any, Path]:
    """ModelSpec and adapter from a directory's config.json alone (weights not needed)."""
    path = Path(model).expanduser()
    if path.is_file():
        directory = path.parent
    else:
        directory = resolve_checkpoint(model)
        path = directory / "config.json"
    adapter, spec = model_from_config(read_config(path), str(path))
    return spec, adapter, directory


def engine_overrides(config: EngineConfig, profile: Profile | None, kv_bytes_per_token: int = 0,
                     kind: str | None = None) -> Overrides:
    """The profile's overrides with the EngineConfig's explicit fields on top. Without a paged
    KV cache the engine holds all KV in device memory, so the plan keeps every block there (and,
    seeing no other tier may hold KV, room for the contiguous store's growth: tiers.plan.overhead);
    with one, KV budgets per tier come from the config and the rest may spill to disk. ``kind``: the
    device the engine runs on, "cpu" or "cuda" (default: as ``config.device`` says)."""
    on_cpu = (kind or ("cuda" if config.device.startswith("cuda") else "cpu")) == "cpu"
    base = profile.overrides if profile is not None else Overrides()
    explicit = {name: getattr(config, name) for name in
                ("device_memory_bytes", "host_memory_bytes", "prefetch_depth", "io_threads", "io_block_bytes",
                 "prefill_chunk_tokens", "mlp_chunk_tokens") if getattr(config, name) is not None}
    kv = dict(base.kv_budget_tokens)
    if not config.paged_kv:
        kv |= {"host": 0, "disk": 0}
    else:
        kv.pop("disk", None)
        per_token = max(1, kv_bytes_per_token)
        if config.kv_device_bytes is not None:   # on CPU the host pool is RAM too: it counts as device memory
            device = config.kv_device_bytes + (config.kv_host_bytes or 0) * on_cpu
            kv["device"] = device // per_token
        kv["host"] = 0 if config.kv_host_bytes is None else config.kv_host_bytes // per_token
    return replace(base, **explicit, kv_budget_tokens=kv)


def engine_workload(config: EngineConfig) -> Workload:
    """The engine plans for its KV reservation: that many tokens of context."""
    return Workload(context_tokens=max(1, config.kv_reserve_tokens), concurrency=1,
                    new_tokens=min(256, config.kv_reserve_tokens // 2))


def load_engine_profile(config: EngineConfig) -> Profile | None:
    return load_profile(config.profile) if config.profile is not None else None


def layer_benchmark(spec: ModelSpec, adapter: Any, device: torch.device, dtype: torch.dtype,
                    cold_bytes: int = COLD_BYTES) -> Callable[[int], None]:
    """``run(tokens)``: one decoder layer of this model, random weights, through the family's
    own forward (norms, rotary, attention, KV append), for the probe's compute figures.

    Successive calls cycle through enough copies of the layer to fill ``cold_bytes``, so the
    weights come from memory as in a real sweep, not from a cache that one small layer would
    fit in. The weights are made on first use: building the function costs nothing."""
    state: dict[str, Any] = {}
    if spec.num_experts:   # a dense layer as wide as a token's routed and shared experts: the same work per token
        spec = replace(spec, moe_layers=(), intermediate_size=spec.moe_intermediate_size * spec.experts_per_token
                       + spec.shared_expert_intermediate_size)

    def setup() -> None:
        gen = torch.Generator().manual_seed(0)
        shapes = adapter.expected_shapes(spec, 1)
        layer_bytes = sum(math.prod(shape) for shape in shapes.values()) * torch.finfo(dtype).bits // 8
        cold = min(cold_bytes, psutil.virtual_memory().available // 8)
        copies = max(1, min(64, -(-cold // max(1, layer_bytes))))
        state["copies"] = [{name: (torch.randn(shape, generator=gen) * 0.02 if len(shape) > 1
                                   else torch.ones(shape)).to(device, dtype) for name, shape in shapes.items()}
                           for _ in range(copies)]
        state["gen"], state["calls"] = gen, 0

    def run(tokens: int) -> None:
        if not state:
            setup()
        weights = state["copies"][state["calls"] % len(state["copies"])]
        state["calls"] += 1
        x = state.setdefault(tokens, torch.randn(tokens, spec.hidden_size, generator=state["gen"]).to(device, dtype))
        kv = SequenceKV(1, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=device)
        positions = torch.arange(tokens, device=device)
        ctx = adapter.make_context(spec, positions, (slice(0, tokens),), (0,), (kv,),
                                   torch.tensor([tokens - 1], device=device), dtype)
        with torch.inference_mode():
            adapter.forward_unit(spec, 1, weights, x, ctx)

    return run


@dataclass(frozen=True, slots=True)
class EnginePlan:
    plan: TierPlan
    hardware: HardwareProfile
    costs: ModelCosts
    provenance: dict[str, Any]           # the probe's (with its "cache_file"), or {"source": "profile", "profile_file"}
    overrides: Overrides                 # the profile's, with the EngineConfig's fields on top


async def plan_engine(index: CheckpointIndex, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                      *, cache: ProbeCache | None = None, progress: Callable[[str], None] | None = None,
                      kind: str | None = None) -> EnginePlan:
    """The plan the engine runs: hardware from the profile, else measured (cached per machine);
    the provenance names the profile file (None for a dict) or the probe's cache file.
    ``kind``: the profile's device kind the engine runs as (default ``device.type``)."""
    kind = kind or device.type
    profile = load_engine_profile(config)
    costs = index_costs(index, dtype)
    overrides = engine_overrides(config, profile, costs.kv_bytes_per_token, kind)
    if profile is not None and profile.hardware is not None:
        if profile.hardware.device != kind:
            raise ConfigError(f"the profile's hardware describes a {profile.hardware.device!r} machine but the engine "
                              f"runs on {kind!r}; plan for that machine with `tierflow plan --profile`, or "
                              "give the engine a profile of this one (`tierflow probe --out`)")
        named = None if isinstance(config.profile, Mapping) else os.fspath(config.profile)   # None: a dict
        hardware, provenance = profile.hardware, {**dict(profile.measured), "source": "profile",
                                                  "profile_file": named}
    else:
        cache = cache or default_cache()
        hardware, provenance = await probe(device, dtype, costs, index.directory,
                                           io_threads=overrides.io_threads or 4, block_bytes=overrides.io_block_bytes,
                                           cache=cache, progress=progress,
                                           layer=layer_benchmark(index.spec, index.adapter, device, dtype))
        provenance = {**provenance, "cache_file": None if cache.path is None else str(cache.path)}
    planned_for, planned_overrides = hardware, overrides
    if config.speculative is not None and config.speculative.method == "draft":
        reserved = await asyncio.to_thread(draft_bytes, config, dtype)
        planned_for, planned_overrides = without_draft(hardware, overrides, reserved)
        provenance = {**provenance, "draft_reserved_bytes": reserved}
    return EnginePlan(plan(costs, planned_for, engine_workload(config), planned_overrides), hardware, costs,
                      provenance, overrides)


def draft_bytes(config: EngineConfig, dtype: torch.dtype) -> int:
    """What a draft model (``config.speculative.model``) keeps in device memory beside the
    target: its weights in the compute dtype, all resident, and its KV for the engine's KV
    reservation (``kv_reserve_tokens``, all sequences together, as the target plans its own).
    A draft that cannot be opened is the draft's open's error to report: 0 here."""
    assert config.speculative is not None and config.speculative.model is not None
    try:
        index = CheckpointIndex.open(config.speculative.model)
    except Exception:     # noqa: BLE001 - open_draft reports it, with the draft's name
        return 0
    costs = index_costs(index, dtype)
    weights = sum(u.resident_bytes for u in costs.units)
    if costs.experts is not None:
        weights += costs.experts.all_resident_bytes
    return weights + max(1, config.kv_reserve_tokens) * costs.kv_bytes_per_token


def without_draft(hw: HardwareProfile, overrides: Overrides, reserved: int) -> tuple[HardwareProfile, Overrides]:
    """The device memory left to the target once a draft holds ``reserved`` bytes of it (and of
    a ``device_memory_bytes`` cap, which bounds what the engine takes in all)."""
    hw = replace(hw, device_memory_bytes=max(0, hw.device_memory_bytes - reserved))
    if overrides.device_memory_bytes is not None:
        overrides = replace(overrides, device_memory_bytes=max(0, overrides.device_memory_bytes - reserved))
    return hw, overrides
