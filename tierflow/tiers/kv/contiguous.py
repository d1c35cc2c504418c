"""KV cache in device memory, one contiguous tensor per layer.

``SequenceKV`` implements ``handle.KVHandle``: ``append(layer, k, v)`` stores a sweep's new keys
and values; ``blocks(layer)`` gives the layer's whole KV as a single block from position 0, so
attention makes one fused SDPA call over views it reads in place (a sliding window is sliced
out of them for free). Storage is per layer [kv_heads, capacity, head_dim], grown in whole
blocks of ``block_tokens``, a quarter more at a time
(``layout.contiguous_tokens``, which the batcher counts by). Nothing is ever off the device, so the kv_load stage has nothing to
prefetch and the kv_spill stage nothing to write. The paged, tiered cache (device / host / disk
blocks) is ``paged.PagedSequenceKV``, behind the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierflow.tiers.kv.handle import KVBlock, KVBlocks, OffDevice
from tierflow.tiers.kv.layout import CONTIGUOUS_STEP, contiguous_tokens


@dataclass(frozen=True, slots=True)
class KVStats:
    num_sequences: int
    num_tokens: int
    allocated_bytes: int


class SequenceKV:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, block_tokens: int = CONTIGUOUS_STEP, max_tokens: int | None = None,
                 seq_id: int = -1) -> None:
        self.seq_id = seq_id
        self.num_layers, self.block_tokens, self.max_tokens = num_layers, block_tokens, max_tokens
        self._shape = (num_kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        self._keys = [torch.empty(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._values = [torch.empty(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._lengths = [0] * num_layers
        self.failure: BaseException | None = None     # set by ``fail``: why this sequence's KV is unusable

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV is stored in every layer."""
        return min(self._lengths)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` [n, kv_heads, head_dim] after the layer's stored tokens."""
        start, n = self._lengths[layer], k.shape[0]
        end = start + n
        if end > self._keys[layer].shape[1]:
            capacity = contiguous_tokens(end, self.block_tokens)   # what the batcher counts it for
            if self.max_tokens is not None:     # never more than the sequence may reach
                capacity = max(end, min(capacity, self.max_tokens))
            self._keys[layer] = self._grow(self._keys[layer], start, capacity)
            self._values[layer] = self._grow(self._values[layer], start, capacity)
        self._keys[layer][:, start:end] = k.transpose(0, 1)
        self._values[layer][:, start:end] = v.transpose(0, 1)
        self._lengths[layer] = end

    def blocks(self, layer: int, first_position: int = 0) -> KVBlocks:
        """All of the layer's KV as one block from position 0 (attention slices a window out of it)."""
        end = self._lengths[layer]
        return KVBlocks.of((KVBlock(self._keys[layer][:, :end], self._values[layer][:, :end], 0),))

    def off_device(self, layer: int, first_position: int = 0) -> tuple[OffDevice, ...]:
        return ()

    def fail(self, error: BaseException) -> None:
        """This sequence's KV failed (a spill fault): the rest of the sweep skips it, and the
        sweep reports ``error`` for it alone."""
        if self.failure is None:
            self.failure = error

    def _grow(self, old: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        new = torch.empty((old.shape[0], capacity, old.shape[2]), dtype=self._dtype, device=self._device)
        new[:, :used] = old[:, :used]
        return new

    def read(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of tokens start..end-1 of ``layer``: [2, kv_heads, end - start, head_dim]."""
        if not 0 <= start <= end <= self._lengths[layer]:
            raise ValueError(f"tokens {start}..{end} of layer {layer}: only {self._lengths[layer]} are stored")
        return torch.stack((self._keys[layer][:, start:end], self._values[layer][:, start:end]))

    def held_from(self, layer: int) -> int:
        return 0                        # every token is kept, sliding window or not

    def trim_rings(self, first_query: int) -> None:
        """Nothing to release: the contiguous store keeps every token."""

    def truncate(self, num_tokens: int) -> None:
        """Forget everything past ``num_tokens`` (a sweep that failed half-way)."""
        self._lengths = [min(n, num_tokens) for n in self._lengths]

    def free(self) -> None:
        self._keys = self._values = []
        self._lengths = [0] * self.num_layers
