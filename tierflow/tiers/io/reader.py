"""The disk reader: a unit's aligned byte ranges → one reusable, aligned host buffer.

Each file is opened once with O_DIRECT, so streaming a model larger than RAM does not
fill the page cache (which would evict the very memory the engine budgets for). A range
is cut into ``block_bytes`` requests that a small thread pool issues concurrently — the
pool size is the queue depth the disk sees. Threads release the GIL inside ``preadv``, so
compute keeps running. Completion is awaited as asyncio futures, never polled.

Where a filesystem refuses O_DIRECT (tmpfs, some overlay filesystems) the reader falls
back to buffered reads for that file (``direct_io="auto"``), and ``statistics()`` says which
mode each file ran in. ``direct_io="on"`` makes the refusal an error instead.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from tierflow.errors import ConfigError, TransferError
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, UnitLayout
from tierflow.tiers.io.staging import HUGE_PAGE_BYTES, staging_empty

log = logging.getLogger(__name__)


class UnitReader(Protocol):
    """What the stages need of a reader: ``DiskReader`` here, ``tiers.kvikio.KvikioReader`` on CUDA."""

    async def read(self, layout: UnitLayout, buffer: torch.Tensor) -> int: ...


def started_pool(threads: int, name: str, initializer: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, all running. A pool starts a thread for a task only while
    none is idle, so its threads would otherwise appear one by one as load grows, long after the
    engine opened; tasks that wait for each other take one thread each. A thread whose
    ``initializer`` fails breaks the pool, and that error is raised here, at open."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=initializer)
    ready = threading.Barrier(threads, timeout=60)
    try:
        for future in [pool.submit(ready.wait) for _ in range(threads)]:
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


def aligned_empty(nbytes: int, *, pin_memory: bool = False) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose first byte is 4 KiB aligned (what O_DIRECT needs).

    Buffers of 2 MiB or more are staging buffers (``tiers.io.staging.staging_empty``): their
    own mapping, 2 MiB aligned, backed by huge pages at once, when they are made — memory
    compacted then if need be — so that an O_DIRECT read reaches the device in few large
    segments however full or fragmented RAM is by the time of the read. ``pin_memory`` (and
    smaller buffers) come from torch's allocator.
    """
    if nbytes >= HUGE_PAGE_BYTES and not pin_memory:
        return staging_empty(nbytes)
    raw = torch.empty(nbytes + ALIGN_BYTES, dtype=torch.uint8, pin_memory=pin_memory)
    skip = (-raw.data_ptr()) % ALIGN_BYTES
    return raw[skip:skip + nbytes]


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``; elsewhere a no-op).
    A long prefill frees large activations sweep after sweep; glibc keeps such memory in the
    heap, so without this the process's footprint would grow with the prompt's length."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


@dataclass(frozen=True, slots=True)
class ReaderStats:
    bytes_read: int          # bytes the disk delivered (aligned ranges, gaps included)
    direct_bytes: int        # of which through O_DIRECT
    requests: int            # block reads issued (a unit's ranges cut into ``block_bytes`` pieces)
    busy_s: float            # summed time inside read calls, over all threads
    io_threads: int          # threads issuing the block reads: the queue depth the disk sees
    block_bytes: int         # the most one block read asks for
    modes: dict[str, str]    # file → "direct" | "buffered"


class _File:
    __slots__ = ("path", "fd", "direct", "size_bytes")

    def __init__(self, path: str, mode: str) -> None:
        self.path, self.size_bytes = path, os.path.getsize(path)
        self.fd, self.direct = -1, False
        if mode != "off" and hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as exc:
                if mode == "on" or exc.errno != errno.EINVAL:
                    raise TransferError(f"{path}: cannot open with O_DIRECT ({exc.strerror}); "
                                        "set EngineConfig(direct_io='auto') to fall back to buffered reads") from exc
                log.info("%s: O_DIRECT refused by the filesystem, using buffered reads", path)
        elif mode == "on":
            raise ConfigError("direct_io='on' but this platform has no O_DIRECT")
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)

    def fall_back_to_buffered(self) -> None:
        old, self.fd, self.direct = self.fd, os.open(self.path, os.O_RDONLY), False
        os.close(old)


