"""How reads are sized: the page alignment every read and read buffer keeps, the request size
of a unit's read, and the buffers and runs of KV blocks read back from disk.

These are a handful of numbers the cost model, the planner, the probe and the KV stores all
size by; they depend on nothing else of the cost model. Pure: no torch, no I/O.
"""

from __future__ import annotations

ALIGN = 4096
KV_READ_WINDOW_BYTES = 16 * 2**20   # buffers that KV blocks read back from disk land in (read-ahead)
# The most consecutive KV blocks one read request moves, and the run of spill slots the disk pool
# gives one layer of a sequence at a time (``tiers/kv/pool.py:BlockPool``), so that its blocks
# are consecutive whatever the other layers commit in between. 16 blocks of 256 KiB read at 3.1
# GB/s where runs of 4 read at 1.95 GB/s (two requests in flight, O_DIRECT, bench/long_context.py's disk).
KV_READ_RUN = 16
KV_READ_MIN_WINDOW = 8              # read buffers however large the blocks


def kv_read_window(disk_blocks: int, block_bytes: int) -> int:
    """Buffers (4 KiB-aligned block slots) for KV blocks read back from disk: about
    KV_READ_WINDOW_BYTES, at least KV_READ_MIN_WINDOW, never more than there are blocks on disk
    (a run never wraps round the window, so large blocks read in shorter runs)."""
    stride = -(-block_bytes // ALIGN) * ALIGN
    return min(disk_blocks, max(KV_READ_MIN_WINDOW, KV_READ_WINDOW_BYTES // stride))


def io_block_for(unit_bytes: int, io_threads: int) -> int:
    """Read request size for units of ``unit_bytes``: each unit split over every reader thread
    (so a small unit still keeps the disk's queue full), in whole MiB from 1 to 8 MiB."""
    mib = 2**20
    return min(8 * mib, max(mib, -(-unit_bytes // io_threads // mib) * mib))
