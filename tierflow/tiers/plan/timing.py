"""The time model: predicted seconds of one sweep per resource (disk, PCIe, compute) for a
placement of a model's costs on a machine, ``sweep_times``, and the decode sweep the plan
and the engine both price, ``decode_times``. Pure: no torch, no I/O.

The time model is the pipeline's: reading from disk, copying to the device and computing
overlap, so a sweep takes as long as its slowest resource. Compute per unit is a roofline:
a decoder layer at one token is bound by reading its weights (``decode_gbps``), at many
tokens by its matmuls (``prefill_tflops``); attention reads each sequence's KV once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from tierflow.tiers.plan.costmodel import DEVICE, DISK, EMBED, HEAD, HOST, ModelCosts, UnitCost
from tierflow.tiers.plan.hardware import HardwareProfile


@dataclass(frozen=True, slots=True)
class SweepTimes:
    disk_s: float
    pcie_s: float
    compute_s: float

    @property
    def total_s(self) -> float:
        return max(self.disk_s, self.pcie_s, self.compute_s)

    @property
    def bottleneck(self) -> str:
        named = {"disk": self.disk_s, "pcie": self.pcie_s, "compute": self.compute_s}
        return max(named, key=named.__getitem__)


def _gbps(nbytes: float, gbps: float | None) -> float:
    return 0.0 if nbytes == 0 else nbytes / (gbps * 1e9) if gbps else math.inf


def unit_compute_s(model: ModelCosts, hw: HardwareProfile, unit: UnitCost, tokens: int) -> float:
    """Roofline of one unit over ``tokens`` rows: bound by its weight bytes or its matmuls."""
    if unit.kind == EMBED:
        return 0.0
    return max(_gbps(unit.resident_bytes, hw.decode_gbps), 2 * unit.matmul_params * tokens / (hw.prefill_tflops * 1e12))


def attention_compute_s(model: ModelCosts, hw: HardwareProfile, queries: int, contexts: Sequence[int]) -> float:
    """All layers' attention for ``queries`` new tokens of each sequence over its ``contexts[i]``
    keys (a sliding-window layer's queries over a window's keys at most): one roofline for the
    whole sweep, bound by the KV bytes read or by the flops."""
    kv_bytes = sum(model.kv_read_bytes(c) for c in contexts)
    flops = 4 * queries * sum(model.kv_read_tokens(c) for c in contexts) * model.num_heads * model.head_dim
    return max(_gbps(kv_bytes, hw.decode_gbps), flops / (hw.prefill_tflops * 1e12))


def expert_times(model: ModelCosts, hw: HardwareProfile, tokens: int, cache_bytes: int) -> tuple[float, float]:
    """(read bytes, compute seconds) of the routed experts in one sweep of ``tokens`` tokens:
    every MoE layer reads the distinct experts its tokens pick that the expert cache (of
    ``cache_bytes``) misses (``ExpertCosts.hit_rate``: measured routing's LRU curve, else the
    cache's share of all experts, as under uniform routing) and multiplies each token by its
    experts."""
    e = model.experts
    if e is None or tokens == 0:
        return 0.0, 0.0
    distinct = e.distinct(tokens)
    hit = e.hit_rate(cache_bytes, distinct)
    read = e.moe_layers * distinct * (1.0 - hit) * e.stream_bytes
    compute = e.moe_layers * max(_gbps(distinct * e.use_bytes, hw.decode_gbps),
                                 2 * e.matmul_params * e.per_token * tokens / (hw.prefill_tflops * 1e12))
    return read, compute


def sweep_times(model: ModelCosts, hw: HardwareProfile, tiers: Sequence[str], kv_tier_bytes: Mapping[str, float],
                *, tokens: int, logit_rows: int, queries: int, keys: int, sequences: int,
                kv_read_fraction: float = 1.0, expert_cache_bytes: int = 0,
                contexts: Sequence[int] = ()) -> SweepTimes:
    """Predicted seconds of one sweep per resource. Units on disk are read whole; on CUDA every
    unit not on the device is copied to it (an embedding kept on the host is looked up there
    and only the rows move); KV outside the device is read back by every sweep; routed
    experts the expert cache misses are read from disk (and copied, on CUDA). ``contexts``:
    each sequence's keys, when they differ (else ``sequences`` of ``keys`` each)."""
    expert_read, expert_compute = expert_times(model, hw, tokens, expert_cache_bytes)
    disk = sum(u.stream_bytes for u, t in zip(model.units, tiers) if t == DISK) + expert_read
    disk_s = _gbps(disk, hw.disk_read_gbps) + _gbps(kv_tier_bytes.get(DISK, 0) * kv_read_fraction, hw.kv_read_gbps)
    # a linear-attention state is written anew by every sweep, where the KV is (its disk share)
    kv_total = sum(kv_tier_bytes.values())
    state_written = sequences * model.state_bytes
    if state_written and kv_total:
        disk_s += _gbps(state_written * kv_tier_bytes.get(DISK, 0) / kv_total, hw.kv_write_gbps)
    pcie_s = 0.0
    if not hw.is_cpu:
        upload = sum(u.stream_bytes if t == DISK else u.resident_bytes
                     for u, t in zip(model.units, tiers) if t != DEVICE and u.kind != EMBED)
        off_device_kv = (kv_tier_bytes.get(HOST, 0) + kv_tier_bytes.get(DISK, 0)) * kv_read_fraction
        new_kv = sequences * (queries * model.kv_bytes_per_token + model.state_bytes) \
            if kv_tier_bytes.get(DEVICE, 0) == 0 else 0
        pcie_s = _gbps(upload + expert_read + off_device_kv, hw.h2d_gbps) + _gbps(new_kv, hw.d2h_gbps)
    compute_s = sum(unit_compute_s(model, hw, u, logit_rows if u.kind == HEAD else tokens) for u in model.units)
    compute_s += expert_compute
    compute_s += attention_compute_s(model, hw, queries, contexts or (keys,) * sequences)
    return SweepTimes(disk_s, pcie_s, compute_s)


def decode_times(model: ModelCosts, hw: HardwareProfile, tiers: Sequence[str], kv_read_bytes: Mapping[str, float],
                 contexts: Sequence[int], expert_cache_bytes: int = 0) -> SweepTimes:
    """Predicted seconds per resource of one decode sweep: one new token for each sequence,
    the i-th attending to ``contexts[i]`` keys, reading ``kv_read_bytes`` of KV per tier. The
    plan prices its workload's sweep with this (every sequence at the full context, the KV as
    it places it), and the engine prices each decode sweep that ran with it (the sequences'
    own lengths, the KV as its blocks in use lie), so the two differ only by those inputs."""
    k = len(contexts)
    return sweep_times(model, hw, tiers, kv_read_bytes, tokens=k, logit_rows=k, queries=1, keys=max(contexts),
                       sequences=k, expert_cache_bytes=expert_cache_bytes, contexts=contexts)
