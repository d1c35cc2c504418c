"""Candidate-tree attention: every query of a tree chunk gets exactly the attention a causal
sequence made of the committed keys and its own path (its ancestors, then itself) would give it,
with grouped-query heads, a sliding window, a soft-cap and sinks; over one contiguous block and
over many blocks that split the chunk; and a tree mask that ignored the ancestry (a plain causal
chunk) gives different numbers."""

from __future__ import annotations

import pytest
import torch

from tierflow.adapters.attention import attend, attend_kv, split_blocks
from tierflow.adapters.kv import KVBlock, KVBlocks
from tierflow.adapters.tree import TreeMask

TREE = TreeMask((-1, 0, 1, 2, 0, 1, 0, 4))   # a root, a chain of 3, and siblings at depths 1, 2 and 2


def _path(tree: TreeMask, j: int) -> list[int]:
    path = []
    while j >= 0:
        path.append(j)
        j = tree.parents[j]
    return path[::-1]


def _case(committed: int, tree: TreeMask, heads: int = 4, kv_heads: int = 2, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = len(tree)
    q = torch.randn(n, heads, d, generator=g)
    keys = torch.randn(kv_heads, committed + n, d, generator=g)
    values = torch.randn(kv_heads, committed + n, d, generator=g)
    return q, keys, values


def _reference(q, keys, values, committed, tree, **options):
    """Each query alone: causal attention over the committed keys and its path's keys, laid out
    as the sequence that path is."""
    out = []
    for j in range(len(tree)):
        path = _path(tree, j)
        slots = list(range(committed)) + [committed + i for i in path]
        k, v = keys[:, slots], values[:, slots]
        out.append(attend(q[j:j + 1], k, v, committed + len(path) - 1, **options))
    return torch.cat(out)


@pytest.mark.parametrize("committed", [0, 5, 37])
@pytest.mark.parametrize("options", [{}, {"window": 6}, {"softcap": 3.0}, {"sinks": "yes"}, {"window": 40}])
@pytest.mark.parametrize("block", [None, 4, 8])
def test_tree_attention_is_each_path_s_causal_attention(committed, options, block):
    q, keys, values = _case(committed, TREE)
    if options.get("sinks"):
        options = {"sinks": torch.tensor([0.5, -1.0, 2.0, 0.0])}
    expected = _reference(q, keys, values, committed, TREE, **options)
    blocks = (KVBlocks.of([KVBlock(keys, values, 0)]) if block is None else
              KVBlocks.of([KVBlock(*b) for b in split_blocks(keys, values, block)]))
    got = attend_kv(q, blocks, committed, tree=TREE.on("cpu"), **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_causal_mask_over_a_tree_chunk_gives_other_numbers():
    q, keys, values = _case(5, TREE)
    expected = _reference(q, keys, values, 5, TREE)
    causal = attend_kv(q, KVBlocks.of([KVBlock(keys, values, 0)]), 5)
    assert (causal - expected).abs().max() > 1e-2
    chain = TreeMask.chain(len(TREE))
    torch.testing.assert_close(attend_kv(q, KVBlocks.of([KVBlock(keys, values, 0)]), 5, tree=chain.on("cpu")), causal,
                               rtol=1e-5, atol=1e-5)


def test_positions_and_a_bad_tree():
    assert TREE.depths == (0, 1, 2, 3, 1, 2, 1, 2)
    assert TREE.positions(10) == [10, 11, 12, 13, 11, 12, 11, 12]
    assert TreeMask.chain(3).parents == (-1, 0, 1)
    with pytest.raises(ValueError, match="parent comes before its child"):
        TreeMask((-1, 1))