class DiskReader:
    """Reads unit layouts into aligned host buffers with a pool of ``io_threads`` threads."""

    def __init__(self, files: tuple[str, ...] | list[str], *, io_threads: int = 4,
                 block_bytes: int = 8 * 2**20, direct_io: str = "auto") -> None:
        if block_bytes % ALIGN_BYTES:
            raise ConfigError(f"block_bytes must be a multiple of {ALIGN_BYTES}, got {block_bytes}")
        self._mode, self._block_bytes, self._io_threads = direct_io, block_bytes, io_threads
        self._files: dict[str, _File] = {}
        try:
            for path in files:
                self._files[path] = _File(path, direct_io)
        except BaseException:
            self.close()
            raise
        self._pool = started_pool(io_threads, "tierflow-io")
        self._lock = threading.Lock()
        self._bytes = self._direct_bytes = self._requests = 0
        self._busy_s = 0.0
        self._closed = False

    def statistics(self) -> ReaderStats:
        with self._lock:
            return ReaderStats(self._bytes, self._direct_bytes, self._requests, self._busy_s, self._io_threads,
                               self._block_bytes,
                               {p: "direct" if f.direct else "buffered" for p, f in self._files.items()})

    async def read(self, layout: UnitLayout, buffer: torch.Tensor) -> int:
        """Fill ``buffer`` (aligned, at least ``layout.buffer_bytes``) with the unit's ranges."""
        if self._closed:
            raise TransferError("the disk reader is closed")
        if buffer.numel() < layout.buffer_bytes or buffer.data_ptr() % ALIGN_BYTES:
            raise TransferError(f"buffer of {buffer.numel()} bytes at {buffer.data_ptr():#x} cannot take unit "
                                f"{layout.name} ({layout.buffer_bytes} bytes, 4 KiB aligned)")
        view = memoryview(buffer.numpy())
        blocks = [(r, start) for r in layout.ranges for start in range(0, r.nbytes, self._block_bytes)]
        threads = [self._pool.submit(self._read_block, self._files[r.path], view, r.buffer_offset + start,
                                     r.file_offset + start, min(self._block_bytes, r.nbytes - start))
                   for r, start in blocks]
        try:
            sizes = await asyncio.gather(*(asyncio.wrap_future(t) for t in threads))
        except BaseException:
            # The threads write into the caller's buffer: it must not be reused before they stop.
            for t in threads:
                t.cancel()                  # those not started yet never will
            running = [asyncio.wrap_future(t) for t in threads if not t.done()]
            if running:
                await asyncio.shield(asyncio.wait(running))
            raise
        got: dict[int, int] = {}
        for (r, _), size in zip(blocks, sizes):
            got[r.buffer_offset] = got.get(r.buffer_offset, 0) + size
        for r in layout.ranges:             # a range may run past the end of the file only by its padding
            if got[r.buffer_offset] < r.needed:
                raise TransferError(f"{r.path}: read {got[r.buffer_offset]} bytes at offset {r.file_offset} where "
                                    f"unit {layout.name} needs {r.needed}; was the file truncated?")
        return sum(sizes)

    def _read_block(self, f: _File, view: memoryview, buffer_offset: int, file_offset: int, nbytes: int) -> int:
        wanted = min(nbytes, f.size_bytes - file_offset)
        started, done = time.perf_counter(), 0
        while done < wanted:
            target = view[buffer_offset + done:buffer_offset + nbytes]
            try:
                got = os.preadv(f.fd, [target], file_offset + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and f.direct and self._mode == "auto":
                    log.info("%s: O_DIRECT read refused, falling back to buffered reads", f.path)
                    f.fall_back_to_buffered()
                    continue
                raise TransferError(f"{f.path}: read of {nbytes} bytes at offset {file_offset} failed "
                                    f"({exc.strerror})") from exc
            if got == 0:
                raise TransferError(f"{f.path}: file ended at byte {file_offset + done}, expected at least "
                                    f"{file_offset + wanted}; was it truncated while the engine ran?")
            done += got
        with self._lock:
            self._bytes += done
            self._direct_bytes += done if f.direct else 0
            self._requests += 1
            self._busy_s += time.perf_counter() - started
        return done

    def close(self) -> None:
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for f in self._files.values():
            os.close(f.fd)
        self._files.clear()
