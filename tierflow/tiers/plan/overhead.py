"""Device memory beside the plan's own buffers, which every device budget keeps room for.

A device budget, whether the probe's free memory less its margin or a user's
``device_memory_bytes``, is a cap on what the engine takes from the device: the peak of
``torch.cuda.max_memory_reserved()`` plus what the runtime allocates outside PyTorch's caching
allocator. The plan's weights, staging, KV and activations are what the engine asks for; the
device gives more, in three parts (``DeviceOverhead``), which ``TierMemory.overhead`` counts:

- runtime: ``HardwareProfile.runtime_overhead_bytes``. PyTorch keeps a cuBLAS workspace for
  each (cuBLAS handle, stream) pair that ran a matmul, allocated from the caching allocator and
  held until the process exits; under GPUDirect Storage cuFile keeps GPU bounce buffers of its
  own (``max_device_cache_size``). The probe measures it (see ``tiers.probe.measure``).
- rounding: the caching allocator (default settings, not ``expandable_segments``) rounds each
  allocation up to a multiple of 512 bytes; one of at most 1 MiB is carved from 2 MiB segments,
  one under 10 MiB from 20 MiB segments (split while more than 1 MiB remains), a larger one gets
  a segment of its own rounded up to 2 MiB. A freed block is cached for the stream it was
  allocated on, so each allocating stream keeps a partly used segment of each kind
  (``POOL_SLACK_BYTES``). The allocations held for the engine's life are counted one by one
  (``reserved_bytes``: resident weights tensor by tensor, staging slots, the KV pool or the
  contiguous KV's tensors); activations, which come and go on the compute stream, get
  ``ACTIVATION_ROUNDING_BYTES``.
- KV growth: the contiguous store (the engine's KV when it may not leave the device) grows a
  layer's keys, then its values, by allocating the larger tensor and copying while the old one
  is still alive (``tiers/kv/contiguous.py:SequenceKV._grow``): one layer's keys at the full
  context bound that old tensor. Appends run one at a time, so one such tensor is live at once.

On a CPU device (RAM) there is no caching allocator to round for: only the growth transient
(and a profile's own ``device_overhead_bytes``, if it gives one). Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

MIN_BLOCK_BYTES = 512                 # every allocation is rounded up to a multiple of this
SMALL_ALLOC_BYTES = 2**20             # at most this: carved from SMALL_SEGMENT_BYTES segments
SMALL_SEGMENT_BYTES = 2 * 2**20
MID_ALLOC_BYTES = 10 * 2**20          # under this: carved from MID_SEGMENT_BYTES segments
MID_SEGMENT_BYTES = 20 * 2**20
LARGE_ROUND_BYTES = 2 * 2**20         # a larger allocation's own segment is a multiple of this
ALLOCATING_STREAMS = 2                # the default stream (weights, slots, KV pool) and the compute stream
POOL_SLACK_BYTES = ALLOCATING_STREAMS * (SMALL_SEGMENT_BYTES + MID_SEGMENT_BYTES)
ACTIVATION_ROUNDING_BYTES = 8 * LARGE_ROUND_BYTES    # a layer's live activations, each rounded up by < 2 MiB


@dataclass(frozen=True, slots=True)
class DeviceOverhead:
    """Device memory a plan keeps free beside its weights, staging, KV and activations."""

    runtime_bytes: int = 0       # cuBLAS workspaces and cuFile's bounce buffers (HardwareProfile)
    rounding_bytes: int = 0      # the caching allocator's rounding and its partly used segments
    kv_growth_bytes: int = 0     # the old tensor the contiguous KV copies from while it grows
    runtime_assumed: bool = False   # the profile had no device_overhead_bytes: the default was assumed

    @property
    def total_bytes(self) -> int:
        return self.runtime_bytes + self.rounding_bytes + self.kv_growth_bytes


def reserved_bytes(nbytes: int) -> int:
    """What the caching allocator reserves for one allocation of ``nbytes`` that stays alive:
    its block, and where its segment is shared, its share of the segment's unused tail
    (allocations of one size repeat, layer after layer, and share segments evenly)."""
    if nbytes <= 0:
        return 0
    block = -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES
    if block <= SMALL_ALLOC_BYTES:
        return block
    if block < MID_ALLOC_BYTES:
        return MID_SEGMENT_BYTES // (MID_SEGMENT_BYTES // block)
    return -(-block // LARGE_ROUND_BYTES) * LARGE_ROUND_BYTES


def rounding_bytes(sizes: Iterable[int]) -> int:
    """What the allocator reserves beyond ``sizes``, one allocation each."""
    return sum(reserved_bytes(n) - n for n in sizes)
