"""The prefix cache's block files: one file per block, in a directory per model, checked when read.

A file records the format version, the model fingerprint, its key, dtype, shape and a CRC32 of
the payload; it is written to a temporary name and renamed, so a reader sees a whole file or
none. The writer holds the temporary's lock until the rename (``cachedir.claim``), so one left
by a writer that was killed is told from one being written: a cache that opens on the
directory removes those whose lock is free (on a filesystem without locks, those older than an
hour). A file that fails any check is removed and counts as a miss — the request prefills
those tokens instead, never runs on a wrong block. A full disk or any write error only costs
the cache that block (the first one is logged as a warning, all are counted in
``write_errors``). A directory that is a file, lies under one, is missing with its parent, or
takes no files is a ``ConfigError`` when the cache opens; a missing last directory is made.

``prefix.PrefixCache`` keeps the in-memory LRU and the writer thread and calls these files
only for what memory does not hold, so the format and its checks live here on their own.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import torch

from tierflow.errors import ConfigError
from tierflow.tiers.io.cachedir import claim, directory_problem, remove_orphans

log = logging.getLogger(__name__)

MAGIC = b"TFPREFIX"
SUFFIX = ".kvblock"
STALE_UNLOCKED_S = 3600              # without locks, a temporary this old is taken for a dead writer's
FILE_COUNTS = ("disk_blocks_written", "rejected_files", "write_errors")


def model_directory(root: Path, fingerprint: str) -> Path:
    """``root``'s directory for the model ``fingerprint`` names, made if need be; ``root``
    itself may be missing only when its parent exists (it is then made: a mistyped path is an
    error, never a new tree)."""
    problem = directory_problem(root)
    if problem is None:
        try:
            (root / fingerprint[:32]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"does not take the cache's directory for this model ({exc.strerror})"
    if problem is not None:
        raise ConfigError(f"the prefix cache's directory {root} {problem}; give a directory this process can create "
                          "files in (EngineConfig.prefix_cache_dir), or none to keep the prefix cache in memory only",
                          settings=("prefix_cache_dir",))
    return root / fingerprint[:32]


class BlockFiles:
    """The block files of one model's ``directory`` (see :func:`model_directory`), each block of
    ``block_shape`` in ``dtype`` under the JSON ``header`` the cache writes; ``disk_bytes``
    (None: unbounded) bounds them, least recently used removed first. Thread-safe."""

    def __init__(self, directory: Path, header: str, block_shape: tuple[int, ...], dtype: torch.dtype,
                 block_bytes: int, disk_bytes: int | None) -> None:
        self.directory, self.block_shape, self.dtype = directory, block_shape, dtype
        self.block_bytes, self.disk_budget = block_bytes, disk_bytes
        self._header = header
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(FILE_COUNTS, 0)
        self._remove_stale_temporaries()
        self.disk_bytes = sum(p.stat().st_size for p in self.directory.glob(f"*{SUFFIX}"))

    def counts(self) -> dict[str, int]:
        """The counts of :data:`FILE_COUNTS`, as of now."""
        with self._lock:
            return dict(self._counts)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def write(self, key: str, block: torch.Tensor) -> None:
        path = self.path(key)
        payload = block.contiguous().view(torch.uint8).numpy().tobytes()
        header = json.dumps({"header": json.loads(self._header), "key": key, "crc32": zlib.crc32(payload),
                             "nbytes": len(payload)}, sort_keys=True).encode()
        tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                if not claim(f.fileno(), tmp):
                    raise FileNotFoundError(f"{tmp} was taken for an orphan while it was made")
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                f.write(payload)
                os.replace(tmp, path)   # under the lock: a remover never takes a finished temporary
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._counts["write_errors"] += 1
                first = self._counts["write_errors"] == 1
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            log.log(logging.WARNING if first else logging.DEBUG,
                    "prefix cache: could not write %s (%s); that block is not kept on disk%s%s", path, exc,
                    " (the disk is full: EngineConfig.prefix_cache_disk_bytes caps the cache's files)" if full else "",
                    "; later write errors are counted in statistics().write_errors" if first else "")
            return
        size = path.stat().st_size
        with self._lock:
            self._counts["disk_blocks_written"] += 1
            self.disk_bytes += size
        if self.disk_budget is not None and self.disk_bytes > self.disk_budget:
            self._evict_files()

    def read(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._reject(path, f"cannot be read ({exc})")
        if data[:len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
            return self._reject(path, "is not a tierflow prefix block")
        (length,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
        start = len(MAGIC) + 4 + length
        try:
            meta = json.loads(data[len(MAGIC) + 4:start])
        except ValueError:
            return self._reject(path, "has a corrupt header")
        if not isinstance(meta, dict) or meta.get("header") != json.loads(self._header) or meta.get("key") != key:
            return self._reject(path, "was written for another model, dtype, shape or prefix")
        payload = memoryview(data)[start:]
        if len(payload) != meta.get("nbytes") or len(payload) != self.block_bytes:
            return self._reject(path, "is truncated")
        if zlib.crc32(payload) != meta.get("crc32"):
            return self._reject(path, "fails its checksum")
        try:
            os.utime(path)              # least recently used goes first when the directory is full
        except OSError:
            pass
        return torch.frombuffer(bytearray(payload), dtype=self.dtype).view(self.block_shape)

    def _reject(self, path: Path, why: str) -> None:
        log.warning("prefix cache: %s %s; removed, its tokens are prefilled instead", path, why)
        with self._lock:
            self._counts["rejected_files"] += 1
        try:
            size = path.stat().st_size
            path.unlink()
            with self._lock:
                self.disk_bytes = max(0, self.disk_bytes - size)
        except OSError:
            pass
        return None

    def _remove_stale_temporaries(self) -> None:
        """Remove what writers killed mid-write left behind: temporaries whose lock is free."""
        removed = remove_orphans(self.directory, ".*.tmp", unlocked_older_than_s=STALE_UNLOCKED_S)
        if removed:
            log.info("prefix cache: removed %d temporaries of writers that ended mid-write in %s",
                     len(removed), self.directory)

    def _evict_files(self) -> None:
        assert self.disk_budget is not None
        files = []
        for p in self.directory.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.disk_budget:
                break
            p.unlink(missing_ok=True)
            total -= size
        with self._lock:
            self.disk_bytes = total
