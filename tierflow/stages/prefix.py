"""Prefix reuse between a sequence's KV and the prefix cache.

``attach`` runs when a sequence is admitted: it copies the cached blocks of the longest
cached prefix of its prompt into the sequence's KV (contiguous or paged, through the same
``append`` attention uses), so prefill starts after them. At least one prompt token is
always left to compute, since the first new token is sampled from its logits. ``remember``
runs when a prompt's prefill completes and when a sequence ends: it copies each full block
the cache lacks out of the sequence's KV into the cache, so a later request over the same
document — or the next turn of a conversation — finds it. Both run in the compute worker,
between sweeps, so they never race a sweep over the same KV storage.

Sliding-window models. A paged sliding-window layer keeps only a ring of blocks, so a block can
be cached only while every layer still holds it. ``attach`` fills the rings through ``append``
like a prefill would and then releases what the first prefill sweep's append would
(``trim_rings``), so the sequence holds what the batcher's layout says. ``remember`` stores the
blocks every layer still holds (``held_from``), in order, and stops at the first block that is
neither cached nor held any more: a chain key is found only after every block before it, so a
block after such a gap could never be matched. Between two prefill sweeps a ring still holds
every block from the one the last sweep's window started in, so remembering after every
prefill sweep (not only the last) caches a windowed prompt whole.

The stage takes the cache's budgets as plain arguments (``for_model``), not the engine's
config: stages sit below the engine and ``tierflow.config`` (tests/test_layers.py).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from tierflow.adapters.rope import rope_kind
from tierflow.errors import ConfigError
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.kv.prefix import PrefixCache
from tierflow.tiers.kv.prefix_keys import model_fingerprint


class PrefixReuse:
    def __init__(self, cache: PrefixCache, num_layers: int) -> None:
        self.cache, self.num_layers = cache, num_layers
        self.block_tokens = cache.block_tokens

    @classmethod
    def for_model(cls, index: CheckpointIndex, dtype: torch.dtype, block_tokens: int, *, memory_bytes: int,
                  directory: str | os.PathLike[str] | None, disk_bytes: int | None) -> "PrefixReuse":
        """The prefix cache of ``index``'s model (blocking: hashes weight files): ``memory_bytes`` of
        host memory, blocks kept across processes in ``directory`` (if given) up to ``disk_bytes``."""
        spec = index.spec
        if rope_kind(spec.rope_scaling) == "longrope":
            raise ConfigError("the prefix cache cannot serve a longrope model: a token's keys depend on whether its "
                              "whole sequence ever passes original_max_position_embeddings, which a cached prefix "
                              "cannot know; open the engine without prefix_cache_bytes / prefix_cache_dir")
        if spec.linear_layers:
            raise ConfigError(f"the prefix cache cannot serve {spec.architecture}: its linear-attention layers keep "
                              "a sequence's whole past in one state, not in KV blocks a cached prefix could restore; "
                              "open the engine without prefix_cache_bytes / prefix_cache_dir")
        shape = (spec.num_layers, 2, spec.num_kv_heads, block_tokens, spec.head_dim)
        cache = PrefixCache(model_fingerprint(index.config, index.files, dtype), shape, dtype,
                            memory_bytes=memory_bytes, directory=directory, disk_bytes=disk_bytes)
        return cls(cache, spec.num_layers)

    def attach(self, kv: Any, prompt_ids: Sequence[int]) -> int:
        """Fill ``kv`` (empty) with the cached prefix of ``prompt_ids``; returns its tokens."""
        keys = self.cache.keys(prompt_ids[:len(prompt_ids) - 1])
        blocks = self.cache.load(keys[:self.cache.match(keys)])
        for block in blocks:
            for layer in range(self.num_layers):
                kv.append(layer, block[layer, 0].transpose(0, 1), block[layer, 1].transpose(0, 1))
        cached = len(blocks) * self.block_tokens
        kv.trim_rings(cached)
        return cached

    def remember(self, kv: Any, token_ids: Sequence[int], done_blocks: int) -> int:
        """Store the full blocks of ``kv`` from block ``done_blocks`` on that the cache lacks;
        ``token_ids`` are the sequence's tokens (at least those whose KV exists). Returns the
        number of full blocks now covered (in the cache, from block 0): it stops short of the
        full blocks at the first one neither cached nor held by every layer any more."""
        bt = self.block_tokens
        full = min(kv.num_tokens, len(token_ids)) // bt
        if full <= done_blocks:
            return done_blocks
        keys = self.cache.keys(token_ids[:full * bt])
        held_from = max(kv.held_from(layer) for layer in range(self.num_layers))
        for j in range(done_blocks, full):
            if self.cache.contains(keys[j]):
                continue
            if j * bt < held_from:      # a sliding window's ring released it: the chain stops here
                return j
            block = torch.stack([kv.read(layer, j * bt, (j + 1) * bt) for layer in range(self.num_layers)])
            self.cache.store(keys[j], block)
        return full
