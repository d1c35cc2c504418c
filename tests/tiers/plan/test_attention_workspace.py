"""The planner's attention workspace (``ModelCosts.attention_bytes``) against what attention
holds when it runs: every route ``adapters.attention.attend`` takes on the CPU — the key tiles
of a masked prefill chunk, a narrow window or a soft-cap, and the fused SDPA call — stays
within it, and for the tiled path the figure is within a quarter of what is measured, not a
loose cap. (What a fused kernel allocates inside itself is not seen, only its output: those
buffers are the kernel's own tiles.)"""

from __future__ import annotations

import pytest
import torch

from tests.adapters.test_attention_routing import _case, costs_for, peak_bytes
from tierflow.adapters.attention import KEY_TILE_TOKENS, attend
from tierflow.tiers.plan.costmodel import ATTENTION_KEY_TILE


def test_the_planner_tiles_keys_as_attention_does():
    assert ATTENTION_KEY_TILE == KEY_TILE_TOKENS


# (queries, start, options): chunks after position 0 (within a tile, across tiles, longer than
# a tile), a window narrower than the chunk, a soft-cap, and the unmasked fused calls
ROUTES = {
    "chunk-after-0": (256, 3840, {}),
    "chunk-in-one-tile": (64, 100, {}),
    "chunk-longer-than-a-tile": (700, 1300, {}),
    "narrow-window": (512, 0, dict(window=128)),
    "window-after-0": (256, 3840, dict(window=1000)),
    "softcap": (256, 3840, dict(softcap=30.0)),
    "causal-from-0": (512, 0, {}),
    "decode": (1, 4095, {}),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_attention_bytes_cover_what_attention_holds(route, dtype, heads, kv_heads):
    n, start, options = ROUTES[route]
    d = 64
    q, keys, values = _case(n, start, heads, kv_heads, d=d, dtype=dtype)
    measured = peak_bytes(attend, q, keys, values, start, **options)
    budget = costs_for(heads, kv_heads, d, dtype.itemsize).attention_bytes(n, start + n)
    assert measured <= budget
    tiled = n > 1 and (start > 0 or "window" in options or "softcap" in options)
    if tiled:
        assert budget <= 1.25 * measured


def test_attention_bytes_grow_with_queries_not_with_context():
    model = costs_for(32, 8, 128, 2)
    at_4k, at_32k = model.attention_bytes(2048, 4096), model.attention_bytes(2048, 32768)
    assert at_4k == at_32k
    assert at_32k < 32 * 2048 * 32768 * 4 / 20        # a twentieth of the whole score matrix


def test_the_planner_bounds_runs_of_blocks_as_attention_does():
    from tierflow.adapters.block_runs import GROUP_BYTES, GROUP_QUERIES
    from tierflow.tiers.plan.costmodel import ATTENTION_GROUP_BYTES, ATTENTION_GROUP_QUERIES
    assert (ATTENTION_GROUP_BYTES, ATTENTION_GROUP_QUERIES) == (GROUP_BYTES, GROUP_QUERIES)


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("context,block", [(512, 16), (16384, 256)])
def test_attention_bytes_cover_runs_of_paged_blocks(n, dtype, context, block):
    """Decode (and short chunks) over a paged store's blocks in consecutive pool slots merge them
    in runs (``adapters/block_runs.py``), in a larger workspace than one block's: the planner's
    figure for those calls still covers it, at a short context and a long one."""
    from tierflow.adapters.attention import attend_kv
    from tierflow.adapters.kv import KVBlock, KVBlocks

    heads, kv_heads, d = 8, 2, 64
    count = context // block
    pool = torch.randn(count, 2, kv_heads, block, d).to(dtype)
    blocks = KVBlocks.of([KVBlock(pool[i, 0], pool[i, 1], i * block) for i in range(count)],
                         together=lambda i, most: min(most, count - i))
    q = torch.randn(n, heads, d).to(dtype)
    measured = peak_bytes(attend_kv, q, blocks, context - n)
    assert measured <= costs_for(heads, kv_heads, d, dtype.itemsize).attention_bytes(n, context)
