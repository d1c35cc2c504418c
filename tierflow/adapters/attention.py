"""Causal attention of one sequence's new queries over its KV.

``attend_kv`` is what the decoder calls: it takes the KV handle's blocks (``KVBlocks``, one
shape whatever the store) and picks the kernel from that shape alone — a single block from
position 0 (the contiguous store, or a paged sequence whose KV is still all in its tail) goes
to ``attend`` (one fused call where no mask is needed, key tiles otherwise), anything else to
``attend_blocks``. It first checks on the host, from the blocks' spans, that every query sees
at least one key: nothing inside attention waits for the device (no ``.item()``, no
``bool(tensor)``), so on CUDA the host enqueues a layer's attention and moves on while copies
and kernels run.

``attend`` takes the whole KV as contiguous tensors. One fused SDPA call serves the calls that
need no explicit mask: a single query (decode: it sees every key from its window's first,
which is where the keys are cut) and a causal chunk from position 0 that no narrower window
cuts (``is_causal``). Every other chunk needs a mask — it starts mid-sequence (a later prefill
chunk), or its window is narrower than the chunk — and SDPA with a mask is not a bounded
kernel: on CUDA its flash backend refuses a mask and its memory-efficient one refuses
grouped-query attention, so a masked GQA call falls to the math backend, which builds the
whole [heads, queries, keys] score matrix and repeats K/V per query head (gigabytes at 32k
context); on any device the mask itself is [queries, keys]. Those calls, and soft-capped ones
(SDPA cannot apply the cap), go through ``attend_blocks`` in tiles of ``KEY_TILE_TOKENS`` keys
on every device alike: memory stays O(queries × tile), as the planner budgets it
(``tiers/plan/costmodel.py:ModelCosts.attention_bytes``, tiling by the same count). On the CPU,
whose flash kernel would take the mask, the tiles cost some speed on long chunks (measured on
one thread: 10-30% on a 512-query chunk over 4k keys); one bounded path the planner counts is
worth it. The same holds for an unmasked grouped-query call on CUDA that the flash backend cannot
take (fp32, or head_dim > 256: ``fused_sdpa_is_lean``): it would fall to the math backend as
well, so it takes the tiles too. On a CUDA device, when the ``flash-attn`` package is importable and takes the call
(fp16/bf16, head_dim <= 256; see ``flash``), ``attend`` hands it to ``flash_attend`` instead,
which applies the window and the softcap inside the kernel; ``attention_backend`` says which of
these a device and dtype get.

``attend_blocks`` is for KV that lives in blocks (some on the device, some still arriving
from host memory or disk), where attention cannot see the whole key matrix at once. It takes
the blocks one at a time and keeps, per query and head, the running maximum score ``m``, the
running sum of exponentials ``l`` and the running weighted sum of values ``acc``; each block
rescales them by ``exp(m_old - m_new)`` (the log-sum-exp merge). Memory is O(queries × block
tokens) whatever the context length, and the result equals softmax attention over all keys.

Both take the same options: ``scale`` (of q·k; default head_dim ** -0.5), ``window`` (a
sliding window: the query at position p sees keys p - window + 1 .. p) and ``softcap``
(scores become softcap * tanh(scores / softcap) before masking and softmax). A block
wholly outside every query's window is skipped without computing its scores.

``sinks`` ([heads], any float dtype, used in float32) are gpt-oss's attention sinks: one learned
logit per query head joins every softmax row after scaling, capping and masking, and its
probability is dropped, so a row's weights over real keys sum to less than 1. The online softmax
takes the sink into its final normalisation only (it is one more "key" with no value): with the
row's running max ``m``, sum ``l`` and ``acc``, and ``m' = max(m, sink)``, the output is
``acc·e^(m-m') / (l·e^(m-m') + e^(sink-m'))`` — no exponent is positive, so a sink of any size
(+20, -30) stays finite. The fused SDPA call has no place for a sink, so with sinks every call that
would go to SDPA takes the key tiles instead (a decode of one query over at most
``KEY_TILE_TOKENS`` keys is a single tile pass); flash-attn keeps the call and corrects its output
from the log-sum-exp it returns (see ``flash.flash_attend``). ``sinks=None`` computes exactly what
it did before sinks existed.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from tierflow.adapters.blas import SERIAL_BLAS_MACS, serial_blas
from tierflow.adapters.block_runs import merge_run, run_limit, stacked
from tierflow.adapters.flash import (check_sinks, flash_attend, flash_device_supported, flash_head_dim_supported,
                                     flash_supported)
from tierflow.adapters.kv import KVBlock, KVBlocks, first_visible
from tierflow.adapters.tree import DeviceTree

KEY_TILE_TOKENS = 512     # keys per tile of contiguous KV in the online softmax (the planner's ATTENTION_KEY_TILE)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, *, scale: float | None = None,
           window: int | None = None, softcap: float | None = None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` [n, H, D] (positions start..start+n-1) over ``keys`` /
    ``values`` [KVH, start+n, D]; returns [n, H*D]. With ``sinks`` SDPA is never called: the
    calls it would take go to the key tiles (the module docstring says why)."""
    if flash_supported(q, keys, softcap, window):
        return flash_attend(q, keys, values, start, scale=scale, window=window, softcap=softcap, sinks=sinks)
    n, num_heads, d = q.shape
    first = first_visible(start, window)     # the earliest key any query sees
    keys, values = keys[:, first:], values[:, first:]
    if (sinks is not None or softcap is not None or _needs_mask(start, n, window)
            or not fused_sdpa_is_lean(q, keys)):
        return attend_blocks(q, split_blocks(keys, values, KEY_TILE_TOKENS, first=first), start, scale=scale,
                             window=window, softcap=softcap, sinks=sinks)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], is_causal=n > 1,
                                         scale=scale, enable_gqa=num_heads != keys.shape[0])
    return out[0].transpose(0, 1).reshape(n, num_heads * d)


