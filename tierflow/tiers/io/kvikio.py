"""The kvikio reader: a unit's aligned byte ranges → one buffer in GPU memory, through kvikio.

With GPUDirect Storage (GDS) the NVMe drive DMAs straight into GPU memory: no pinned host
staging buffer, no host → device copy, no CPU time per byte. Where GDS is not set up, kvikio
runs in its compatibility mode (POSIX reads into its own bounce buffers, then copies); that
still needs no pinned budget of ours. ``statistics().mode`` says which of the two ran.

Each file is opened once as a ``kvikio.CuFile``; a read issues one ``pread`` per range, which
kvikio splits into ``task_bytes`` tasks for its thread pool (process-wide, sized here to
``threads``: that pool is the queue depth the disk sees). Issuing and waiting both happen on a
small thread pool of our own, never on the event loop: ``IOFuture.get`` blocks, and kvikio
serves reads under its GDS threshold synchronously inside ``pread`` itself.

The contract is ``DiskReader``'s: ``read`` returns the bytes delivered, a range that delivers
fewer than its ``needed`` bytes is a ``TransferError`` naming the file, and a cancelled or
failed read returns only after every read it issued has completed, so the caller's buffer is
never written after ``read`` returns. Ranges are clipped at the end of each file (kvikio treats
end of file as an error, where the last unit's aligned range may run past it by its padding).

``choose_reader`` turns the profile's ``reader`` override into "kvikio" or "direct".
"""

from __future__ import annotations

import asyncio
import importlib
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
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, ByteRange, UnitLayout
from tierflow.tiers.plan.hardware import READERS

log = logging.getLogger(__name__)


def _import_kvikio() -> tuple[ModuleType | None, str]:
    """The kvikio module, or None and why it cannot be imported."""
    try:
        return importlib.import_module("kvikio"), ""
    except ImportError as exc:
        return None, str(exc)
    except Exception as exc:  # a broken install fails while loading native code (OSError, RuntimeError, ...)
        return None, f"{type(exc).__name__}: {exc}"


def kvikio_available() -> bool:
    """Whether ``import kvikio`` succeeds. Never raises."""
    return _import_kvikio()[0] is not None


def _install_hint() -> str:
    cuda = torch.version.cuda
    if cuda is None:
        return ('this torch is a CPU build; install a CUDA build of torch, then pip install "tierflow[cuda12]" '
                'or "tierflow[cuda13]" to match its CUDA version')
    extra = f"cuda{cuda.split('.')[0]}"
    return f'install it with pip install "tierflow[{extra}]" (torch is built for CUDA {cuda})'


def require_kvikio() -> ModuleType:
    """The kvikio module, or a ``ConfigError`` saying how to install it."""
    kvikio, reason = _import_kvikio()
    if kvikio is None:
        raise ConfigError(f"reader='kvikio' needs the kvikio package, which cannot be imported ({reason}); "
                          f"{_install_hint()}, or set the reader to 'direct'")
    return kvikio


def choose_reader(requested: str | None, device_type: str) -> str:
    """The reader to build: "kvikio" (disk → GPU memory) or "direct" (O_DIRECT → pinned host → device).
    ``requested`` is the profile's ``reader`` override (None means "auto")."""
    requested = requested or "auto"
    if requested not in READERS:
        raise ConfigError(f"reader must be one of {READERS}, got {requested!r}")
    if requested == "direct":
        return "direct"
    if requested == "auto":
        return "kvikio" if device_type == "cuda" and kvikio_available() else "direct"
    if device_type != "cuda":
        raise ConfigError(f"reader='kvikio' reads into GPU memory, but the device is {device_type!r}; "
                          "set the reader to 'direct' or 'auto'")
    require_kvikio()
    return "kvikio"


def _submodule(kvikio: ModuleType, name: str) -> Any:
    """``kvikio.<name>``, imported if ``import kvikio`` did not; None where it does not exist."""
    found = getattr(kvikio, name, None)
    if found is None:
        try:
            found = importlib.import_module(f"{kvikio.__name__}.{name}")
        except ImportError:
            return None
    return found


