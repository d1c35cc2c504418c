"""Measured routing: the recorder's stack distances against a brute-force LRU cache of every
size, the JSON round trip and its errors, and the cost model reading hit rates from the curve."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from tierflow.tiers.plan.costmodel import ModelCosts
from tierflow.tiers.plan.experts import ExpertCosts
from tierflow.tiers.plan.hardware import HardwareProfile
from tierflow.tiers.plan.routing import RoutingRecorder, RoutingStats
from tierflow.tiers.plan.timing import expert_times
from tierflow.tiers.probe.profile import load_routing, save_routing

EXPERTS = 6
sweeps = st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, EXPERTS - 1), min_size=1, max_size=4,
                                                           unique=True)), min_size=1, max_size=40)


def _lru_hits(script, capacity: int) -> int:
    """A cache per layer of ``capacity`` experts: a sweep's picks are looked up in what the
    previous sweeps left, then become the most recent (the last one most), the rest evicted."""
    caches: dict[int, list[int]] = {}
    hits = 0
    for layer, experts in script:
        cache = caches.setdefault(layer, [])
        hits += sum(1 for e in experts if e in cache)
        order = [e for e in cache if e not in experts] + list(experts)       # least recent first
        caches[layer] = order[-capacity:] if capacity else []
    return hits


@settings(max_examples=60, deadline=None)
@given(script=sweeps)
def test_stack_distances_give_the_hits_of_every_cache_size(script):
    recorder = RoutingRecorder(EXPERTS)
    for layer, experts in script:
        recorder.observe(layer, experts)
    stats = recorder.statistics()
    assert stats.requests == sum(len(e) for _, e in script)
    for capacity in range(EXPERTS + 1):
        assert stats.hits(capacity) == _lru_hits(script, capacity)
    curve = stats.curve()
    assert len(curve) == EXPERTS + 1 and all(a <= b for a, b in zip(curve, curve[1:])) and curve[-1] == 1.0
    if stats.requests > stats.cold:           # steady state: the cold misses left out
        assert curve[2] == stats.hits(2) / (stats.requests - stats.cold)


def test_the_json_round_trips_and_bad_documents_are_refused(tmp_path):
    stats = RoutingStats(4, requests=10, cold=4, reuse=(3, 2, 1))
    path = tmp_path / "routing.json"
    save_routing(stats, path)
    assert load_routing(path) == stats and list(tmp_path.iterdir()) == [path]
    for bad, why in (({"version": 2}, "version"), ({**stats.to_json(), "cold": 5}, "do not add up"),
                     ({**stats.to_json(), "reuse": "x"}, "whole number"),
                     ({**stats.to_json(), "reuse": [1] * 9, "requests": 13}, "do not add up")):
        with pytest.raises(ValueError, match=why):
            RoutingStats.from_json(bad)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="could not read"):
        load_routing(path)


def test_the_cost_model_reads_the_hit_rate_from_the_measured_curve():
    experts = ExpertCosts(moe_layers=2, num_experts=4, per_token=2, stream_bytes=1000, resident_bytes=1000,
                          matmul_params=250)
    model = ModelCosts("m", (), 2, 8, 1, 8, 8, 16, 64, 4, False, experts)
    hw = HardwareProfile(device="cpu", device_memory_bytes=2**30, host_memory_bytes=2**30, disk_read_gbps=1.0,
                         decode_gbps=10.0, prefill_tflops=1.0)
    uniform, _ = expert_times(model, hw, 1, cache_bytes=4000)          # half of all 8 experts: hit 0.5
    assert uniform == pytest.approx(2 * 2 * 0.5 * 1000)
    measured = dataclasses.replace(model, experts=dataclasses.replace(experts, hit_curve=(0.0, 0.6, 0.9, 0.95, 1.0)))
    read, _ = expert_times(measured, hw, 1, cache_bytes=4000)          # 2 experts per layer: hit 0.9
    assert read == pytest.approx(2 * 2 * 0.1 * 1000)
    assert measured.experts.hit_rate(10**9) == 1.0 and measured.experts.hit_rate(0) == 0.0
    # a prefill's tokens pick nearly every expert: a cache of 2 per layer holds at most 2 of them
    prefill, _ = expert_times(measured, hw, 200, cache_bytes=4000)
    distinct = experts.distinct(200)
    assert distinct > 3.9 and prefill == pytest.approx(2 * (distinct - 2) * 1000)


def test_a_contiguous_cache_counts_each_sequence_s_state():
    from tierflow.tiers.kv.layout import ContiguousLayout
    layout = ContiguousLayout(2, state=40)            # two layers keep keys; the states take 40 token-layers
    assert layout.blocks(0, 0) == 0 and layout.blocks(0, 16) == 2 * 16 + 40
    assert layout.cap_blocks(100, 8) == 240 and layout.tokens_within(240, 8) == 100
    assert ContiguousLayout(0, state=40).tokens_within(40, 8) == 2**62
    assert ContiguousLayout(0, state=40).tokens_within(39, 8) == 0
