"""KV spill files that cannot lie.

A ``SpillFile`` is one preallocated file of fixed-size slots, each holding one KV block. A
block is written with its CRC32 (kept in memory, beside the block table that knows which
slot holds what); a read checks it, so a flipped byte raises ``KVCorruptionError`` instead of
feeding attention a wrong value. Space is reserved up front (``posix_fallocate``), so a full
disk is found when the file is made, as ``TierCapacityError``, not half-way through a
request; an ENOSPC from a write is reported the same way. A file deleted while in use is
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


class SpillFile:
    def __init__(self, path: str | os.PathLike[str], block_bytes: int, num_slots: int) -> None:
        if block_bytes < 1 or num_slots < 1:
            raise ValueError(f"a spill file needs block_bytes >= 1 and num_slots >= 1, got {block_bytes}, {num_slots}")
        self.path, self.block_bytes, self.num_slots = Path(path), block_bytes, num_slots
        self.stride = -(-block_bytes // ALIGN) * ALIGN
        self._crc: list[int | None] = [None] * num_slots
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
        try:
            try:
                os.posix_fallocate(self._fd, 0, self.stride * num_slots)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(self._fd, self.stride * num_slots)    # no fallocate here: a sparse file
        except OSError as exc:
            self.close()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierCapacityError(f"no room for {self.stride * num_slots} bytes of KV spill in "
                                        f"{self.path.parent}: the disk is full") from exc
            raise TransferError(f"cannot reserve space for {self.path}: {exc.strerror}") from exc

    @property
    def deleted(self) -> bool:
        """Whether the file was unlinked while open (its data is no longer reachable by name)."""
        return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0

    @property
    def size_bytes(self) -> int:
        return self.stride * self.num_slots

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
        self._crc[slot] = None          # a write that fails half-way leaves no valid block
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
        expected = self._crc[first:first + count]
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
        self._crc[slot] = None

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
