"""Attention over runs of KV blocks that lie back to back in memory, a run at a time.

The online softmax (``attention._merge_blocks``) costs a dozen small tensor operations per
block. At decode a block is one query's scores over 256 keys, so the operations' fixed cost, not
their arithmetic, is the work: 16k tokens of context are 64 blocks a layer, and most of a decode
step went to dispatching them (bench/long_context.py's model: ~80% of the compute thread in the
block loop). But a paged store keeps a layer's blocks in runs of consecutive slots
(``tiers/kv/pool.py``: each (sequence, layer) takes its slots KV_READ_RUN at a time, in every
tier), and the kv_load stage reads a disk run into consecutive buffers of one window. Blocks in
consecutive slots are views evenly spaced in one storage, so a run of R of them is one strided
view ([R, KVH, t, D], no copy), and the online softmax can merge the whole run at once: one
product per KV head for the scores of all R blocks, one running-max update over all of them, one
product per KV head for their values. Per-block micro-benchmark, 64 blocks of 256 tokens, 8 query
/ 2 KV heads, head_dim 64, one query: 9.2 ms a layer block by block, 5.2 in runs of 4, 3.1 in runs
of 16 (float32, one thread).

Which blocks may be fetched together is the KV handle's to say (``KVBlocks.together``: their
views stay valid while the others are fetched — a kv_load run, pool slots). ``stacked`` checks
that the views really are evenly spaced and returns None otherwise; the caller then merges the
fetched blocks one by one, so a run's layout is an optimisation, never an assumption. Only blocks
that need no mask are merged in runs (every key before every query, inside every query's window),
only for calls of at most GROUP_QUERIES queries (decode, short speculative chunks: a prefill
chunk's blocks each carry enough arithmetic to be worth their operations), and a run's workspace
is capped at GROUP_BYTES (decode with 8 query heads of 64 dimensions: ~100 blocks of 256 tokens),
which the planner counts for such calls (``ATTENTION_GROUP_BYTES`` in
``tiers/plan/costmodel.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from tierflow.adapters.kv import KVBlock

GROUP_BYTES = 1 << 20     # float32 workspace of one run's scores, products and cast keys (the planner's ATTENTION_GROUP_BYTES)
GROUP_QUERIES = 16        # runs are merged for at most this many queries (the planner's ATTENTION_GROUP_QUERIES)


def run_limit(queries: int, num_heads: int, tokens: int, head_dim: int, cast: bool) -> int:
    """How many blocks of ``tokens`` keys one run may merge for ``queries`` queries: 1 for more
    than GROUP_QUERIES of them (a prefill chunk's blocks are worth their operations), else as
    many as keep its scores and products, [KVH, R, rows, t + D] with KVH x rows = ``num_heads``
    x ``queries``, and with ``cast`` (keys and values not float32) one KV head's keys or values cast,
    [R, t, D], within GROUP_BYTES."""
    if queries > GROUP_QUERIES:
        return 1
    per_block = 4 * (num_heads * queries * (tokens + head_dim) + (tokens * head_dim if cast else 0))
    return max(1, GROUP_BYTES // per_block)


def stacked(blocks: Sequence[KVBlock]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values of ``blocks`` as [R, KVH, t, D] views of their common storage, or None
    unless every block has the first one's shape and strides and they are evenly spaced in one
    storage, keys and values alike."""
    if len(blocks) < 2:
        return None
    k0, v0 = blocks[0].keys, blocks[0].values
    size = k0.element_size()
    step = blocks[1].keys.data_ptr() - k0.data_ptr()
    if step <= 0 or step % size:
        return None
    storage = k0.untyped_storage().data_ptr()
    for j, block in enumerate(blocks):
        keys, values = block.keys, block.values
        if (keys.shape != k0.shape or values.shape != v0.shape or keys.stride() != k0.stride()
                or values.stride() != v0.stride() or keys.dtype != k0.dtype or values.dtype != v0.dtype
                or keys.data_ptr() != k0.data_ptr() + j * step or values.data_ptr() != v0.data_ptr() + j * step
                or keys.untyped_storage().data_ptr() != storage or values.untyped_storage().data_ptr() != storage):
            return None
    count, stride = len(blocks), step // size
    return (k0.as_strided((count, *k0.shape), (stride, *k0.stride()), k0.storage_offset()),
            v0.as_strided((count, *v0.shape), (stride, *v0.stride()), v0.storage_offset()))


def merge_run(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, m: torch.Tensor, l: torch.Tensor,
              acc: torch.Tensor, softcap: float | None) -> None:
    """Merge a run of unmasked blocks into the online softmax's running state, in place.
    ``query`` [KVH, rows, D] (float32, scaled); ``keys`` / ``values`` [R, KVH, t, D]; ``m`` / ``l``
    [KVH, rows, 1] and ``acc`` [KVH, rows, D], the running maximum, sum and weighted values."""
    count, kv_heads, tokens, d = keys.shape
    rows = query.shape[1]
    scores = torch.empty((kv_heads, count, rows, tokens), device=query.device)
    products = torch.empty((kv_heads, count, rows, d), device=query.device)
    for h in range(kv_heads):
        torch.matmul(query[h], keys[:, h].float().transpose(1, 2), out=scores[h])     # [R, rows, t]
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    m_new = torch.maximum(m, scores.amax(dim=(1, 3)).unsqueeze(-1))     # every key is visible: finite
    p = scores.sub_(m_new.unsqueeze(1)).exp_()                           # in place: the probabilities
    alpha = torch.exp(m - m_new)
    l.mul_(alpha).add_(p.sum(dim=(1, 3)).unsqueeze(-1))
    for h in range(kv_heads):
        torch.bmm(p[h], values[:, h].float(), out=products[h])                       # [R, rows, D]
    acc.mul_(alpha).add_(products.sum(dim=1))
    m.copy_(m_new)
