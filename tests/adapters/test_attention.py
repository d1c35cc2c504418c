"""Online-softmax attention over KV blocks against the model's own attention (SDPA)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _score_sizes():
    """The sizes of the score matrices attention makes (each is a ``torch.bmm`` output)."""
    seen: list[int] = []
    original = torch.bmm

    def spy(a, b, *, out=None):
        result = original(a, b, out=out)
        seen.append(result.numel())
        return result

    torch.bmm = spy
    try:
        yield seen
    finally:
        torch.bmm = original


def test_memory_is_bounded_by_the_block_not_the_context():
    """The score matrix held at once is [heads, queries, block tokens], whatever the context:
    the largest one seen is the same at 512 and 4096 tokens of context."""
    seen: list[int] = []
    for context in (512, 4096):
        q, keys, values = _case(4, context - 4, 8, 2)
        with _score_sizes() as sizes:
            attend_blocks(q, split_blocks(keys, values, 128), context - 4)
        seen += sizes
    assert max(seen) == 8 * 4 * 128


def _reference(q, keys, values, start, *, scale=None, window=None, softcap=None):
    """Attention written out in full: every score, the cap, the causal and window masks, softmax."""
    n, heads, d = q.shape
    group = heads // keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=0)
    v = values.double().repeat_interleave(group, dim=0)
    scores = (q.double().transpose(0, 1) @ k.transpose(1, 2)) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(start, start + n)[:, None]
    k_pos = torch.arange(keys.shape[1])[None, :]
    visible = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ v).transpose(0, 1).reshape(n, heads * d).float()


@pytest.mark.parametrize("n,start", [(1, 0), (1, 99), (7, 0), (16, 40), (33, 200)])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 64])
@pytest.mark.parametrize("softcap,scale", [(None, None), (3.0, None), (None, 0.3), (2.0, 0.7)])
@pytest.mark.parametrize("block", [1, 7, 64])
def test_window_and_softcap_match_the_reference(n, start, window, softcap, scale, block):
    q, keys, values = _case(n, start, 8, 2, seed=n + start)
    q = q * 2.0           # larger scores, so the cap bends them
    expected = _reference(q, keys, values, start, scale=scale, window=window, softcap=softcap)
    options = dict(scale=scale, window=window, softcap=softcap)
    torch.testing.assert_close(attend_blocks(q, split_blocks(keys, values, block), start, **options), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q, keys, values, start, **options), expected, rtol=1e-5, atol=1e-5)


def test_the_cap_and_the_window_change_the_result():
    """The reference cases above are not no-ops: each option moves the output."""
    q, keys, values = _case(16, 40, 8, 2)
    q = q * 2.0
    plain = _reference(q, keys, values, 40)
    for options in (dict(window=5), dict(softcap=3.0), dict(scale=0.3)):
        assert (_reference(q, keys, values, 40, **options) - plain).abs().max() > 1e-2


def test_blocks_outside_the_window_are_skipped():
    """A block wholly before every query's window is never computed: NaNs in it (which would
    poison the output if multiplied by a zero weight) do not reach the result."""
    q, keys, values = _case(4, 60, 4, 2)
    poisoned_keys, poisoned_values = keys.clone(), values.clone()
    poisoned_keys[:, :40], poisoned_values[:, :40] = float("nan"), float("nan")
    got = attend_blocks(q, split_blocks(poisoned_keys, poisoned_values, 20), 60, window=8)
    torch.testing.assert_close(got, _reference(q, keys, values, 60, window=8), rtol=1e-5, atol=1e-5)
    contiguous = attend(q, poisoned_keys, poisoned_values, 60, window=8)
    torch.testing.assert_close(contiguous, _reference(q, keys, values, 60, window=8), rtol=1e-5, atol=1e-5)


def test_softcap_memory_is_bounded_by_the_tile():
    """Contiguous KV with a soft-cap goes through the online softmax tile by tile: the largest
    score matrix is [heads, queries, KEY_TILE_TOKENS], not the whole context."""
    from tierflow.adapters.attention import KEY_TILE_TOKENS

    q, keys, values = _case(4, 4092, 8, 2)
    with _score_sizes() as seen:
        attend(q, keys, values, 4092, softcap=30.0)
    assert max(seen) == 8 * 4 * KEY_TILE_TOKENS
