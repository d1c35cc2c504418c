"""Checksums of spilled KV blocks, one call per run of slots.

The checksum is CRC-32C (the ``crc32c`` package: the CPU's CRC instruction, with the GIL
released) of the whole slot, the block and its zeroed padding. Decode at long context reads every
block back each token, in runs of consecutive slots, on reader threads that share the CPU with the
compute. One checksum call per block gave the GIL up and took it back once per block, and on two
cores that traffic cost the compute more than the hashing did: an attention loop beside a thread
hashing 256 KiB blocks ran 32.7-37.8 ms a step, beside one hashing the same bytes 4 MiB at a time
19.2-22.3 (12.1-18.3 alone; a shared machine); in the engine, 16k-token decode from disk
alternating every 8 tokens in one process took 31.2 ms a token checking each block and 29.1
checking each run (bench/long_context.py's model).

A CRC can be checked a run at a time because it is linear: the CRC of two slots back to back is
``shift(crc(first)) ^ crc(second)``, where ``shift`` carries a CRC over one slot's length of zero
bytes, a fixed linear map of 32 bits (four byte tables per slot size, ``_shift_tables``). So a
run's read computes one CRC over all its bytes, in one call, and compares it with the stored
checksums of its slots folded together; only a run that fails is checked slot by slot, to name
the bad block. Without the package it falls back to zlib's CRC-32 (the same algebra, several
times slower). The checksums live only as long as the file, so the two never meet.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Sequence


def _crc_function() -> Callable[[memoryview | bytes, int], int]:
    try:
        import crc32c
    except ImportError:
        return zlib.crc32
    return crc32c.crc32c


_crc = _crc_function()


def checksum(data: memoryview | bytes, value: int = 0) -> int:
    """The CRC of ``data``, continuing from the CRC ``value`` of what came before it."""
    return _crc(data, value)


@functools.lru_cache(maxsize=16)
def _shift_tables(nbytes: int) -> tuple[tuple[int, ...], ...]:
    """Four tables of 256 that carry a CRC over ``nbytes`` zero bytes: ``shift(v)`` is
    ``t0[v & 255] ^ t1[v >> 8 & 255] ^ t2[v >> 16 & 255] ^ t3[v >> 24]``, and the CRC of A then
    B is ``shift(crc(A)) ^ crc(B)`` for any B of ``nbytes``. The map is linear in v, so it is
    made from its values on the 32 single bits (a CRC continued over zeros, less the zeros' own)."""
    zeros = bytes(nbytes)
    alone = _crc(zeros, 0)
    bits = [_crc(zeros, 1 << bit) ^ alone for bit in range(32)]
    tables = []
    for byte in range(4):
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value            # the lowest bit set: table[value] = table[value without it] ^ its image
            table[value] = table[value ^ low] ^ bits[8 * byte + low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def run_checksum(sums: Sequence[int], slot_bytes: int) -> int:
    """The CRC of consecutive slots of ``slot_bytes`` each, from their checksums ``sums``."""
    t0, t1, t2, t3 = _shift_tables(slot_bytes)
    run = 0
    for value in sums:
        run = t0[run & 255] ^ t1[run >> 8 & 255] ^ t2[run >> 16 & 255] ^ t3[run >> 24] ^ value
    return run