def _needs_mask(start: int, n: int, window: int | None) -> bool:
    """Whether ``n`` queries from ``start`` over the keys from ``first_visible(start, window)`` need
    an explicit mask: not for one query (it sees every key from there), nor for a causal chunk
    from position 0 that its window does not narrow (SDPA's ``is_causal`` is that mask)."""
    return n > 1 and (start > 0 or (window is not None and window < n))


def fused_sdpa_is_lean(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether one unmasked SDPA call avoids the math backend's full score matrix and per-head
    copies of K/V. On CUDA grouped-query attention is taken only by the flash backend (fp16/bf16,
    head_dim <= 256; the memory-efficient one refuses GQA); elsewhere the call is lean."""
    if q.device.type != "cuda" or q.shape[1] == keys.shape[0]:
        return True
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attend_kv(q: torch.Tensor, blocks: KVBlocks, start: int, *, scale: float | None = None,
              window: int | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None, tree: DeviceTree | None = None) -> torch.Tensor:
    """Causal attention of ``q`` [n, H, D] (positions start..start+n-1) over a KV handle's
    ``blocks``; returns [n, H*D]. With a candidate ``tree`` the chunk's queries see their
    ancestors of the chunk, not every earlier chunk token (``adapters/tree.py``): always the
    online softmax, whose per-block mask takes it."""
    spans = blocks.spans
    if tree is not None:
        return _online_softmax(q, blocks, start, scale=scale, window=window, softcap=softcap, sinks=sinks, tree=tree)
    if len(spans) == 1 and spans[0][0] == 0:
        keys, values, _ = blocks.fetch(0)
        return attend(q, keys, values, start, scale=scale, window=window, softcap=softcap, sinks=sinks)
    return _online_softmax(q, blocks, start, scale=scale, window=window, softcap=softcap, sinks=sinks)


def check_coverage(spans: Sequence[tuple[int, int]], start: int, n: int, window: int | None) -> None:
    """Raise ValueError if a query at start..start+n-1 would see no key among ``spans`` ((first
    position, tokens) of each block): a query at p sees p - window + 1 .. p. Host arithmetic only."""
    last, covered_to = start + n - 1, -1         # covered_to: the last position covered so far
    gaps = []
    for first, t in sorted((f, t) for f, t in spans if t > 0):
        if first > covered_to + 1:
            gaps.append((covered_to, first - 1))
        covered_to = max(covered_to, first + t - 1)
    gaps.append((covered_to, last))
    for before, gap_end in gaps:           # positions before+1 .. gap_end hold no key
        lo, hi = max(before + 1, start), min(gap_end, last)
        if lo > hi:
            continue
        sees = before >= 0 and (window is None or before > hi - window)
        if not sees:
            raise ValueError(f"the query at position {hi} saw no key: the blocks must cover every position up to "
                             "the query's (within its window)")


def attention_backend(device: torch.device | str, dtype: torch.dtype, *, head_dim: int | None = None) -> str:
    """Which kernel ``attend`` uses for queries on ``device`` in ``dtype`` (and ``head_dim``, if
    given): "flash-attn", "sdpa" (CUDA without flash-attn) or "sdpa-<device type>" ("sdpa-cpu").
    Under SDPA, calls that need a mask (a chunk after position 0, a window narrower than the
    chunk), soft-capped ones and ones with sinks take the online softmax in key tiles instead."""
    device = torch.device(device)
    if (head_dim is None or flash_head_dim_supported(head_dim)) and flash_device_supported(device, dtype):
        return "flash-attn"
    return "sdpa" if device.type == "cuda" else f"sdpa-{device.type}"


def _visible(start: int, n: int, first: int, t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[n, t] bool: which of the keys at first..first+t-1 each query at start..start+n-1 sees."""
    q_pos = torch.arange(start, start + n, device=device)[:, None]
    k_pos = torch.arange(first, first + t, device=device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    return visible


def attend_blocks(q: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, int]], start: int, *,
                  scale: float | None = None, window: int | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` [n, H, D] (the queries at positions start..start+n-1) over
    ``blocks``: (keys [KVH, t, D], values [KVH, t, D], position of the block's first key), in
    any order, together covering keys 0..start+n-1 (keys past a query, or outside its
    window, are masked). H must be a multiple of KVH (grouped-query attention). ``sinks`` [H]:
    one more logit per query head in every row, whose probability is dropped. Accumulates
    in float32; returns [n, H*D] in ``q``'s dtype."""
    return _online_softmax(q, KVBlocks.of([KVBlock(*block) for block in blocks]), start, scale=scale,
                           window=window, softcap=softcap, sinks=sinks)


def _online_softmax(q: torch.Tensor, blocks: KVBlocks, start: int, *, scale: float | None, window: int | None,
                    softcap: float | None, sinks: torch.Tensor | None = None,
                    tree: DeviceTree | None = None) -> torch.Tensor:
    """``attend_blocks`` over lazy blocks: coverage is checked from the spans first, and a
    block outside every query's window (or after every query) is skipped unfetched. A
    ``tree`` masks every block that holds chunk keys, or that a window cuts, by its ancestry."""
    n, num_heads, d = q.shape
    check_coverage(blocks.spans, start, n, window)
    check_sinks(sinks, num_heads)
    # one product per block and KV head of [G*n, D] x [D, t]: small ones skip MKL's thread team
    longest = max((t for _, t in blocks.spans), default=0)
    small = q.device.type == "cpu" and n * num_heads * d * longest < SERIAL_BLAS_MACS
    with serial_blas(small):
        return _merge_blocks(q, blocks, start, scale=scale, window=window, softcap=softcap, sinks=sinks, tree=tree)


def _merge_blocks(q: torch.Tensor, blocks: KVBlocks, start: int, *, scale: float | None, window: int | None,
                  softcap: float | None, sinks: torch.Tensor | None, tree: DeviceTree | None) -> torch.Tensor:
    """The block loop of ``_online_softmax`` (its checks done): a run of unmasked blocks that
    ``blocks.together`` lets it fetch at once and that lie evenly spaced in memory is merged in
    one step (``block_runs``), every other block on its own."""
    n, num_heads, d = q.shape
    last = start + n - 1
    query = torch.empty((num_heads, n, d), device=q.device)      # [H, n, D] in float32, scaled
    query.copy_(q.transpose(0, 1)).mul_(1.0 / math.sqrt(d) if scale is None else scale)
    m = torch.full((num_heads, n, 1), -math.inf, device=q.device)
    l = torch.zeros((num_heads, n, 1), device=q.device)
    acc = torch.zeros((num_heads, n, d), device=q.device)
    spans = blocks.spans

    def masked(first: int, t: int) -> bool:
        """Some keys are after some queries, or before the window of the last query."""
        return first + t - 1 > start or (window is not None and first <= last - window)

    def run_length(index: int, cast: bool) -> int:
        """Blocks from ``index`` to merge as one run: fetched together, of one length, back to
        back in position, none masked."""
        t = spans[index][1]
        count = blocks.together(index, run_limit(n, num_heads, t, d, cast)) \
            if blocks.together is not None and not masked(*spans[index]) else 1
        for j in range(index + 1, index + count):
            if spans[j] != (spans[j - 1][0] + t, t) or masked(*spans[j]):
                return j - index
        return count

    workspace: torch.Tensor | None = None      # the scores of one block, reused: no allocation per block
    index = 0
    while index < len(spans):
        first, t = spans[index]
        if first > last or (window is not None and first + t - 1 <= start - window):
            index += 1                     # after every query, or before every query's window
            continue
        block = blocks.fetch(index)
        kv_heads = block.keys.shape[0]
        if num_heads % kv_heads:
            raise ValueError(f"{num_heads} query heads cannot share {kv_heads} KV heads")
        # Grouped-query attention without copying keys per head: the G query heads that share
        # a KV head are rows of one matmul, [KVH, G*n, D] @ [KVH, D, t].
        rows = num_heads // kv_heads * n
        q_g = query.view(kv_heads, rows, d)
        m_g, l_g, acc_g = m.view(kv_heads, rows, 1), l.view(kv_heads, rows, 1), acc.view(kv_heads, rows, d)
        count = run_length(index, block.keys.dtype != torch.float32)
        run = [block] + [blocks.fetch(j) for j in range(index + 1, index + count)]
        views = stacked(run)
        if views is not None:
            merge_run(q_g, *views, m_g, l_g, acc_g, softcap)
        for block, (first, t) in zip(run if views is None else (), spans[index:index + count]):
            if workspace is None or workspace.numel() < kv_heads * rows * t:
                workspace = torch.empty(kv_heads * rows * t, device=q.device)
            _merge_block(q_g, block, workspace[:kv_heads * rows * t].view(kv_heads, rows, t), m_g, l_g, acc_g,
                         (_visible(start, n, first, t, window, q.device) if tree is None
                          else tree.visible(start, first, t, window)) if masked(first, t) else None, softcap)
        index += count
    if sinks is not None:        # the sink: one more logit per row, in l but with no value in acc
        sink = sinks.to(device=q.device, dtype=torch.float32).view(num_heads, 1, 1)
        m_sink = torch.maximum(m, sink)
        alpha = torch.exp(m - m_sink)
        acc.mul_(alpha)
        l.mul_(alpha).add_(torch.exp(sink - m_sink))
    out = torch.empty((n, num_heads, d), dtype=q.dtype, device=q.device)
    out.copy_(acc.div_(l).transpose(0, 1))
    return out.view(n, num_heads * d)


def _merge_block(q_g: torch.Tensor, block: KVBlock, scores: torch.Tensor, m_g: torch.Tensor, l_g: torch.Tensor,
                 acc_g: torch.Tensor, visible: torch.Tensor | None, softcap: float | None) -> None:
    """Merge one block into the running state: ``scores`` [KVH, rows, t] its workspace,
    ``visible`` its [n, t] mask (None: none needed)."""
    kv_heads, rows, t = scores.shape
    torch.bmm(q_g, block.keys.float().transpose(1, 2), out=scores)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    masked = visible is not None
    if masked:
        scores.view(kv_heads, -1, visible.shape[0], t).masked_fill_(~visible, -math.inf)
    m_new = torch.maximum(m_g, scores.amax(dim=-1, keepdim=True))
    # a row with no visible key yet has m = -inf (only possible where something was masked)
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new) if masked else m_new
    p = scores.sub_(safe).exp_()                                     # in place: the probabilities
    alpha = torch.exp(m_g - safe)
    l_g.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
    acc_g.mul_(alpha).baddbmm_(p, block.values.float())
    m_g.copy_(m_new)


def split_blocks(keys: torch.Tensor, values: torch.Tensor, block_tokens: int, *, first: int = 0
                 ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """A contiguous KV [KVH, T, D] whose first key is at position ``first`` as blocks of
    ``block_tokens`` (views, no copies)."""
    total = keys.shape[1]
    return [(keys[:, s:s + block_tokens], values[:, s:s + block_tokens], first + s)
            for s in range(0, total, block_tokens)]