def transfer_mode(kvikio: ModuleType) -> str:
    """"gds" where kvikio reads through GPUDirect Storage, else "compat" (POSIX reads and copies)."""
    defaults = _submodule(kvikio, "defaults")
    try:
        if hasattr(defaults, "is_compat_mode_preferred"):        # kvikio 25.04 and later
            return "compat" if defaults.is_compat_mode_preferred() else "gds"
        mode = defaults.compat_mode()                              # a CompatMode; a bool before 24.02
        mode = getattr(mode, "name", mode)
        if mode == "AUTO":                                         # GDS if the driver offers it
            driver = _submodule(kvikio, "cufile_driver")
            return "gds" if driver.DriverProperties().is_gds_available else "compat"
        return "gds" if mode in ("OFF", False) else "compat"
    except (AttributeError, RuntimeError, TypeError) as exc:     # only a statistic: report the slower mode
        log.debug("cannot tell whether kvikio uses GDS (%s)", exc)
        return "compat"


def _set_pool_threads(kvikio: ModuleType, threads: int) -> None:
    defaults = _submodule(kvikio, "defaults")
    if hasattr(defaults, "set"):                                   # kvikio 25.04 and later
        defaults.set("num_threads", threads)
    else:
        defaults.num_threads_reset(threads)


@dataclass(frozen=True, slots=True)
class KvikioStats:
    bytes_read: int      # bytes kvikio delivered (aligned ranges clipped at the end of each file)
    requests: int        # pread calls, one per range
    busy_s: float        # summed time from a unit's first pread to its last completion
    threads: int         # kvikio's thread pool, as this reader sized it
    task_bytes: int
    mode: str            # "gds" | "compat"


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
    """Reads unit layouts into device buffers through kvikio."""

    def __init__(self, files: tuple[str, ...] | list[str], *, threads: int = 4,
                 task_bytes: int = 8 * 2**20) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        if task_bytes <= 0 or task_bytes % ALIGN_BYTES:
            raise ConfigError(f"task_bytes must be a positive multiple of {ALIGN_BYTES}, got {task_bytes}")
        kvikio = require_kvikio()
        _set_pool_threads(kvikio, threads)
        self._threads, self._task_bytes, self._mode = threads, task_bytes, transfer_mode(kvikio)
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
        stop = threading.Event()
        job = asyncio.wrap_future(self._pool.submit(self._read_ranges, layout, buffer, stop))
        try:
            sizes = await asyncio.shield(job)
        except BaseException:
            # kvikio writes into the caller's buffer until its futures complete: wait for them.
            stop.set()                      # ranges not issued yet never will be
            await _settle(job)
            raise
        for r, size in zip(layout.ranges, sizes):   # a range may run past the end of the file only by its padding
            if size < r.needed:
                raise TransferError(f"{r.path}: read {size} bytes at offset {r.file_offset} where unit "
                                    f"{layout.name} needs {r.needed}; was the file truncated?")
        return sum(sizes)

    def _read_ranges(self, layout: UnitLayout, buffer: torch.Tensor, stop: threading.Event) -> list[int]:
        """Issue a pread per range, then wait for every one issued, even after a failure."""
        started = time.perf_counter()
        issued: list[tuple[ByteRange, int, Any]] = []
        failure: tuple[ByteRange, int, Exception] | None = None
        for r in layout.ranges:
            if stop.is_set():
                break
            nbytes = max(0, min(r.nbytes, self._files[r.path].size_bytes - r.file_offset))
            try:
                issued.append((r, nbytes, self._pread(r, nbytes, buffer)))
            except Exception as exc:    # raised below, once what was issued has completed
                failure = (r, nbytes, exc)
                break
        sizes: list[int] = []
        for r, nbytes, future in issued:
            try:
                sizes.append(future.get() if future is not None else 0)
            except Exception as exc:    # likewise
                failure = failure or (r, nbytes, exc)
                sizes.append(0)
        with self._lock:
            self._bytes += sum(sizes)
            self._requests += sum(future is not None for _, _, future in issued)
            self._busy_s += time.perf_counter() - started
        if failure is not None:
            r, nbytes, exc = failure
            if isinstance(exc, (OSError, RuntimeError)):    # kvikio reports I/O errors as RuntimeError
                raise TransferError(f"{r.path}: kvikio read of {nbytes} bytes at offset {r.file_offset} failed "
                                    f"({exc})") from exc
            raise exc
        return sizes

    def _pread(self, r: ByteRange, nbytes: int, buffer: torch.Tensor) -> Any:
        if nbytes == 0:
            return None
        view = buffer[r.buffer_offset:r.buffer_offset + nbytes]
        # kvikio's pread has no destination offset: the view carries it.
        return self._files[r.path].handle.pread(view, size=nbytes, file_offset=r.file_offset,
                                                task_size=self._task_bytes)

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
