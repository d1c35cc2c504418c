from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from tierflow.errors import TierCapacityError
from tierflow.tiers.placement import PlacementRequest, place_units


def _req(budget, layers=4, layer=100, embed=300, tied=False, slots=3, fixed=50):
    sizes = (embed, *([layer] * layers), embed if not tied else embed + 1)
    return PlacementRequest(resident_bytes=sizes, stream_bytes=sizes, convert_bytes=(0,) * len(sizes),
                            fixed_bytes=fixed, num_slots=slots, budget_bytes=budget,
                            tied=(0, len(sizes) - 1) if tied else None, tied_bytes=embed if tied else 0)


def test_no_budget_keeps_everything_resident():
    p = place_units(_req(None))
    assert set(p.tiers) == {"device"} and p.num_slots == 0 and p.staging_bytes == 0


def test_tight_budget_streams_layers_and_keeps_the_big_units():
    p = place_units(_req(2 * 300 + 3 * 100 + 50))
    assert p.tiers == ("device", "disk", "disk", "disk", "disk", "device")
    assert p.slot_bytes == 100 and p.total_bytes <= p.budget_bytes


def test_tied_embedding_counted_once_when_resident():
    p = place_units(_req(300 + 1 + 3 * 100 + 50, tied=True))
    assert p.tiers[0] == p.tiers[-1] == "device"
    assert p.resident_bytes == 301


def test_infeasible_budget_names_the_shortfall():
    with pytest.raises(TierCapacityError, match=r"device_memory_bytes=100 is too small.*Raise the budget by"):
        place_units(_req(100))


@given(budget=st.integers(0, 4000), layers=st.integers(1, 8), layer=st.integers(1, 500),
       embed=st.integers(1, 900), tied=st.booleans(), slots=st.integers(1, 4))
def test_never_exceeds_the_budget(budget, layers, layer, embed, tied, slots):
    try:
        p = place_units(_req(budget, layers, layer, embed, tied, slots))
    except TierCapacityError:
        return
    assert p.total_bytes <= budget


@given(budget=st.integers(0, 3000), extra=st.integers(0, 2000), layers=st.integers(1, 8))
def test_more_memory_never_streams_more(budget, extra, layers):
    try:
        small = place_units(_req(budget, layers))
    except TierCapacityError:
        return
    big = place_units(_req(budget + extra, layers))
    streamed = lambda p: sum(_req(None, layers).stream_bytes[u] for u in p.streamed)  # noqa: E731
    assert streamed(big) <= streamed(small)
