"""Online-softmax attention over KV blocks against the model's own attention (SDPA)."""

from __future__ import annotations

import random

import pytest
import torch

from tierflow.adapters.attention import attend_blocks, split_blocks
from tierflow.adapters.llama import attend


def _case(n, start, heads, kv_heads, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, generator=gen).to(dtype)
    keys = torch.randn(kv_heads, start + n, d, generator=gen).to(dtype)
    values = torch.randn(kv_heads, start + n, d, generator=gen).to(dtype)
    return q, keys, values


@pytest.mark.parametrize("n,start", [(1, 0), (1, 99), (7, 0), (16, 40), (33, 200)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block", [1, 5, 16, 64, 1000])
def test_blocks_match_sdpa_fp32(n, start, heads, kv_heads, block):
    q, keys, values = _case(n, start, heads, kv_heads)
    expected = attend(q, keys, values, start)
    got = attend_blocks(q, split_blocks(keys, values, block), start)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_block_order_does_not_matter():
    q, keys, values = _case(12, 50, 8, 2)
    blocks = split_blocks(keys, values, 7)
    random.Random(0).shuffle(blocks)
    torch.testing.assert_close(attend_blocks(q, blocks, 50), attend(q, keys, values, 50), rtol=1e-5, atol=1e-5)


def test_bf16_matches_within_its_precision():
    q, keys, values = _case(9, 30, 8, 2, dtype=torch.bfloat16)
    expected = attend(q.float(), keys.float(), values.float(), 30)
    got = attend_blocks(q, split_blocks(keys, values, 8), 30).float()
    assert got.dtype == torch.float32 and ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2


def test_large_scores_do_not_overflow():
    """The running maximum keeps exp() in range where a naive softmax overflows float32."""
    q, keys, values = _case(4, 60, 4, 4)
    q = q * 200.0
    expected = attend(q, keys, values, 60)
    got = attend_blocks(q, split_blocks(keys, values, 8), 60)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_missing_keys_are_an_error():
    q, keys, values = _case(3, 10, 4, 2)
    with pytest.raises(ValueError, match="saw no key"):
        attend_blocks(q, split_blocks(keys, values, 4)[1:], 0)    # positions 0..3 missing for query 0
    with pytest.raises(ValueError, match="cannot share"):
        attend_blocks(torch.randn(2, 5, 16), [(torch.randn(2, 2, 16), torch.randn(2, 2, 16), 0)], 0)


def test_memory_is_bounded_by_the_block_not_the_context():
    """The score matrix held at once is [heads, queries, block tokens], whatever the context:
    the largest one seen is the same at 512 and 4096 tokens of context."""
    seen: list[int] = []
    original = torch.Tensor.masked_fill

    def spy(self, mask, value):
        seen.append(self.numel())
        return original(self, mask, value)

    for context in (512, 4096):
        q, keys, values = _case(4, context - 4, 8, 2)
        torch.Tensor.masked_fill = spy
        try:
            attend_blocks(q, split_blocks(keys, values, 128), context - 4)
        finally:
            torch.Tensor.masked_fill = original
    assert max(seen) == 8 * 4 * 128
