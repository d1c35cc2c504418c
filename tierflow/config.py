"""Frozen configuration records: everything a user sets, validated on construction.

One record per concern. Measured values (bandwidths, placements) never live here:
they belong to the hardware profile and the plan. Every invalid value raises a
``ConfigError`` / ``SamplingError`` naming the field, the value, and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from tierflow.errors import ConfigError, SamplingError

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DIRECT_IO_MODES = ("auto", "on", "off")
EXPERT_READS = ("routed", "all")
KV_ALLOCATIONS = ("on_demand", "reserve")


def _check_positive(owner: str, name: str, value: int | None, *, allow_none: bool = False,
                    error: type[Exception] = ConfigError, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{owner}.{name} must be an int >= {minimum}"
                    f"{' or None' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How an Engine runs.

    device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
    dtype: compute dtype; "auto" keeps the checkpoint's dtype (float16 becomes
        float32 on CPU, where half-precision matmuls are very slow).
    profile: a profile JSON (path or parsed dict; see the README): the hardware to plan
        for (else the engine measures this machine, once, and caches the figures) and
        overrides of what the planner would choose. The fields below that are set
        (not None) take precedence over the profile's overrides.
    device_memory_bytes: cap on what the engine keeps in device memory (resident
        weights + staging slots + KV + workspace); None: the measured free memory less
        a safety margin.
    host_memory_bytes: cap on pinned host memory (CUDA); None: measured.
    prefetch_depth: how many streamed units are read ahead of compute, also across
        the boundary from one sweep to the next (None: the planner chooses).
    io_threads: reader threads, i.e. the disk queue depth (None: 4).
    io_block_bytes: size of one read request, a multiple of 4 KiB (None: 8 MiB).
    direct_io: "auto" tries O_DIRECT and falls back to buffered reads where the
        filesystem refuses it; "on" makes a refusal an error; "off" always buffers.
    kv_reserve_tokens: tokens of KV cache (all sequences together) the plan reserves
        in device memory; the planner sizes everything else around it. It is the whole KV
        capacity of the in-memory (unpaged) cache; a paged cache's capacity is what its
        tiers hold (below), and this only sizes its device share when kv_device_bytes is unset.
    kv_allocation: "on_demand" (the default): a request takes KV blocks as its tokens arrive,
        and when every tier is full the most recently arrived request is preempted (its KV
        dropped, recomputed when it resumes, with the same tokens); "reserve": a request
        reserves KV for its prompt and every new token it may produce when it is admitted,
        and nothing is ever preempted (fewer requests run at once).
    max_num_seqs: the most sequences one sweep serves.
    prefill_chunk_tokens: the most tokens one sweep computes (prompts longer than this
        are prefilled over several sweeps); None: the planner chooses.
    mlp_chunk_tokens: the MLP's intermediate activations are computed this many tokens
        at a time; None: the planner chooses.
    max_context_tokens: cap on prompt + generated tokens (None: the model's own).
    kv_cache_dir: where KV blocks that fit neither the device nor the host budget spill
        (a file per engine, removed on close). Setting it, or either budget below, pages
        the KV cache: fixed-size blocks placed device first, then host, then disk.
    kv_device_bytes / kv_host_bytes: KV budgets per tier (0 forces a tier empty); None: the
        plan's device share, and no host share on CPU (where host memory is the device's).
    kv_disk_bytes: cap on the KV spill file in kv_cache_dir; None: the directory's free space
        less a margin (5%, at least 1 GiB). The file grows as blocks spill and is removed on close.
    prefix_cache_bytes: host memory for the prefix cache: KV blocks of earlier prompts (and
        conversations), keyed by their tokens, that a later request starting with the same
        tokens reuses instead of prefilling them. 0 (the default) keeps none in memory.
    prefix_cache_dir: a directory where the prefix cache keeps its blocks across processes
        (checked against the model's fingerprint and a checksum per block before reuse).
        The cache is on when either this or ``prefix_cache_bytes`` is set.
    prefix_cache_disk_bytes: cap on the directory's size (least recently used blocks are
        removed first); None: no cap.
    expert_cache_bytes: mixture-of-experts models: memory for routed experts kept between
        sweeps (least recently used leave first); None: what the plan leaves free on the device.
        Only the experts the router picks are read, cached or not.
    trace_path: write a Chrome-trace / Perfetto JSON timeline of every pipeline stage (weight
        reads, compute per unit, KV block reads, expert reads, sweeps) to this file when the
        engine closes; open it in ui.perfetto.dev to see what overlapped.
    expert_reads: "routed" (the default) reads the experts a layer's tokens were routed to;
        "all" reads every expert of a MoE layer on every sweep, as offloaders that ignore the
        router do (for comparison).
    """

    device: str = "auto"
    dtype: str = "auto"
    profile: str | os.PathLike[str] | Mapping[str, Any] | None = None
    device_memory_bytes: int | None = None
    host_memory_bytes: int | None = None
    prefetch_depth: int | None = None
    io_threads: int | None = None
    io_block_bytes: int | None = None
    direct_io: str = "auto"
    kv_reserve_tokens: int = 2048
    kv_allocation: str = "on_demand"
    max_num_seqs: int = 64
    prefill_chunk_tokens: int | None = None
    mlp_chunk_tokens: int | None = None
    max_context_tokens: int | None = None
    kv_cache_dir: str | os.PathLike[str] | None = None
    kv_device_bytes: int | None = None
    kv_host_bytes: int | None = None
    kv_disk_bytes: int | None = None
    prefix_cache_bytes: int = 0
    prefix_cache_dir: str | os.PathLike[str] | None = None
    prefix_cache_disk_bytes: int | None = None
    expert_cache_bytes: int | None = None
    expert_reads: str = "routed"
    trace_path: str | os.PathLike[str] | None = None

    @property
    def prefix_cache(self) -> bool:
        return self.prefix_cache_bytes > 0 or self.prefix_cache_dir is not None

    @property
    def paged_kv(self) -> bool:
        return self.kv_cache_dir is not None or self.kv_device_bytes is not None or self.kv_host_bytes is not None

    def __post_init__(self) -> None:
        dev = self.device
        if not isinstance(dev, str) or not (dev in DEVICES or _is_cuda_index(dev)):
            raise ConfigError(f"EngineConfig.device must be one of {DEVICES} or 'cuda:N', got {dev!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.direct_io not in DIRECT_IO_MODES:
            raise ConfigError(f"EngineConfig.direct_io must be one of {DIRECT_IO_MODES}, got {self.direct_io!r}")
        if self.profile is not None and not isinstance(self.profile, (str, os.PathLike, Mapping)):
            raise ConfigError(f"EngineConfig.profile must be a path or a dict, got {type(self.profile).__name__}")
        for name in ("device_memory_bytes", "host_memory_bytes", "prefetch_depth", "io_threads",
                     "prefill_chunk_tokens", "mlp_chunk_tokens"):
            _check_positive("EngineConfig", name, getattr(self, name), allow_none=True)
        _check_positive("EngineConfig", "io_block_bytes", self.io_block_bytes, allow_none=True, minimum=4096)
        if self.io_block_bytes is not None and self.io_block_bytes % 4096:
            raise ConfigError(f"EngineConfig.io_block_bytes must be a multiple of 4096, got {self.io_block_bytes}")
        _check_positive("EngineConfig", "kv_reserve_tokens", self.kv_reserve_tokens, minimum=0)
        _check_positive("EngineConfig", "max_num_seqs", self.max_num_seqs)
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise ConfigError(f"EngineConfig.kv_allocation must be one of {KV_ALLOCATIONS}, got {self.kv_allocation!r}")
        if self.kv_disk_bytes is not None and self.kv_cache_dir is None:
            raise ConfigError("EngineConfig.kv_disk_bytes caps the KV spill file in kv_cache_dir, which is not set")
        for name in ("kv_device_bytes", "kv_host_bytes", "kv_disk_bytes"):
            _check_positive("EngineConfig", name, getattr(self, name), allow_none=True, minimum=0)
        if self.kv_cache_dir is not None and not isinstance(self.kv_cache_dir, (str, os.PathLike)):
            raise ConfigError(f"EngineConfig.kv_cache_dir must be a path, got {type(self.kv_cache_dir).__name__}")
        _check_positive("EngineConfig", "max_context_tokens", self.max_context_tokens, allow_none=True)
        _check_positive("EngineConfig", "prefix_cache_bytes", self.prefix_cache_bytes, minimum=0)
        _check_positive("EngineConfig", "prefix_cache_disk_bytes", self.prefix_cache_disk_bytes, allow_none=True)
        _check_positive("EngineConfig", "expert_cache_bytes", self.expert_cache_bytes, allow_none=True, minimum=0)
        if self.expert_reads not in EXPERT_READS:
            raise ConfigError(f"EngineConfig.expert_reads must be one of {EXPERT_READS}, got {self.expert_reads!r}")
        if self.trace_path is not None and not isinstance(self.trace_path, (str, os.PathLike)):
            raise ConfigError(f"EngineConfig.trace_path must be a path, got {type(self.trace_path).__name__}")
        if self.prefix_cache_dir is not None and not isinstance(self.prefix_cache_dir, (str, os.PathLike)):
            raise ConfigError(f"EngineConfig.prefix_cache_dir must be a path, got "
                              f"{type(self.prefix_cache_dir).__name__}")


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples.

    temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters. seed makes
    sampling reproducible per request, whatever else runs in the same sweep. stop:
    strings that end generation (not included in the output). stop_token_ids end it
    too, as does the model's EOS unless ignore_eos.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_positive("SamplingParams", "max_new_tokens", self.max_new_tokens, error=SamplingError)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_positive("SamplingParams", "top_k", self.top_k, error=SamplingError, minimum=0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise SamplingError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise SamplingError(f"SamplingParams.stop_token_ids must hold ints >= 0, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_number(name: str, value: float, *, low: float, low_open: bool = False,
                  high: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise SamplingError(f"SamplingParams.{name} must be a number {bound}, got {value!r}")
