"""KV spill files that cannot lie.

A ``SpillFile`` is one file of fixed-size slots, each holding one KV block. A block is
written with its checksum (kept in memory, beside the block table that knows which slot holds
what); a read checks it, so a flipped byte raises ``KVCorruptionError`` instead of feeding
attention a wrong value.

The checksum (``checksum.py``) is CRC-32C of the whole slot, the block and its zeroed padding,
checked a run of slots at a time.

``num_slots`` may be as many as the disk's free space holds: space is reserved
(``posix_fallocate``) in extents of EXTENT_BYTES as writes reach higher slots, the
first one when the file is made, so a full disk is found then, as ``TierCapacityError``; a
disk that fills later (growing the file, or writing to a sparse one) is reported the same way
by the write that finds it, which fails that block's request only. The error names the setting
that caps the file (``kv_disk_bytes``) and the one that moves it (``kv_cache_dir``). A file
deleted while in use is detected (its link count drops to zero) and reported as
``TransferError`` rather than silently read from the unlinked inode. Slots are 4 KiB aligned and
move whole through an aligned buffer, with O_DIRECT where the filesystem allows it, so spilled KV
does not fill RAM through the page cache.

Nothing is left behind. ``close()`` removes the file; so does a spill file's finaliser when it is
dropped unclosed or the interpreter exits. A process killed outright (SIGKILL, the OOM killer, a
SIGTERM nobody handles) cannot, so the file is made recognisable as an orphan instead: it holds an
advisory lock (``flock`` LOCK_EX, ``cachedir.claim``) for as long as it is open, which the kernel
drops when its process dies, and ``remove_orphaned_spills`` — run by every KV store that opens in
the directory, and before an engine sizes its KV by the disk's free space — removes each
``tierflow-kv-*.spill`` whose lock it can take. A lock, not the owner's PID in the name, because PIDs are reused (and
differ between PID namespaces sharing a directory). ``SpillFile.create`` names files
``tierflow-kv-<pid>-<n>.spill``, the PID only to keep live processes' names apart.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import threading
import weakref
from typing import Sequence
from pathlib import Path

import torch

from tierflow.errors import KVCorruptionError, TierCapacityError, TransferError
from tierflow.tiers.io.cachedir import claim, remove_orphans
from tierflow.tiers.io.checksum import checksum, run_checksum
from tierflow.tiers.io.reader import aligned_empty

log = logging.getLogger(__name__)

ALIGN = 4096
EXTENT_BYTES = 64 << 20         # space is reserved this much at a time as slots fill
PATTERN = "tierflow-kv-*.spill"
_ids = itertools.count()        # keeps the names of one process's spill files apart


def remove_orphaned_spills(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the spill files in ``directory`` whose process is gone (their lock is free);
    returns them. A directory that does not exist holds none."""
    removed = remove_orphans(Path(directory), PATTERN)
    if removed:
        log.info("removed %d KV spill file(s) left in %s by processes that ended without closing their engine: %s",
                 len(removed), directory, ", ".join(path.name for path in removed))
    return removed


