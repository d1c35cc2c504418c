"""On-demand KV allocation and preemption in the batcher, on synthetic inputs.

The batcher is pure, so it is driven here by a simulated engine: real block tables
(``KVBlockTables``, which raise if a pool runs dry or a slot is released twice) take each
sweep's blocks as the batcher's plan says, and a deterministic "model" gives every
(sequence, position) its token, so a preempted sequence that recomputes must produce exactly
the tokens it would have produced uninterrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierflow.pipeline.batcher import Batcher
from tierflow.tiers.kv.blocks import KVBlockTables
from tierflow.tiers.kv.layout import KVLayout

STOP = 0


def _token(seq_id: int, position: int) -> int:
    return 1 + (seq_id * 7919 + position * 104729) % 1000      # never STOP


@dataclass
class _Req:
    seq_id: int
    arrival: int             # sweep at which it is submitted
    prompt: int
    max_new: int
    answer: int              # tokens it generates before its stop token (may exceed max_new: cut by length)
    output: list[int] = field(default_factory=list)
    finished: int | None = None
    admitted_first: int | None = None


@dataclass
class _Sim:
    batcher: Batcher
    tables: KVBlockTables
    layout: KVLayout
    sweeps: int = 0
    peak_used: int = 0
    admissions: list[int] = field(default_factory=list)


def _run(reqs: list[_Req], *, capacity: int, layers: int, block_tokens: int, max_num_seqs: int,
         sweep_tokens: int, allocation: str = "on_demand", max_sweeps: int = 20_000) -> _Sim:
    layout = KVLayout.full(layers, block_tokens)
    tables = KVBlockTables({"device": capacity}, num_layers=layers, block_tokens=block_tokens)
    b = Batcher(max_num_seqs=max_num_seqs, max_sweep_tokens=sweep_tokens, kv=layout, kv_capacity_blocks=capacity,
                allocation=allocation, watermark_blocks=layers)
    pending = sorted(reqs, key=lambda r: (r.arrival, r.seq_id))
    by_id = {r.seq_id: r for r in reqs}
    sim = _Sim(b, tables, layout)
    admit = b.admit

    def recording_admit() -> list[int]:      # first admissions, in the order they happen
        admitted = admit()
        for seq_id in admitted:
            if by_id[seq_id].admitted_first is None:
                by_id[seq_id].admitted_first = sim.sweeps
                sim.admissions.append(seq_id)
        return admitted

    b.admit = recording_admit                # type: ignore[method-assign]
    computed: dict[int, int] = {}
    while pending or b.has_work():
        assert sim.sweeps < max_sweeps, "the batcher stopped making progress"
        while pending and pending[0].arrival <= sim.sweeps:
            r = pending.pop(0)
            b.add(r.seq_id, r.prompt, r.prompt + r.max_new, stop_token_ids=frozenset({STOP}))
        plan = b.schedule()
        sim.sweeps += 1
        if plan is None:
            continue
        for seq_id in plan.preempted:
            tables.free_sequence(seq_id)
            computed[seq_id] = 0
        tokens = []
        for item in plan.seqs:
            r = by_id[item.seq_id]
            assert item.start == computed.get(item.seq_id, 0)
            end = item.start + item.num_tokens
            for layer in range(layers):      # commit the blocks these tokens fill, as the store does
                while len(tables.table(item.seq_id, layer)) < end // block_tokens:
                    tables.append_block(item.seq_id, layer)
            computed[item.seq_id] = end
            if not item.sample:
                tokens.append(None)
                continue
            generated = end - r.prompt       # tokens generated before this one
            tokens.append(STOP if generated >= r.answer else _token(r.seq_id, end))
        used = tables.statistics().device.used
        sim.peak_used = max(sim.peak_used, used)
        refs = [ref for s in tables.sequences() for layer in range(layers) for ref in tables.table(s, layer)]
        assert len(refs) == len(set(refs)) == used, "a block has two owners"
        for outcome in b.postprocess(plan, tokens):
            r = by_id[outcome.seq_id]
            if outcome.finish_reason != "stop":
                assert len(r.output) == computed[r.seq_id] - r.prompt, "a recomputed token was sampled twice"
                r.output.append(outcome.token)
            if outcome.finish_reason is not None:
                r.finished = sim.sweeps
                b.remove(r.seq_id)
                tables.free_sequence(r.seq_id)
    assert tables.statistics().device.used == 0
    return sim


def _expected(r: _Req) -> list[int]:
    return [_token(r.seq_id, r.prompt + i) for i in range(min(r.answer, r.max_new))]


def test_on_demand_admits_what_memory_holds_and_preempts_the_newest():
    # 4 requests of 8-token prompts that may reach 8 + 56 tokens but answer in 4: reserving
    # admits one at a time into 64 blocks; on demand admits all four at once
    reqs = lambda: [_Req(i, 0, 8, 56, 4) for i in range(4)]   # noqa: E731
    reserved = _run(reqs(), capacity=64, layers=1, block_tokens=1, max_num_seqs=8, sweep_tokens=64,
                    allocation="reserve")
    demand = _run(reqs(), capacity=64, layers=1, block_tokens=1, max_num_seqs=8, sweep_tokens=64)
    assert demand.admissions == [0, 1, 2, 3] and demand.sweeps < reserved.sweeps
    # the same four now answer in full: their KV outgrows the cache and the newest are preempted
    long = [_Req(i, 0, 8, 40, 40) for i in range(4)]
    sim = _run(long, capacity=64, layers=1, block_tokens=1, max_num_seqs=8, sweep_tokens=64)
    stats = sim.batcher.statistics()
    assert stats.preemptions > 0 and stats.preempted_tokens > 0
    assert all(r.output == _expected(r) for r in long)
    assert long[0].finished <= min(r.finished for r in long[1:])      # the oldest is never preempted for them


def test_a_prefill_chunk_is_shortened_to_what_fits():
    b = Batcher(max_num_seqs=4, max_sweep_tokens=64, kv=KVLayout.full(1, 1), kv_capacity_blocks=40,
                watermark_blocks=0)
    b.add(0, 10, 40)
    plan = b.schedule()
    b.postprocess(plan, [5])                    # seq 0: 11 known, 10 computed
    b.add(1, 30, 30)                            # 11 + 30 > 40 with 1 in flight: it waits
    plan = b.schedule()
    assert [s.seq_id for s in plan.seqs] == [0] and b.statistics().num_waiting == 1


def test_reserve_never_preempts():
    long = [_Req(i, 0, 8, 40, 40) for i in range(4)]
    sim = _run(long, capacity=64, layers=1, block_tokens=1, max_num_seqs=8, sweep_tokens=64, allocation="reserve")
    assert sim.batcher.statistics().preemptions == 0
    assert all(r.output == _expected(r) for r in long)


_request = st.tuples(st.integers(0, 40), st.integers(1, 40), st.integers(1, 30), st.integers(0, 40))


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(_request, min_size=1, max_size=14), layers=st.integers(1, 3), block_tokens=st.integers(1, 8),
       max_num_seqs=st.integers(1, 6), extra_tokens=st.integers(0, 40), spare_blocks=st.integers(0, 60),
       allocation=st.sampled_from(["on_demand", "reserve"]))
def test_every_request_finishes_with_its_own_tokens_and_no_block_has_two_owners(
        requests, layers, block_tokens, max_num_seqs, extra_tokens, spare_blocks, allocation):
    reqs = [_Req(i, arrival, prompt, max_new, answer) for i, (arrival, prompt, max_new, answer) in enumerate(requests)]
    layout = KVLayout.full(layers, block_tokens)
    sweep_tokens = max_num_seqs + extra_tokens       # room for every decode and at least one prefill token
    capacity = max(layout.most_blocks(r.prompt + r.max_new, sweep_tokens) for r in reqs) + spare_blocks
    sim = _run(reqs, capacity=capacity, layers=layers, block_tokens=block_tokens, max_num_seqs=max_num_seqs,
               sweep_tokens=sweep_tokens, allocation=allocation)
    assert sim.peak_used <= capacity
    for r in reqs:
        assert r.finished is not None and r.output == _expected(r)
    # first admissions are in arrival order: nobody overtakes
    order = sorted(reqs, key=lambda r: (r.arrival, r.seq_id))
    assert sim.admissions == [r.seq_id for r in order if r.seq_id in sim.admissions]


@settings(max_examples=25, deadline=None)
@given(prompt=st.integers(1, 24), max_new=st.integers(1, 24), gap=st.integers(1, 4), max_num_seqs=st.integers(1, 6),
       spare_blocks=st.integers(0, 20))
def test_no_request_starves_under_a_steady_arrival_stream(prompt, max_new, gap, max_num_seqs, spare_blocks):
    # a new request every ``gap`` sweeps for 400 sweeps, each answering in full: however long
    # the stream, a request finishes within a bounded time of the ones before it
    reqs = [_Req(i, i * gap, prompt, max_new, max_new) for i in range(400 // gap)]
    layout = KVLayout.full(2, 4)
    sweep_tokens = max_num_seqs + 8
    capacity = layout.most_blocks(prompt + max_new, sweep_tokens) + spare_blocks
    _run(reqs, capacity=capacity, layers=2, block_tokens=4, max_num_seqs=max_num_seqs, sweep_tokens=sweep_tokens)
    work = prompt + 2 * max_new + 2                 # a lone request's sweeps, recomputation included
    latest = 0
    for r in sorted(reqs, key=lambda r: r.arrival):
        assert r.finished is not None
        # once every earlier request is done, the running newer ones finish and then this one does
        assert r.finished <= max(r.arrival, latest) + 2 * work + max_num_seqs
        latest = max(latest, r.finished)
        assert r.output == _expected(r)


def test_a_sequence_that_could_never_fit_alone_is_refused():
    from tierflow.errors import KVCapacityError
    b = Batcher(max_num_seqs=4, max_sweep_tokens=16, kv=KVLayout.full(2, 4), kv_capacity_blocks=10)
    with pytest.raises(KVCapacityError, match="needs up to 12 KV blocks but the KV cache holds 10"):
        b.add(0, 4, 24)
    b.add(1, 4, 23)                             # 23 // 4 = 5 blocks a layer: fits alone
    assert [s.seq_id for s in b.schedule().seqs] == [1]


def test_the_contiguous_cache_is_counted_as_it_allocates():
    import torch

    from tierflow.tiers.kv.contiguous import SequenceKV
    from tierflow.tiers.kv.layout import ContiguousLayout, contiguous_tokens
    ladder = [contiguous_tokens(n) for n in range(0, 5000, 7)]
    assert ladder == sorted(ladder) and all(c >= n for c, n in zip(ladder, range(0, 5000, 7)))
    kv = SequenceKV(2, 1, 4, dtype=torch.float32, device=torch.device("cpu"))
    layout = ContiguousLayout(2)
    for n in (5, 300, 700, 1100):                       # prefill 5 tokens, then chunks
        grown = n - kv.num_tokens
        for layer in range(2):
            kv.append(layer, torch.zeros(grown, 1, 4), torch.zeros(grown, 1, 4))
        assert kv.allocated_bytes == layout.blocks(0, n) * 2 * 4 * 4   # token-layers x K and V x head_dim x fp32
    # 64 short requests in a cache of 2048 tokens: each allocates what the ladder gives its 30
    # tokens (32), and on demand admits what those allocations fit, without preempting
    b = Batcher(max_num_seqs=64, max_sweep_tokens=4096, kv=ContiguousLayout(2), kv_capacity_blocks=2 * 2048)
    for i in range(64):
        b.add(i, 30, 60)
    plan = b.schedule()
    assert len(plan.seqs) == 2 * 2048 // (2 * contiguous_tokens(30)) and plan.preempted == ()
    assert b.statistics().num_waiting == 64 - len(plan.seqs)
