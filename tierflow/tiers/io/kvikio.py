"""The kvikio reader: a unit's aligned byte ranges → one buffer in GPU memory, through kvikio.

With GPUDirect Storage (GDS) the NVMe drive DMAs straight into GPU memory: no pinned host
staging buffer, no host → device copy, no CPU time per byte. Where GDS is not set up, kvikio
runs in its compatibility mode (buffered POSIX reads into its own pinned bounce buffers, then
copies): the reads fill the page cache and miss the O_DIRECT bandwidth the plan assumed, so
``choose_reader("auto")`` builds this reader only where GDS is verified, and a reader asked
for explicitly warns when it runs in compatibility mode. ``statistics().mode`` says which of
the two runs ("gds" only when verified, see ``kvikio_setup.gds_status``).

Settings are per reader, because kvikio's are per process: one thread pool (``num_threads``)
and one default task size for the whole process, and resetting the pool waits for every task
in it. A reader that sized the pool to its own ``threads`` (as this one once did) re-sized the
reads of every other engine in the process, and stalled them doing so; so a reader sets
neither. A read cuts the unit's ranges into tasks of at most ``task_bytes`` and runs them on
the reader's own pool of ``threads`` threads, each task one ``pread`` of the file's
``kvikio.CuFile`` with ``task_size=task_bytes`` (so kvikio keeps it one task), waited for on
that thread: the reader's queue depth is its own ``threads``, its task size goes with each call.

kvikio's pool still runs those preads (the ones under its GDS threshold it serves inside
``pread``, on our thread), so it needs room for every reader's tasks in flight. It is sized once
per process, when the first reader is made, to ``PROCESS_POOL_THREADS`` (an idle pool thread
only sleeps), unless ``KVIKIO_NTHREADS`` is set or the pool is that large already, and never
again; a reader whose ``threads`` exceed the pool logs a warning.

The contract is ``DiskReader``'s: ``read`` returns the bytes delivered, a range that delivers
fewer than its ``needed`` bytes is a ``TransferError`` naming the file, and a cancelled or
failed read (either stops the tasks not started yet) returns only after every pread it issued
has completed, so the caller's buffer is never written after ``read`` returns. Ranges are
clipped at the end of each file (kvikio treats end of file as an error, where the last unit's
aligned range may run past it by its padding). Nothing blocks the event loop: ``IOFuture.get``
blocks, and so does a ``pread`` under the GDS threshold, both on the reader's threads.

``choose_reader`` (from ``kvikio_setup``, with the rest of what is process-wide about kvikio)
turns the profile's ``reader`` override into "kvikio" or "direct".
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from tierflow.errors import ConfigError, TransferError
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, UnitLayout
from tierflow.tiers.io.kvikio_setup import choose_reader, gds_status, require_kvikio, size_process_pool

log = logging.getLogger(__name__)

__all__ = ["KvikioReader", "KvikioStats", "choose_reader"]     # choose_reader: the engine imports it from here


@dataclass(frozen=True, slots=True)
class KvikioStats:
    bytes_read: int      # bytes kvikio delivered (aligned ranges clipped at the end of each file)
    requests: int        # pread calls, one per task (a range cut into pieces of at most task_bytes)
    busy_s: float        # summed time from the start of a unit's read to the completion of its last pread
    threads: int         # this reader's own pool: the most of its tasks in flight at once
    task_bytes: int      # the most one task asks for, passed to kvikio with each pread
    mode: str            # "gds" (GPUDirect Storage, verified) | "compat" (kvikio's POSIX reads and bounce buffers)


@dataclass(frozen=True, slots=True)
class _Task:
    """One pread of a unit's read: ``nbytes`` of range ``range_index`` of the layout."""
    range_index: int
    path: str
    file_offset: int
    buffer_offset: int
    nbytes: int


class _File:
    __slots__ = ("path", "handle", "size_bytes")

    def __init__(self, kvikio: ModuleType, path: str) -> None:
        self.path = path
        try:
            self.size_bytes = os.path.getsize(path)
            self.handle = kvikio.CuFile(path, "r")
        except (OSError, RuntimeError) as exc:
            raise TransferError(f"{path}: cannot open with kvikio ({exc})") from exc


