from __future__ import annotations

import pytest

from tierflow.errors import KVCapacityError
from tierflow.pipeline.batcher import Batcher
from tierflow.tiers.kv.layout import KVLayout

TOKENS = KVLayout.full(1, 1)      # one block per token: capacities below are in tokens


def _sampled(plan, appended: set[int]) -> list[int | None]:
    """A token (7) for each sequence in ``appended``, nothing for the others."""
    return [7 if s.seq_id in appended else None for s in plan.seqs]


def _drain(b: Batcher, new_tokens: dict[int, int]) -> list:
    plans = []
    while (plan := b.schedule()) is not None:
        plans.append(plan)
        appended = set()
        for s in plan.seqs:
            if s.sample and new_tokens[s.seq_id] > 0:
                new_tokens[s.seq_id] -= 1
                appended.add(s.seq_id)
        b.postprocess(plan, _sampled(plan, appended))
        for s in plan.seqs:
            if s.sample and s.seq_id not in appended:
                b.remove(s.seq_id)
    return plans


def test_prefill_is_chunked_under_the_token_budget():
    b = Batcher(max_num_seqs=4, max_sweep_tokens=8)
    b.add(0, 20)
    plans = _drain(b, {0: 0})
    assert [p.num_tokens for p in plans] == [8, 8, 4]
    assert [p.seqs[0].sample for p in plans] == [False, False, True]
    assert [p.seqs[0].start for p in plans] == [0, 8, 16]


def test_decode_goes_first_and_prefill_fills_the_rest():
    b = Batcher(max_num_seqs=4, max_sweep_tokens=8)
    b.add(0, 3)
    plan = b.schedule()
    b.postprocess(plan, _sampled(plan, {0}))            # seq 0 now decodes
    b.add(1, 30)
    plan = b.schedule()
    assert plan.seqs[0].seq_id == 0 and plan.seqs[0].num_tokens == 1
    assert plan.seqs[1].seq_id == 1 and plan.seqs[1].num_tokens == 7
    assert plan.num_tokens == 8


def test_admission_cap_and_fifo():
    b = Batcher(max_num_seqs=2, max_sweep_tokens=100)
    for i in range(4):
        b.add(i, 2)
    plan = b.schedule()
    assert [s.seq_id for s in plan.seqs] == [0, 1]
    assert b.statistics().num_waiting == 2
    b.postprocess(plan, _sampled(plan, {0, 1}))
    b.remove(0)
    plan = b.schedule()
    assert [(s.seq_id, s.num_tokens) for s in plan.seqs] == [(1, 1), (2, 2)]


def test_remove_waiting_and_running():
    b = Batcher(max_num_seqs=1, max_sweep_tokens=100)
    b.add(0, 2)
    b.add(1, 2)
    b.schedule()
    b.remove(1)
    b.remove(0)
    assert not b.has_work() and b.schedule() is None


def test_reserving_admission_is_fifo_and_never_overtakes():
    b = Batcher(max_num_seqs=8, max_sweep_tokens=64, kv=TOKENS, kv_capacity_blocks=100, allocation="reserve")
    b.add(1, 10, 60)
    b.add(2, 10, 50)       # does not fit beside 1 (110 > 100): waits
    b.add(3, 5, 10)        # would fit, but must not overtake 2
    plan = b.schedule()
    assert [s.seq_id for s in plan.seqs] == [1]
    stats = b.statistics()
    assert (stats.num_running, stats.num_waiting, stats.kv_held_blocks) == (1, 2, 60)
    b.remove(1)            # its reservation comes back at the sweep boundary
    plan = b.schedule()
    assert sorted(s.seq_id for s in plan.seqs) == [2, 3]
    assert b.statistics().kv_held_blocks == 60


def test_a_sequence_larger_than_the_kv_capacity_is_refused():
    b = Batcher(max_num_seqs=8, max_sweep_tokens=64, kv=TOKENS, kv_capacity_blocks=100, allocation="reserve")
    with pytest.raises(KVCapacityError, match="needs up to 101 KV blocks but the KV cache holds 100"):
        b.add(1, 50, 101)
    assert not b.has_work()
    b.add(2, 100, 100)      # exactly the capacity fits
    assert [s.seq_id for s in b.schedule().seqs] == [2]


def test_removing_a_waiting_sequence_releases_no_reservation():
    b = Batcher(max_num_seqs=1, max_sweep_tokens=64, kv=TOKENS, kv_capacity_blocks=100, allocation="reserve")
    b.add(1, 10, 20)
    b.add(2, 10, 20)
    b.schedule()
    b.remove(2)            # still waiting: it held no reservation
    assert b.statistics().kv_held_blocks == 20
    b.remove(1)
    assert b.statistics().kv_held_blocks == 0 and not b.has_work()


def test_postprocess_ends_sequences_at_a_stop_token_or_their_most_tokens():
    b = Batcher(max_num_seqs=4, max_sweep_tokens=100)
    b.add(0, 3, 5, stop_token_ids=frozenset({2}))      # may reach 5 tokens: 2 new ones
    b.add(1, 3, 10, stop_token_ids=frozenset({2}))
    plan = b.schedule()
    assert [(o.seq_id, o.finish_reason) for o in b.postprocess(plan, [9, 9])] == [(0, None), (1, None)]
    plan = b.schedule()
    outcomes = b.postprocess(plan, [9, 2])
    assert [(o.seq_id, o.token, o.finish_reason) for o in outcomes] == [(0, 9, "length"), (1, 2, "stop")]
    b.remove(0)
    plan = b.schedule()                                 # seq 1 is still there until removed
    assert [s.seq_id for s in plan.seqs] == [1]
    assert b.postprocess(plan, [None]) == []            # cancelled while the sweep ran: nothing sampled
