"""How reads are sized: the page alignment every read and read buffer keeps, the request size
of a unit's read, and the buffers and runs of KV blocks read back from disk.

These are a handful of numbers the cost model, the planner, the probe and the KV stores all
size by; they depend on nothing else of the cost model. Pure: no torch, no I/O.
"""

from __future__ import annotations

ALIGN = 4096
KV_READ_WINDOW_BYTES = 16 * 2**20   # buffers that KV blocks read back from disk land in (read-ahead)
KV_READ_RUN = 4                     # the most consecutive KV blocks one read request moves


def kv_read_window(disk_blocks: int, block_bytes: int) -> int:
    """Buffers (4 KiB-aligned block slots) for KV blocks read back from disk: about
    KV_READ_WINDOW_BYTES, at least two runs, never more than there are blocks on disk."""
    stride = -(-block_bytes // ALIGN) * ALIGN
    return min(disk_blocks, max(2 * KV_READ_RUN, KV_READ_WINDOW_BYTES // stride))


def io_block_for(unit_bytes: int, io_threads: int) -> int:
    """Read request size for units of ``unit_bytes``: each unit split over every reader thread
    (so a small unit still keeps the disk's queue full), in whole MiB from 1 to 8 MiB."""
    mib = 2**20
    return min(8 * mib, max(mib, -(-unit_bytes // io_threads // mib) * mib))
