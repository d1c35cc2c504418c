"""The engine's configuration: ``EngineConfig`` and the ``SpeculativeConfig`` it holds."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tierflow.errors import ConfigError
from tierflow.config.checks import check_path, check_positive, is_cuda_index, record_from, show

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DIRECT_IO_MODES = ("auto", "on", "off")
EXPERT_READS = ("routed", "all")
KV_ALLOCATIONS = ("on_demand", "reserve")
SPECULATIVE_METHODS = ("ngram", "draft")
MOST_TREE_WIDTH = 8        # SpeculativeConfig.tree_width


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (the field names are vLLM's): each decoding request proposes up to
    ``num_speculative_tokens`` tokens cheaply and one sweep of the model verifies them all; the
    output is the model's own (greedy: identical tokens; sampling: the same distribution).

    method: "ngram" (prompt lookup): the tokens that followed the most recent earlier occurrence
        of the longest n-gram, ``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens, that
        ends the request's prompt and output so far (no occurrence: the step decodes one token).
        "draft": a small model with the target's tokenizer (``model``), kept resident, proposes
        its own greedy continuation, one draft sweep per proposed token for every speculating
        request at once; it keeps each request's draft KV between steps.
    model: the draft model (a local directory or GGUF file; "draft" only). Its vocabulary and
        special tokens must equal the target's (checked at open).
    num_speculative_tokens: the most tokens proposed per step (an int >= 1), or "auto": before
        each step the cost model picks it (``tiers/plan/speculation.py``) from the sweep's fixed
        and per-token costs and the acceptance rate measured so far in the run.
    prompt_lookup_max / prompt_lookup_min: the longest and shortest n-gram looked up (ints >= 1,
        min <= max; "ngram" only).
    tree_width: candidates per position (an int from 1 to 8; 1: a chain). Beside each proposed
        token up to tree_width - 1 alternatives for its position — the draft's next most likely
        tokens, or what followed other occurrences of the n-gram — are verified in the same
        sweep as a candidate tree (each candidate attends to its own ancestors only); a rejected
        position whose model token is among them keeps it, plus one more token. With
        num_speculative_tokens="auto" the cost model picks the width too, up to this, from the
        alternatives' hit rate measured in the run.
    """

    method: str = "ngram"
    num_speculative_tokens: int | str = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: str | os.PathLike[str] | None = None
    tree_width: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"SpeculativeConfig.method must be one of {SPECULATIVE_METHODS}, got {show(self.method)}")
        if self.method == "draft" and self.model is None:
            raise ConfigError("SpeculativeConfig.model is required with method='draft': the path of a small model "
                              "with the target's tokenizer")
        if self.method != "draft" and self.model is not None:
            raise ConfigError(f"SpeculativeConfig.model is only used with method='draft' (method is "
                              f"{self.method!r}); drop it, or set method='draft'")
        if self.model is not None:
            check_path("speculative.model", self.model)
        if self.num_speculative_tokens != "auto":
            if isinstance(self.num_speculative_tokens, str):
                raise ConfigError(f"SpeculativeConfig.num_speculative_tokens must be an int >= 1 or 'auto', "
                                  f"got {show(self.num_speculative_tokens)}")
            check_positive("SpeculativeConfig", "num_speculative_tokens", self.num_speculative_tokens)
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            check_positive("SpeculativeConfig", name, getattr(self, name))
        check_positive("SpeculativeConfig", "tree_width", self.tree_width)
        if self.tree_width > MOST_TREE_WIDTH:
            raise ConfigError(f"SpeculativeConfig.tree_width must be at most {MOST_TREE_WIDTH}, got {self.tree_width}: "
                              "wider trees verify many tokens that almost never stand")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"SpeculativeConfig.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                              f"prompt_lookup_max ({self.prompt_lookup_max})")


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
    speculative: a ``SpeculativeConfig`` (or a dict of its fields): decoding requests propose
        tokens and verify them in one sweep, several tokens per sweep when proposals hold;
        None (the default): one token per request per sweep.
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
    speculative: SpeculativeConfig | None = None

    @property
    def prefix_cache(self) -> bool:
        return self.prefix_cache_bytes > 0 or self.prefix_cache_dir is not None

    @property
    def paged_kv(self) -> bool:
        return self.kv_cache_dir is not None or self.kv_device_bytes is not None or self.kv_host_bytes is not None

    def __post_init__(self) -> None:
        dev = self.device
        if not isinstance(dev, str) or not (dev in DEVICES or is_cuda_index(dev)):
            raise ConfigError(f"EngineConfig.device must be one of {DEVICES} or 'cuda:N', got {show(dev)}")
        for name, allowed in (("dtype", DTYPES), ("direct_io", DIRECT_IO_MODES), ("kv_allocation", KV_ALLOCATIONS),
                              ("expert_reads", EXPERT_READS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ConfigError(f"EngineConfig.{name} must be one of {allowed}, got {show(getattr(self, name))}")
        if self.profile is not None and not isinstance(self.profile, Mapping):
            check_path("profile", self.profile, what="a path or a dict")
        for name in ("device_memory_bytes", "host_memory_bytes", "prefetch_depth", "io_threads",
                     "prefill_chunk_tokens", "mlp_chunk_tokens"):
            check_positive("EngineConfig", name, getattr(self, name), allow_none=True)
        check_positive("EngineConfig", "io_block_bytes", self.io_block_bytes, allow_none=True, minimum=4096)
        if self.io_block_bytes is not None and self.io_block_bytes % 4096:
            raise ConfigError(f"EngineConfig.io_block_bytes must be a multiple of 4096, got {self.io_block_bytes}")
        check_positive("EngineConfig", "kv_reserve_tokens", self.kv_reserve_tokens, minimum=0)
        check_positive("EngineConfig", "max_num_seqs", self.max_num_seqs)
        if self.kv_disk_bytes is not None and self.kv_cache_dir is None:
            raise ConfigError("EngineConfig.kv_disk_bytes caps the KV spill file in kv_cache_dir, which is not set")
        for name in ("kv_device_bytes", "kv_host_bytes", "kv_disk_bytes"):
            check_positive("EngineConfig", name, getattr(self, name), allow_none=True, minimum=0)
        check_positive("EngineConfig", "max_context_tokens", self.max_context_tokens, allow_none=True)
        check_positive("EngineConfig", "prefix_cache_bytes", self.prefix_cache_bytes, minimum=0)
        check_positive("EngineConfig", "prefix_cache_disk_bytes", self.prefix_cache_disk_bytes, allow_none=True)
        check_positive("EngineConfig", "expert_cache_bytes", self.expert_cache_bytes, allow_none=True, minimum=0)
        for name in ("kv_cache_dir", "prefix_cache_dir", "trace_path"):
            check_path(name, getattr(self, name))
        if isinstance(self.speculative, Mapping):
            object.__setattr__(self, "speculative", record_from(SpeculativeConfig, self.speculative, ConfigError,
                                                                 "EngineConfig.speculative"))
        elif self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ConfigError(f"EngineConfig.speculative must be a SpeculativeConfig, a dict of its fields, or None; "
                              f"got {type(self.speculative).__name__} {show(self.speculative)}")



def engine_config_from(value: EngineConfig | Mapping[str, Any] | None) -> EngineConfig:
    """``value`` itself, ``EngineConfig(**value)`` for a mapping, the defaults for None."""
    return record_from(EngineConfig, value, ConfigError, "config")
