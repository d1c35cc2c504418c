"""Attention over KV blocks with an online softmax.

When a layer's KV lives in blocks (some on the device, some still arriving from host memory
or disk), attention cannot see the whole key matrix at once. ``attend_blocks`` takes the
blocks one at a time and keeps, per query and head, the running maximum score ``m``, the
running sum of exponentials ``l`` and the running weighted sum of values ``acc``; each block
rescales them by ``exp(m_old - m_new)`` (the log-sum-exp merge). Memory is O(queries × block
tokens) whatever the context length, and the result equals softmax attention over all keys.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def attend_blocks(q: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
                  start: int) -> torch.Tensor:
    """Causal attention of ``q`` [n, H, D] (the queries at positions start..start+n-1) over
    ``blocks``: (keys [KVH, t, D], values [KVH, t, D], position of the block's first key), in
    any order, together covering keys 0..start+n-1 (keys past a query are masked). H must be
    a multiple of KVH (grouped-query attention). Accumulates in float32; returns [n, H*D] in
    ``q``'s dtype."""
    n, num_heads, d = q.shape
    query = q.transpose(0, 1).float() * (1.0 / math.sqrt(d))            # [H, n, D]
    q_pos = torch.arange(start, start + n, device=q.device)[:, None]    # [n, 1]
    m = torch.full((num_heads, n, 1), -math.inf, device=q.device)
    l = torch.zeros((num_heads, n, 1), device=q.device)
    acc = torch.zeros((num_heads, n, d), device=q.device)
    for keys, values, first in blocks:
        kv_heads, t = keys.shape[0], keys.shape[1]
        if num_heads % kv_heads:
            raise ValueError(f"{num_heads} query heads cannot share {kv_heads} KV heads")
        if first > start + n - 1:          # every key of the block is after every query
            continue
        group = num_heads // kv_heads
        k = keys.float().repeat_interleave(group, dim=0)                 # [H, t, D]
        v = values.float().repeat_interleave(group, dim=0)
        scores = query @ k.transpose(1, 2)                               # [H, n, t]
        if first + t - 1 > start:          # some keys are after some queries: mask them
            visible = torch.arange(first, first + t, device=q.device)[None, :] <= q_pos    # [n, t]
            scores = scores.masked_fill(~visible, -math.inf)
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)   # rows with no visible key yet
        p = torch.exp(scores - safe)
        alpha = torch.exp(m - safe)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + p @ v
        m = m_new
    if bool((l == 0).any()):
        raise ValueError("a query saw no key: the blocks must cover every position up to the query's")
    out = acc / l
    return out.transpose(0, 1).reshape(n, num_heads * d).to(q.dtype)


def split_blocks(keys: torch.Tensor, values: torch.Tensor, block_tokens: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """A contiguous KV [KVH, T, D] as blocks of ``block_tokens`` (views, no copies)."""
    total = keys.shape[1]
    return [(keys[:, s:s + block_tokens], values[:, s:s + block_tokens], s) for s in range(0, total, block_tokens)]
