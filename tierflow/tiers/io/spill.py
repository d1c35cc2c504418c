"""KV spill files that cannot lie.

A ``SpillFile`` is one file of fixed-size slots, each holding one KV block. A block is
written with its CRC32 (kept in memory, beside the block table that knows which slot holds
what); a read checks it, so a flipped byte raises ``KVCorruptionError`` instead of feeding
attention a wrong value. ``num_slots`` may be as many as the disk's free space holds: space
is reserved (``posix_fallocate``) in extents of EXTENT_BYTES as writes reach higher slots, the
first one when the file is made, so a full disk is found then, as ``TierCapacityError``; a
disk that fills later is reported the same way by the write that finds it. A file deleted while in use is
detected (its link count drops to zero) and reported as ``TransferError`` rather than
silently read from the unlinked inode. ``close()`` removes the file. Slots are 4 KiB aligned
and move whole through an aligned buffer, with O_DIRECT where the filesystem allows it, so
spilled KV does not fill RAM through the page cache.
"""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import torch

from tierflow.errors import KVCorruptionError, TierCapacityError, TransferError
from tierflow.tiers.io.reader import aligned_empty

ALIGN = 4096
EXTENT_BYTES = 64 << 20         # space is reserved this much at a time as slots fill


class SpillFile:
    def __init__(self, path: str | os.PathLike[str], block_bytes: int, num_slots: int) -> None:
        if block_bytes < 1 or num_slots < 1:
            raise ValueError(f"a spill file needs block_bytes >= 1 and num_slots >= 1, got {block_bytes}, {num_slots}")
        self.path, self.block_bytes, self.num_slots = Path(path), block_bytes, num_slots
        self.stride = -(-block_bytes // ALIGN) * ALIGN
        self._crc: dict[int, int] = {}        # slot -> CRC32 of the complete block it holds
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.direct = False
        if hasattr(os, "O_DIRECT"):      # bypass the page cache, which would otherwise fill RAM with KV
            try:
                direct_fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
            except OSError:
                pass                     # the filesystem refuses O_DIRECT: buffered I/O
            else:
                os.close(self._fd)
                self._fd, self.direct = direct_fd, True
        self._bounce = aligned_empty(self.stride)     # whole aligned slots move through it
        self._reserved = 0               # bytes reserved so far (slots below reserved // stride)
        try:
            self._reserve(0)
        except BaseException:
            self.close()
            raise

    def _reserve(self, slot: int) -> None:
        """Reserve space through ``slot``, an extent at a time (never past the last slot)."""
        end = (slot + 1) * self.stride
        if end <= self._reserved:
            return
        extent = max(self.stride, EXTENT_BYTES // self.stride * self.stride)
        grown = min(self.num_slots * self.stride, -(-end // extent) * extent)
        try:
            try:
                os.posix_fallocate(self._fd, self._reserved, grown - self._reserved)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(self._fd, grown)    # no fallocate here: a sparse file
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierCapacityError(f"no room for {grown - self._reserved} more bytes of KV spill in "
                                        f"{self.path.parent}: the disk is full") from exc
            raise TransferError(f"cannot reserve space for {self.path}: {exc.strerror}") from exc
        self._reserved = grown

    @property
    def deleted(self) -> bool:
        """Whether the file was unlinked while open (its data is no longer reachable by name)."""
        return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0

    @property
    def size_bytes(self) -> int:
        """Bytes the file reserves on disk now."""
        return self._reserved

    def _check(self, slot: int) -> None:
        if self._fd < 0:
            raise TransferError(f"KV spill file {self.path} is closed")
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside 0..{self.num_slots - 1}")
        if os.fstat(self._fd).st_nlink == 0:
            raise TransferError(f"KV spill file {self.path} was deleted while in use; the request cannot continue")

    def write(self, slot: int, block: torch.Tensor) -> None:
        """Store ``block`` (any dtype, contiguous, at most ``block_bytes``) in ``slot``."""
        self._check(slot)
        data = block.contiguous().view(torch.uint8).reshape(-1)
        if data.numel() > self.block_bytes:
            raise ValueError(f"a block of {data.numel()} bytes does not fit slots of {self.block_bytes}")
        view = memoryview(data.numpy())
        self._crc.pop(slot, None)       # a write that fails half-way leaves no valid block
        self._reserve(slot)
        self._bounce[:len(view)].copy_(data)
        try:
            written = os.pwrite(self._fd, memoryview(self._bounce.numpy()), slot * self.stride)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierCapacityError(f"the disk holding {self.path} is full: cannot spill a KV block") from exc
            raise TransferError(f"writing a KV block to {self.path} failed: {exc.strerror}") from exc
        if written != self.stride:
            raise TransferError(f"short write of a KV block to {self.path}: {written} of {self.stride} bytes")
        self._crc[slot] = zlib.crc32(view)

    def read(self, slot: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, the size that was written) from ``slot``; checks the CRC.
        Not for concurrent use (it reads through the file's own aligned buffer): concurrent
        readers call ``read_run`` with buffers of their own."""
        data = out.view(torch.uint8).reshape(-1)
        data.copy_(self.read_run(slot, 1, self._bounce, data.numel())[0])
        return out

    def read_run(self, first: int, count: int, buffer: torch.Tensor, nbytes: int | None = None) -> list[torch.Tensor]:
        """Read the ``count`` consecutive slots from ``first`` with one request into ``buffer``
        (4 KiB aligned, at least ``count * stride`` bytes; one allocation, so the read is not
        split over scattered pages) and return each block's first ``nbytes`` (default: a whole
        block) as a uint8 view, each after checking its CRC."""
        for slot in (first, first + count - 1):
            self._check(slot)
        nbytes = self.block_bytes if nbytes is None else nbytes
        expected = [self._crc.get(slot) for slot in range(first, first + count)]
        if None in expected:
            raise KVCorruptionError(f"slot {first + expected.index(None)} of {self.path} holds no complete block")
        try:
            got = os.preadv(self._fd, [memoryview(buffer.numpy())[:count * self.stride]], first * self.stride)
        except OSError as exc:
            raise TransferError(f"reading a KV block from {self.path} failed: {exc.strerror}") from exc
        if got < (count - 1) * self.stride + nbytes:
            raise TransferError(f"short read of KV blocks from {self.path}: {got} of "
                                f"{(count - 1) * self.stride + nbytes} bytes (was the file truncated?)")
        views = []
        for i in range(count):
            data = buffer[i * self.stride:i * self.stride + nbytes]
            if zlib.crc32(memoryview(data.numpy())) != expected[i]:
                raise KVCorruptionError(f"KV block in slot {first + i} of {self.path} fails its checksum: the file "
                                        "was modified or the disk returned bad data; the block will not be used")
            views.append(data)
        return views

    def free(self, slot: int) -> None:
        self._crc.pop(slot, None)

    def close(self) -> None:
        """Close and remove the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "SpillFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
