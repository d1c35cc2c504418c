"""Attention over runs of KV blocks stored back to back (``adapters/block_runs.py``): the strided
views are the blocks, a run gives the reference's result (windows, soft-caps, sinks, bf16,
grouped and plain heads), masked blocks and blocks not evenly spaced still merge one at a time,
and a run never holds a block past where the handle's ``together`` says it stays valid."""

from __future__ import annotations

import pytest
import torch

import tierflow.adapters.attention as attention
from tierflow.adapters.attention import attend_kv
from tierflow.adapters.block_runs import GROUP_BYTES, GROUP_QUERIES, run_limit, stacked
from tierflow.adapters.kv import KVBlock, KVBlocks
from tests.adapters.test_attention import _reference


def _pool(count, kv_heads, t, d, dtype=torch.float32, seed=0):
    """A pool of ``count`` slots [2, KVH, t, D], as a paged store keeps them, and its blocks."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(count, 2, kv_heads, t, d, generator=gen).to(dtype)
    return pool, [KVBlock(pool[i, 0], pool[i, 1], i * t) for i in range(count)]


def _contiguous(pool):
    """The pool's keys and values as [KVH, count * t, D]."""
    count, _, kv_heads, t, d = pool.shape
    return (pool[:, 0].transpose(0, 1).reshape(kv_heads, count * t, d),
            pool[:, 1].transpose(0, 1).reshape(kv_heads, count * t, d))


@pytest.fixture
def runs(monkeypatch):
    """The length of every run attention merges at once."""
    seen: list[int] = []
    merge = attention.merge_run

    def spy(query, keys, values, *rest):
        seen.append(keys.shape[0])
        return merge(query, keys, values, *rest)

    monkeypatch.setattr(attention, "merge_run", spy)
    return seen


def test_stacked_views_are_the_blocks_without_a_copy():
    pool, blocks = _pool(6, 2, 8, 4)
    keys, values = stacked(blocks[1:5])
    assert torch.equal(keys, torch.stack([b.keys for b in blocks[1:5]]))
    assert torch.equal(values, torch.stack([b.values for b in blocks[1:5]]))
    assert keys.data_ptr() == blocks[1].keys.data_ptr() and values.data_ptr() == blocks[1].values.data_ptr()


def test_blocks_not_evenly_spaced_in_one_storage_are_not_stacked():
    pool, blocks = _pool(6, 2, 8, 4)
    other, _ = _pool(1, 2, 8, 4, seed=1)
    assert stacked(blocks[:1]) is None                                       # a run of one
    assert stacked([blocks[0], blocks[1], blocks[3]]) is None               # a gap
    assert stacked([blocks[2], blocks[1]]) is None                          # backwards
    assert stacked([blocks[0], KVBlock(other[0, 0], other[0, 1], 8)]) is None      # another storage
    assert stacked([blocks[0], KVBlock(pool[1, 0, :, :4], pool[1, 1, :, :4], 8)]) is None   # another shape
    assert stacked([blocks[0], KVBlock(pool[1, 0], pool[2, 1], 8)]) is None          # values of another slot


def test_runs_are_for_few_queries_and_a_bounded_workspace():
    assert run_limit(GROUP_QUERIES + 1, 8, 256, 64, False) == 1
    limit = run_limit(1, 8, 256, 64, False)
    assert limit > 16 and limit * 4 * 8 * (256 + 64) <= GROUP_BYTES
    assert run_limit(1, 8, 256, 64, True) < limit            # a bf16 run casts its keys too
    assert run_limit(1, 64, 4096, 256, True) == 1            # a block too large to pair


@pytest.mark.parametrize("n", [1, 3, GROUP_QUERIES])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("options", [{}, dict(window=100), dict(softcap=2.0), dict(scale=0.3), dict(sinks=True)],
                         ids=["plain", "window", "softcap", "scale", "sinks"])