class SpillFile:
    def __init__(self, path: str | os.PathLike[str], block_bytes: int, num_slots: int, *,
                 reads_in_flight: int | None = None) -> None:
        """``reads_in_flight``: at most this many ``read_run`` requests reach the disk at once
        (None: no limit), so that more reader threads than that can check one run's checksum
        while the disk reads the next ones."""
        if block_bytes < 1 or num_slots < 1:
            raise ValueError(f"a spill file needs block_bytes >= 1 and num_slots >= 1, got {block_bytes}, {num_slots}")
        self.path, self.block_bytes, self.num_slots = Path(path), block_bytes, num_slots
        self.stride = -(-block_bytes // ALIGN) * ALIGN
        self._sums: dict[int, int] = {}       # slot -> checksum of the slot (its block, zero padded)
        self._requests: contextlib.AbstractContextManager[object] = (
            threading.BoundedSemaphore(reads_in_flight) if reads_in_flight else contextlib.nullcontext())
        self._fd, self.direct = self._open(self.path)
        self._finalizer = weakref.finalize(self, _release, self._fd, self.path)
        self._bounce = aligned_empty(self.stride)     # whole aligned slots move through it
        self._reserved = 0               # bytes reserved so far (slots below reserved // stride)
        try:
            self._reserve(0)
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, directory: str | os.PathLike[str], block_bytes: int, num_slots: int, *,
               reads_in_flight: int | None = None) -> "SpillFile":
        """A new spill file in ``directory`` under a name no other file there has."""
        for _ in range(1000):
            path = Path(directory) / f"tierflow-kv-{os.getpid()}-{next(_ids)}.spill"
            try:
                return cls(path, block_bytes, num_slots, reads_in_flight=reads_in_flight)
            except FileExistsError:
                continue                # a name left by a process with our PID, still in use
            except OSError as exc:      # the directory is gone, or takes no files now
                error = TierCapacityError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else TransferError
                raise error(f"cannot create a KV spill file in {directory}: {exc.strerror}; EngineConfig.kv_cache_dir "
                            "must be (and stay, while the engine runs) a directory this process can create files "
                            "in", settings=("kv_cache_dir",)) from exc
        raise TransferError(f"cannot create a KV spill file in {directory}: every name tried exists")

    @staticmethod
    def _open(path: Path) -> tuple[int, bool]:
        """Create ``path`` and hold its lock; the descriptor and whether it is O_DIRECT."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        direct = False
        if hasattr(os, "O_DIRECT"):      # bypass the page cache, which would otherwise fill RAM with KV
            try:
                direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError:
                pass                     # the filesystem refuses O_DIRECT: buffered I/O
            else:
                os.close(fd)
                fd, direct = direct_fd, True
        try:
            claimed = claim(fd, path)    # on the descriptor kept: closing another would drop the lock
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise TransferError(f"cannot lock the KV spill file {path}: {exc.strerror}") from exc
        if not claimed:
            os.close(fd)
            raise FileExistsError(errno.EEXIST, "taken for an orphan while it was made", str(path))
        return fd, direct

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
                raise self._disk_full(f"growing the file by {grown - self._reserved} bytes", exc) from exc
            raise TransferError(f"cannot reserve space for {self.path}: {exc.strerror}") from exc
        self._reserved = grown

    def _disk_full(self, what: str, exc: OSError) -> TierCapacityError:
        quota = " (the quota is used up)" if exc.errno == errno.EDQUOT else ""
        return TierCapacityError(
            f"no room for the KV spill file {self.path}: the disk is full{quota} ({what}); free space on it, cap the "
            "spill file below what that disk can hold with EngineConfig.kv_disk_bytes (unset, it may take the "
            "disk's free space when the engine opened, less a margin, which other writers can take since), or "
            "point EngineConfig.kv_cache_dir at a disk with more room", settings=("kv_disk_bytes", "kv_cache_dir"))

    @property
    def deleted(self) -> bool:
        """Whether the file was unlinked while open (its data is no longer reachable by name)."""
        return self._fd >= 0 and os.fstat(self._fd).st_nlink == 0

    @property
    def size_bytes(self) -> int:
        """Bytes the file reserves on disk now."""
        return self._reserved

    def _check(self, slot: int, count: int = 1) -> None:
        """Slots ``slot`` .. ``slot + count - 1`` exist and the file is still open and linked."""
        if self._fd < 0:
            raise TransferError(f"KV spill file {self.path} is closed")
        for end in (slot, slot + count - 1):
            if not 0 <= end < self.num_slots:
                raise IndexError(f"slot {end} is outside 0..{self.num_slots - 1}")
        if os.fstat(self._fd).st_nlink == 0:
            raise TransferError(f"KV spill file {self.path} was deleted while in use; the request cannot continue")

    def write(self, slot: int, block: torch.Tensor) -> None:
        """Store ``block`` (any dtype, contiguous, at most ``block_bytes``) in ``slot``."""
        self._check(slot)
        data = block.contiguous().view(torch.uint8).reshape(-1)
        if data.numel() > self.block_bytes:
            raise ValueError(f"a block of {data.numel()} bytes does not fit slots of {self.block_bytes}")
        view = memoryview(data.numpy())
        self._sums.pop(slot, None)      # a write that fails half-way leaves no valid block
        self._reserve(slot)
        self._bounce[:len(view)].copy_(data)
        self._bounce[len(view):].zero_()      # the padding is in the slot's checksum
        try:
            written = os.pwrite(self._fd, memoryview(self._bounce.numpy()), slot * self.stride)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full("writing a KV block", exc) from exc
            raise TransferError(f"writing a KV block to {self.path} failed: {exc.strerror}") from exc
        if written != self.stride:
            raise TransferError(f"short write of a KV block to {self.path}: {written} of {self.stride} bytes")
        self._sums[slot] = checksum(memoryview(self._bounce.numpy()))

    def read(self, slot: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (contiguous, the size that was written) from ``slot``; checks its checksum.
        Not for concurrent use (it reads through the file's own aligned buffer): concurrent
        readers call ``read_run`` with buffers of their own."""
        data = out.view(torch.uint8).reshape(-1)
        self.read_run(slot, 1, memoryview(self._bounce.numpy()), data.numel())
        data.copy_(self._bounce[:data.numel()])
        return out

    def read_run(self, first: int, count: int, memory: memoryview, nbytes: int | None = None,
                 expected: Sequence[int | None] | None = None) -> None:
        """Read the ``count`` consecutive slots from ``first`` with one request into ``memory`` (4
        KiB aligned, at least ``count * stride`` bytes; one allocation, so the read is not split
        over scattered pages) and check them against ``expected`` (default: the checksums the file
        holds now), the whole run with one CRC (see the module). ``nbytes``: the bytes of the last
        block that must be there (default: a whole block); a file cut short after them reads as
        its zero padding. Nothing but bytes is made here: the caller has its views of ``memory``."""
        self._check(first, count)
        nbytes = self.block_bytes if nbytes is None else nbytes
        expected = list(self.sums(first, count) if expected is None else expected)
        if None in expected:
            raise KVCorruptionError(f"slot {first + expected.index(None)} of {self.path} holds no complete block")
        span = count * self.stride
        try:
            with self._requests:
                got = os.preadv(self._fd, [memory[:span]], first * self.stride)
        except OSError as exc:
            raise TransferError(f"reading a KV block from {self.path} failed: {exc.strerror}") from exc
        if got < (count - 1) * self.stride + nbytes:
            raise TransferError(f"short read of KV blocks from {self.path}: {got} of "
                                f"{(count - 1) * self.stride + nbytes} bytes (was the file truncated?)")
        if got < span:
            memory[got:span] = bytes(span - got)
        if checksum(memory[:span]) == run_checksum(expected, self.stride):
            return
        bad = next((i for i in range(count) if checksum(memory[i * self.stride:(i + 1) * self.stride]) != expected[i]),
                   0)
        raise KVCorruptionError(f"KV block in slot {first + bad} of {self.path} fails its checksum: the file "
                                "was modified or the disk returned bad data; the block will not be used")

    def sums(self, first: int, count: int) -> tuple[int | None, ...]:
        """The checksums of ``count`` slots from ``first`` (None: no complete block; a write pops
        its slot's checksum before it starts and sets the new one once it has landed)."""
        return tuple(self._sums.get(slot) for slot in range(first, first + count))

    def free(self, slot: int) -> None:
        self._sums.pop(slot, None)

    def close(self) -> None:
        """Close and remove the file (idempotent)."""
        self._fd = -1
        self._finalizer()

    def __enter__(self) -> "SpillFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(fd: int, path: Path) -> None:
    """Remove the spill file, then close it (dropping its lock): on close, when a spill file is
    dropped unclosed, or at interpreter exit."""
    try:
        if os.path.samestat(os.stat(path), os.fstat(fd)):   # not a later file of the same name
            path.unlink()
    except FileNotFoundError:
        pass                            # deleted under the engine: nothing to remove
    except OSError as exc:
        log.warning("could not remove the KV spill file %s: %s (a later engine in its directory removes it)",
                    path, exc.strerror)
    finally:
        os.close(fd)
