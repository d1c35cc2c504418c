"""KV cache in device memory, one contiguous tensor per layer.

``SequenceKV`` implements ``handle.KVHandle``: ``append(layer, k, v)`` stores a sweep's new keys
and values; ``blocks(layer)`` gives the layer's whole KV as a single block from position 0, so
attention makes one fused SDPA call over views it reads in place (a sliding window is sliced
out of them for free). Storage is per layer [kv_heads, capacity, head_dim], grown in whole
blocks of ``block_tokens``, a quarter more at a time
(``layout.contiguous_tokens``, which the batcher counts by). Nothing is ever off the device, so the kv_load stage has nothing to
prefetch and the kv_spill stage nothing to write. The paged, tiered cache (device / host / disk
blocks) is ``sequence.PagedSequenceKV``, behind the same protocol.

A sliding-window layer (``windows[layer]`` set, with ``max_chunk_tokens``: the most tokens one
sweep appends) keeps a ring: it grows to at most ``ring = window - 1 + max_chunk_tokens`` tokens
(in whole steps), then position p lives at slot ``p % ring``, so a sweep's queries still see
every key of their windows while older keys are overwritten — at 100k tokens of context such a
layer holds its window plus a chunk, not the context. Until it wraps it is one block from
position 0 as before; once wrapped, ``blocks`` gives the held positions as one or two blocks in
position order (attention then takes the online softmax over them). A chunk longer than
``max_chunk_tokens`` widens the ring first (its keys are laid out again), so nothing a query
needs is overwritten. ``truncate`` (a failed sweep, rejected speculative tokens) keeps what the
ring still holds: it never drops more than a chunk, and the ring holds a chunk beyond every window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tierflow.adapters.kv import HeldState
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
                 seq_id: int = -1, windows: Sequence[int | None] = (), max_chunk_tokens: int | None = None) -> None:
        self.seq_id = seq_id
        self.num_layers, self.block_tokens, self.max_tokens = num_layers, block_tokens, max_tokens
        self._shape = (num_kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        self._keys = [torch.empty(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._values = [torch.empty(self._shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._lengths = [0] * num_layers
        # per layer: the sliding window (None: full attention, or no ring without max_chunk_tokens),
        # the ring's size in tokens once it stops growing, and the first position still held
        self._windows: list[int | None] = [
            windows[layer] if layer < len(windows) and max_chunk_tokens is not None else None
            for layer in range(num_layers)]
        self._rings: list[int | None] = [
            None if w is None else _round_up(w - 1 + int(max_chunk_tokens or 0), block_tokens) for w in self._windows]
        self._low = [0] * num_layers
        self.failure: BaseException | None = None     # set by ``fail``: why this sequence's KV is unusable
        self._states: dict[int, HeldState] = {}   # linear-attention layers' states

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
        ring = self._rings[layer]
        if ring is not None and end > ring:
            self._ring_append(layer, start, k, v)
            return
        if end > self._keys[layer].shape[1]:
            capacity = contiguous_tokens(end, self.block_tokens)   # what the batcher counts it for
            if self.max_tokens is not None:     # never more than the sequence may reach
                capacity = max(end, min(capacity, self.max_tokens))
            if ring is not None:
                capacity = min(capacity, ring)
            self._keys[layer] = self._grow(self._keys[layer], start, capacity)
            self._values[layer] = self._grow(self._values[layer], start, capacity)
        self._keys[layer][:, start:end] = k.transpose(0, 1)
        self._values[layer][:, start:end] = v.transpose(0, 1)
        self._lengths[layer] = end

    def blocks(self, layer: int, first_position: int = 0) -> KVBlocks:
        """All of the layer's KV as one block from position 0 (attention slices a window out of it);
        a wrapped ring's held positions from ``first_position`` on, as one or two blocks."""
        end = self._lengths[layer]
        if self._low[layer] == 0 and end <= self._keys[layer].shape[1]:
            return KVBlocks.of((KVBlock(self._keys[layer][:, :end], self._values[layer][:, :end], 0),))
        low = max(first_position, self._low[layer])
        return KVBlocks.of(tuple(KVBlock(self._keys[layer][:, a:b], self._values[layer][:, a:b], first)
                                 for first, a, b in self._segments(layer, low, end)))

    # -- sliding-window rings ---------------------------------------------------------------

    def _segments(self, layer: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """(first position, first slot, end slot) of the slots holding positions start..end-1:
        position p is at slot p % capacity (p itself until a ring wraps)."""
        return self._segments_of(self._keys[layer].shape[1], start, end)

    @staticmethod
    def _segments_of(capacity: int, start: int, end: int) -> list[tuple[int, int, int]]:
        segments, position = [], start
        while position < end:
            slot = position % capacity
            take = min(end - position, capacity - slot)
            segments.append((position, slot, slot + take))
            position += take
        return segments

    def _ring_append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append to a sliding layer past its ring's size: the new keys overwrite the oldest."""
        n, window, ring = k.shape[0], self._windows[layer], self._rings[layer]
        assert window is not None and ring is not None
        if window - 1 + n > ring:              # a longer chunk than planned: widen the ring first
            ring = self._rings[layer] = _round_up(window - 1 + n, self.block_tokens)
        if self._keys[layer].shape[1] != ring:
            self._relayout(layer, ring)
        end = start + n
        for first, a, b in self._segments(layer, start, end):
            self._keys[layer][:, a:b] = k[first - start:first - start + b - a].transpose(0, 1)
            self._values[layer][:, a:b] = v[first - start:first - start + b - a].transpose(0, 1)
        self._lengths[layer] = end
        self._low[layer] = max(self._low[layer], end - ring)

    def _relayout(self, layer: int, ring: int) -> None:
        """Move the layer's held positions into storage of ``ring`` tokens (p at slot p % ring)."""
        end = self._lengths[layer]
        keep = max(self._low[layer], end - ring)
        keys = torch.empty((self._shape[0], ring, self._shape[2]), dtype=self._dtype, device=self._device)
        values = torch.empty_like(keys)
        old_keys, old_values = self._keys[layer], self._values[layer]
        self._keys[layer], self._values[layer] = keys, values
        for first, a, b in self._segments_of(old_keys.shape[1], keep, end):       # old slots a..b
            for position, c, d in self._segments_of(ring, first, first + b - a):    # to new slots c..d
                source = a + position - first
                keys[:, c:d] = old_keys[:, source:source + d - c]
                values[:, c:d] = old_values[:, source:source + d - c]
        self._low[layer] = keep

    def off_device(self, layer: int, first_position: int = 0) -> tuple[OffDevice, ...]:
        return ()

    def fail(self, error: BaseException) -> None:
        """This sequence's KV failed (a spill fault): the rest of the sweep skips it, and the
        sweep reports ``error`` for it alone."""
        if self.failure is None:
            self.failure = error

    def state(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """A linear-attention layer's state (None before its first token)."""
        held = self._states.get(layer)
        return None if held is None else held.at(layer, self._lengths[layer])

    def set_state(self, layer: int, state: tuple[torch.Tensor, ...], tokens: int) -> None:
        """Replace the layer's state; its ``tokens`` new tokens count as stored."""
        self._lengths[layer] += tokens
        self._states[layer] = HeldState(state, self._lengths[layer])

    def _grow(self, old: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
        new = torch.empty((old.shape[0], capacity, old.shape[2]), dtype=self._dtype, device=self._device)
        new[:, :used] = old[:, :used]
        return new

    def read(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of tokens start..end-1 of ``layer``: [2, kv_heads, end - start, head_dim]
        (ValueError for tokens before ``held_from(layer)``)."""
        if not self._low[layer] <= start <= end <= self._lengths[layer]:
            raise ValueError(f"tokens {start}..{end} of layer {layer}: only {self._low[layer]}.."
                             f"{self._lengths[layer]} are stored")
        parts = self._segments(layer, start, end) or [(start, 0, 0)]
        return torch.stack((torch.cat([self._keys[layer][:, a:b] for _, a, b in parts], dim=1),
                            torch.cat([self._values[layer][:, a:b] for _, a, b in parts], dim=1)))

    def gather(self, layer: int, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values [n, kv_heads, head_dim] at ``positions`` (increasing)."""
        first = positions[0]
        kv = self.read(layer, first, positions[-1] + 1)[:, :, [p - first for p in positions]]
        return kv[0].transpose(0, 1).clone(), kv[1].transpose(0, 1).clone()

    def held_from(self, layer: int) -> int:
        """The first position the layer still holds (0 unless its sliding-window ring has wrapped)."""
        return self._low[layer]

    def trim_rings(self, first_query: int) -> None:
        """Nothing to release: a ring overwrites its oldest keys as it appends."""

    def truncate(self, num_tokens: int) -> None:
        """Forget everything past ``num_tokens`` (rejected speculative tokens, a sweep that failed
        half-way); the storage stays allocated, and the next append overwrites it."""
        self._lengths = [min(n, num_tokens) for n in self._lengths]

    def free(self) -> None:
        self._keys = self._values = []
        self._states = {}
        self._lengths = [0] * self.num_layers
        self._low = [0] * self.num_layers


def _round_up(tokens: int, step: int) -> int:
    return -(-tokens // step) * step