def test_runs_match_the_reference(runs, n, heads, kv_heads, options):
    """12 pool blocks of 16 tokens and a tail: the queries at the tail's end see every block
    whole (one run), or with a window only the last few (a shorter run and a cut block)."""
    pool, blocks = _pool(12, kv_heads, 16, 8, seed=n + heads)
    tail_k, tail_v = torch.randn(kv_heads, 5 + n, 8), torch.randn(kv_heads, 5 + n, 8)
    keys, values = _contiguous(pool)
    keys, values = torch.cat([keys, tail_k], dim=1), torch.cat([values, tail_v], dim=1)
    start = keys.shape[1] - n
    q = 2.0 * torch.randn(n, heads, 8)
    kv = KVBlocks.of(blocks + [KVBlock(tail_k, tail_v, 192)], together=lambda i, most: min(most, 12 - i) if i < 12 else 1)
    sinks = torch.randn(heads) if options.get("sinks") else None
    options = {k: v for k, v in options.items() if k != "sinks"}
    got = attend_kv(q, kv, start, sinks=sinks, **options)
    expected = _reference(q, keys, values, start, **options)
    if sinks is not None:      # the reference with the sink as one more logit of no value
        expected = _with_sinks(q, keys, values, start, sinks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert runs and all(r > 1 for r in runs)
    one_at_a_time = attend_kv(q, KVBlocks.of(blocks + [KVBlock(tail_k, tail_v, 192)]), start, sinks=sinks, **options)
    torch.testing.assert_close(got, one_at_a_time, rtol=1e-5, atol=1e-6)


def _with_sinks(q, keys, values, start, sinks):
    n, heads, d = q.shape
    group = heads // keys.shape[0]
    k, v = keys.double().repeat_interleave(group, 0), values.double().repeat_interleave(group, 0)
    scores = (q.double().transpose(0, 1) @ k.transpose(1, 2)) * d ** -0.5
    visible = torch.arange(keys.shape[1])[None, :] <= torch.arange(start, start + n)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.double().view(heads, 1, 1).expand(heads, n, 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (weights @ v).transpose(0, 1).reshape(n, heads * d).float()


def test_bf16_runs_match_within_its_precision(runs):
    pool, blocks = _pool(10, 2, 32, 16, dtype=torch.bfloat16)
    keys, values = _contiguous(pool)
    q = torch.randn(1, 8, 16).to(torch.bfloat16)
    got = attend_kv(q, KVBlocks.of(blocks, together=lambda i, most: min(most, 10 - i)), 319).float()
    expected = _reference(q.float(), keys.float(), values.float(), 319)
    assert runs == [10] and ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2


def test_a_prefill_chunk_and_its_masked_blocks_merge_one_at_a_time(runs):
    pool, blocks = _pool(8, 2, 16, 8)
    keys, values = _contiguous(pool)
    together = lambda i, most: min(most, 8 - i)         # noqa: E731
    q = torch.randn(GROUP_QUERIES + 1, 8, 8)
    start = 128 - q.shape[0]
    got = attend_kv(q, KVBlocks.of(blocks, together=together), start)
    torch.testing.assert_close(got, _reference(q, keys, values, start), rtol=1e-5, atol=1e-5)
    assert runs == []                                   # more queries than GROUP_QUERIES
    q = torch.randn(4, 8, 8)                            # 4 queries ending at 127: the last block is masked
    got = attend_kv(q, KVBlocks.of(blocks, together=together), 124)
    torch.testing.assert_close(got, _reference(q, keys, values, 124), rtol=1e-5, atol=1e-5)
    assert runs == [7]


def test_blocks_a_handle_hands_out_together_but_not_evenly_spaced_merge_one_at_a_time(runs):
    pool, blocks = _pool(6, 2, 16, 8)
    order = [0, 1, 2, 4, 3, 5]                          # positions 48.. and 64.. in swapped slots
    shuffled = [KVBlock(pool[s, 0], pool[s, 1], i * 16) for i, s in enumerate(order)]
    keys = torch.cat([pool[s, 0] for s in order], dim=1)
    values = torch.cat([pool[s, 1] for s in order], dim=1)
    q = torch.randn(1, 8, 8)
    got = attend_kv(q, KVBlocks.of(shuffled, together=lambda i, most: min(most, 6 - i)), 95)
    torch.testing.assert_close(got, _reference(q, keys, values, 95), rtol=1e-5, atol=1e-5)
    assert runs == []                                   # the six views are not evenly spaced


class _Window:
    """Blocks that come as a kv_load stage hands them out: through a window of buffers where a
    fetch from a new read run overwrites the buffers of the one before (NaN here, so a view
    held past its run poisons the result)."""

    def __init__(self, pool, run):
        self.pool, self.run, self.current = pool, run, -1
        self.window = torch.full_like(pool, float("nan"))

    def fetch(self, i):
        if i // self.run != self.current:
            self.current = i // self.run
            self.window.fill_(float("nan"))
            span = slice(self.current * self.run, (self.current + 1) * self.run)
            self.window[span] = self.pool[span]
        return KVBlock(self.window[i, 0], self.window[i, 1], i * self.pool.shape[3])


def test_a_run_holds_no_block_past_where_together_says_it_stays_valid(runs):
    pool, _ = _pool(10, 2, 16, 8)
    keys, values = _contiguous(pool)
    q = torch.randn(1, 8, 8)
    spans = tuple((i * 16, 16) for i in range(10))
    window = _Window(pool, run=4)
    valid = lambda i, most: min(most, 4 - i % 4, 10 - i)        # noqa: E731  to the end of its read run
    got = attend_kv(q, KVBlocks(spans, window.fetch, valid), 159)
    torch.testing.assert_close(got, _reference(q, keys, values, 159), rtol=1e-5, atol=1e-5)
    assert runs == [4, 4, 2]
    # the test can fail: a handle that claimed blocks across read runs stay valid would poison it
    claimed = lambda i, most: min(most, 10 - i)                  # noqa: E731
    assert torch.isnan(attend_kv(q, KVBlocks(spans, _Window(pool, run=4).fetch, claimed), 159)).any()