class KvikioReader:
    """Reads unit layouts into device buffers through kvikio, ``threads`` preads of at most
    ``task_bytes`` at a time."""

    def __init__(self, files: tuple[str, ...] | list[str], *, threads: int = 4,
                 task_bytes: int = 8 * 2**20) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if task_bytes <= 0 or task_bytes % ALIGN_BYTES:
            raise ConfigError(f"task_bytes must be a positive multiple of {ALIGN_BYTES}, got {task_bytes}")
        kvikio = require_kvikio()
        pool = size_process_pool(kvikio)
        if pool is not None and pool < threads:
            log.warning("kvikio's process-wide thread pool has %d threads, fewer than this reader's %d: its larger "
                        "reads queue there; unset KVIKIO_NTHREADS, or set it to at least %d", pool, threads, threads)
        mode, why, _ = gds_status(kvikio)
        if mode != "gds":
            log.warning("kvikio runs in its compatibility mode (%s): buffered reads through the page cache and "
                        "kvikio's bounce buffers, slower than the O_DIRECT reader; set the reader to 'direct' or "
                        "'auto' unless GPUDirect Storage is meant to be set up here", why)
        self._threads, self._task_bytes, self._mode = threads, task_bytes, mode
        self._files: dict[str, _File] = {}
        self._closed = False
        try:
            for path in files:
                self._files[path] = _File(kvikio, path)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tierflow-kvikio")
        self._lock = threading.Lock()
        self._bytes = self._requests = 0
        self._busy_s = 0.0

    def statistics(self) -> KvikioStats:
        with self._lock:
            return KvikioStats(self._bytes, self._requests, self._busy_s, self._threads, self._task_bytes,
                               self._mode)

    async def read(self, layout: UnitLayout, buffer: torch.Tensor) -> int:
        """Fill ``buffer`` (uint8, device memory, at least ``layout.buffer_bytes``) with the unit's ranges."""
        if self._closed:
            raise TransferError("the kvikio reader is closed")
        if buffer.dtype != torch.uint8 or buffer.numel() < layout.buffer_bytes:
            raise TransferError(f"buffer of {buffer.numel()} {buffer.dtype} elements cannot take unit "
                                f"{layout.name} ({layout.buffer_bytes} bytes as torch.uint8)")
        tasks = self._tasks(layout)
        stop = threading.Event()            # set: tasks not started yet never will be
        started = time.perf_counter()
        every = asyncio.gather(*(asyncio.wrap_future(self._pool.submit(self._run, t, buffer, stop)) for t in tasks),
                               return_exceptions=True)
        try:
            results = await asyncio.shield(every)
        except BaseException:
            # kvikio writes into the caller's buffer until its futures complete: wait for them.
            stop.set()
            await _settle(every)
            raise
        finally:
            with self._lock:
                self._busy_s += time.perf_counter() - started
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise failure
        sizes = [0] * len(layout.ranges)
        for task, size in zip(tasks, results):
            sizes[task.range_index] += size
        for r, size in zip(layout.ranges, sizes):   # a range may run past the end of the file only by its padding
            if size < r.needed:
                raise TransferError(f"{r.path}: read {size} bytes at offset {r.file_offset} where unit "
                                    f"{layout.name} needs {r.needed}; was the file truncated?")
        return sum(sizes)

    def _tasks(self, layout: UnitLayout) -> list[_Task]:
        """The unit's ranges, clipped at the end of their files, cut into pieces of at most ``task_bytes``."""
        tasks = []
        for i, r in enumerate(layout.ranges):
            nbytes = max(0, min(r.nbytes, self._files[r.path].size_bytes - r.file_offset))
            for start in range(0, nbytes, self._task_bytes):
                tasks.append(_Task(i, r.path, r.file_offset + start, r.buffer_offset + start,
                                   min(self._task_bytes, nbytes - start)))
        return tasks

    def _run(self, task: _Task, buffer: torch.Tensor, stop: threading.Event) -> int:
        """One pread, waited for on this (pool) thread; returns only once kvikio is done with the buffer."""
        if stop.is_set():
            return 0
        # kvikio's pread has no destination offset: the view carries it.
        view = buffer[task.buffer_offset:task.buffer_offset + task.nbytes]
        try:
            future = self._files[task.path].handle.pread(view, size=task.nbytes, file_offset=task.file_offset,
                                                         task_size=self._task_bytes)
            with self._lock:
                self._requests += 1
            size = int(future.get())
        except Exception as exc:
            stop.set()                      # a failed read: do not start its other tasks
            if isinstance(exc, (OSError, RuntimeError)):    # kvikio reports I/O errors as RuntimeError
                raise TransferError(f"{task.path}: kvikio read of {task.nbytes} bytes at offset {task.file_offset} "
                                    f"failed ({exc})") from exc
            raise
        with self._lock:
            self._bytes += size
        return size

    def close(self) -> None:
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)    # in-flight reads finish before their files close
        for f in self._files.values():
            f.handle.close()
        self._files.clear()


async def _settle(job: asyncio.Future[Any]) -> None:
    """Wait until ``job`` is done, through further cancellations: the caller re-raises afterwards."""
    while not job.done():
        try:
            await asyncio.wait([job])
        except asyncio.CancelledError:
            continue
