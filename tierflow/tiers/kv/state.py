"""A linear-attention layer's state as pool blocks.

Qwen3-Next's Gated DeltaNet layers keep, per sequence, a fixed-size state (the convolution's
last inputs and a float32 matrix per value head) instead of keys and values. The paged store
keeps it in ``KVLayout.state_blocks`` ordinary pool blocks of the layer, so it lives where the
plan puts KV — device, host or disk — and moves exactly like a KV block: committed to the
fastest tier with room, written to host or disk by the kv_spill stage after the layer's compute
(a disk block with its checksum), read ahead by the kv_load stage (``off_device`` lists the
state's blocks), freed with the sequence, preempted with its request, counted by the batcher and
the planner as blocks. A sweep reads the layer's state blocks, computes, and commits the new
state to new blocks (the old ones go back to their pools): the state is rewritten whole, never
appended to.

``pack_state`` lays the state's tensors' bytes end to end in ``state_blocks`` blocks of the
store's shape and dtype (the rest zero); ``unpack_state`` cuts copies of them out again, by the
shapes and dtypes of ``meta`` (tensors on the meta device: no memory, only what the state looks
like).
"""

from __future__ import annotations

from typing import Sequence

import torch


def state_meta(state: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What ``state`` looks like (shapes and dtypes), on the meta device."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in state)


def pack_state(state: Sequence[torch.Tensor], block_shape: Sequence[int], dtype: torch.dtype,
               num_blocks: int) -> list[torch.Tensor]:
    """``state``'s bytes in ``num_blocks`` blocks of ``block_shape`` and ``dtype`` (views of one
    buffer on the state's device)."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in state]
    nbytes = sum(p.numel() for p in parts)
    per_block = torch.Size(block_shape).numel() * dtype.itemsize
    if nbytes > num_blocks * per_block:
        raise ValueError(f"a linear-attention state of {nbytes} bytes does not fit its {num_blocks} blocks of "
                         f"{per_block} bytes")
    buffer = torch.zeros(num_blocks * per_block, dtype=torch.uint8, device=parts[0].device)
    offset = 0
    for part in parts:
        buffer[offset:offset + part.numel()] = part
        offset += part.numel()
    return [buffer[i * per_block:(i + 1) * per_block].view(dtype).view(*block_shape) for i in range(num_blocks)]


def unpack_state(blocks: torch.Tensor, meta: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Copies of the tensors ``pack_state`` laid into ``blocks`` ([num_blocks, *block shape], a
    copy the caller made as it loaded them), shaped and typed as ``meta``."""
    raw = blocks.reshape(-1).view(torch.uint8)
    out, offset = [], 0
    for m in meta:
        nbytes = m.numel() * m.dtype.itemsize
        out.append(raw[offset:offset + nbytes].clone().view(m.dtype).view(m.shape))
        offset += nbytes
    return tuple(out)
