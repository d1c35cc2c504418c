"""The prefix cache: KV blocks keyed by the tokens before them, reused by later requests.

A cached block holds the keys and values of ``block_tokens`` consecutive tokens in every
layer, [layers, 2, kv_heads, block_tokens, head_dim]. Its key is a chain hash: block j's key
is sha256(key of block j-1 + the token ids of block j), started from the model's
fingerprint, so one key names the model and the whole prefix up to the block's end. A new
request looks up the keys of its prompt's full blocks in order and reuses the longest run
found; only the rest of the prompt is prefilled.

Blocks live in host memory (an LRU of ``memory_bytes``) and, with a directory, in one file
per block that later processes reuse. A file records the format version, the model
fingerprint, its key, dtype, shape and a CRC32 of the payload; it is written to a temporary
name and renamed, so a reader sees a whole file or none. The writer holds the temporary's lock
until the rename (``cachedir.claim``), so one left by a writer that was killed is told from one
being written: a cache that opens on the directory removes those whose lock is free (on a
filesystem without locks, those older than an hour). A file that fails any check is
removed and counts as a miss — the request prefills those tokens instead, never runs on a
wrong block. Disk writes run on a writer thread; a full disk or any write error only costs
the cache that block (the first one is logged as a warning, all are counted in
``write_errors``). A directory that is a file, lies under one, is missing with its parent, or
takes no files is a ``ConfigError`` when the cache opens; a missing last directory is made.

The keys and the model fingerprint are computed in ``prefix_keys``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tierflow.errors import ConfigError
from tierflow.tiers.io.cachedir import claim, directory_problem, remove_orphans
from tierflow.tiers.kv.prefix_keys import FORMAT_VERSION, block_keys

log = logging.getLogger(__name__)

MAGIC = b"TFPREFIX"
SUFFIX = ".kvblock"
_MAX_PENDING_BYTES = 256 * 2**20     # blocks queued for the writer before store() waits
STALE_UNLOCKED_S = 3600              # without locks, a temporary this old is taken for a dead writer's


def _model_directory(root: Path, fingerprint: str) -> Path:
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


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    lookups: int                 # requests that looked for a prefix
    hit_blocks: int              # blocks reused
    hit_tokens: int              # tokens of those blocks (hit_blocks * block_tokens)
    stored_blocks: int           # blocks added (memory or disk)
    memory_blocks: int           # held in memory now
    memory_bytes: int            # bytes of the blocks held in memory now
    disk_blocks_written: int     # block files written to the directory so far
    disk_bytes: int              # held in the directory now (as this process knows it)
    rejected_files: int          # files that failed a check (removed; counted as misses)
    write_errors: int            # block files that could not be written (those blocks are not kept on disk)


class PrefixCache:
    """Blocks of ``block_shape`` = (layers, 2, kv_heads, block_tokens, head_dim) in ``dtype``.

    ``memory_bytes`` bounds the in-memory LRU (0: none kept in memory); ``directory`` (may be
    None) keeps blocks across processes, bounded by ``disk_bytes`` (None: unbounded), least
    recently used removed first. Thread-safe."""

    def __init__(self, fingerprint: str, block_shape: tuple[int, int, int, int, int], dtype: torch.dtype, *,
                 memory_bytes: int = 0, directory: str | os.PathLike[str] | None = None,
                 disk_bytes: int | None = None) -> None:
        self.fingerprint, self.block_shape, self.dtype = fingerprint, tuple(block_shape), dtype
        self.block_tokens = block_shape[3]
        self.block_bytes = dtype.itemsize * int(torch.Size(block_shape).numel())
        self.memory_budget, self.disk_budget = memory_bytes, disk_bytes
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pending: dict[str, tuple[torch.Tensor, Future[None]]] = {}
        self._counts = dict.fromkeys(("lookups", "hit_blocks", "stored_blocks", "disk_blocks_written",
                                      "rejected_files", "write_errors"), 0)
        self.directory: Path | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._disk_bytes = 0
        if directory is not None:
            self.directory = _model_directory(Path(directory), fingerprint)
            self._remove_stale_temporaries()
            self._disk_bytes = sum(p.stat().st_size for p in self.directory.glob(f"*{SUFFIX}"))
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="tierflow-prefix")
        self._header = json.dumps({"version": FORMAT_VERSION, "model": fingerprint, "dtype": str(dtype),
                                   "shape": list(block_shape)}, sort_keys=True)

    # ------------------------------------------------------------------------------ lookup
    def keys(self, token_ids: Sequence[int]) -> list[str]:
        return block_keys(self.fingerprint, token_ids, self.block_tokens)

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._memory or key in self._pending:
                return True
        return self.directory is not None and self._path(key).exists()

    def match(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, the cache holds (a later load may still find
        one of them corrupt and stop earlier)."""
        with self._lock:
            self._counts["lookups"] += 1
        n = 0
        while n < len(keys) and self.contains(keys[n]):
            n += 1
        return n

    def load(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """The blocks of ``keys`` in order, stopping at the first one missing or failing its
        checks. Memory hits are returned as they are stored: do not modify them."""
        blocks = []
        for key in keys:
            block = self._get(key)
            if block is None:
                break
            blocks.append(block)
        with self._lock:
            self._counts["hit_blocks"] += len(blocks)
        return blocks

    def _get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            if key in self._pending:
                return self._pending[key][0]
        if self.directory is None:
            return None
        block = self._read(self._path(key), key)
        if block is not None:
            self._keep(key, block)
        return block

    # ------------------------------------------------------------------------------ store
    def store(self, key: str, block: torch.Tensor) -> None:
        """Add a block (the cache keeps ``block`` itself: pass a tensor nobody modifies)."""
        if tuple(block.shape) != self.block_shape or block.dtype != self.dtype:
            raise ValueError(f"a prefix block must be {self.block_shape} {self.dtype}, got "
                             f"{tuple(block.shape)} {block.dtype}")
        if self.contains(key):
            return
        block = block.cpu()
        if self._writer is not None:
            self._wait_for_writer()
        with self._lock:
            # Checked again under the lock: another thread may have stored the same key since
            # (a block's file exists once its write left _pending), and it must be kept, counted
            # and written once.
            if key in self._memory or key in self._pending or \
                    (self.directory is not None and self._path(key).exists()):
                return
            self._counts["stored_blocks"] += 1
            self._keep_locked(key, block)
            if self._writer is None:
                return
            future = self._writer.submit(self._write, key, block)
            self._pending[key] = (block, future)
        future.add_done_callback(lambda _: self._written(key))   # may run here at once: not under the lock

    def _keep(self, key: str, block: torch.Tensor) -> None:
        with self._lock:
            self._keep_locked(key, block)

    def _keep_locked(self, key: str, block: torch.Tensor) -> None:
        if self.block_bytes > self.memory_budget:
            return
        self._memory[key] = block
        self._memory.move_to_end(key)
        while len(self._memory) * self.block_bytes > self.memory_budget:
            self._memory.popitem(last=False)

    def _written(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _wait_for_writer(self) -> None:
        with self._lock:
            futures = [f for _, f in self._pending.values()]
        if len(futures) * self.block_bytes >= _MAX_PENDING_BYTES:
            futures[0].result()

    def flush(self) -> None:
        """Wait until every block stored so far is on disk (or has failed to get there)."""
        with self._lock:
            futures = [f for _, f in self._pending.values()]
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        with self._lock:
            self._memory.clear()

    def statistics(self) -> PrefixCacheStats:
        with self._lock:
            c = dict(self._counts)
            memory = len(self._memory)
        return PrefixCacheStats(lookups=c["lookups"], hit_blocks=c["hit_blocks"],
                                hit_tokens=c["hit_blocks"] * self.block_tokens, stored_blocks=c["stored_blocks"],
                                memory_blocks=memory, memory_bytes=memory * self.block_bytes,
                                disk_blocks_written=c["disk_blocks_written"], disk_bytes=self._disk_bytes,
                                rejected_files=c["rejected_files"], write_errors=c["write_errors"])

    # ------------------------------------------------------------------------------ files
    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}{SUFFIX}"

    def _write(self, key: str, block: torch.Tensor) -> None:
        path = self._path(key)
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
            self._disk_bytes += size
        if self.disk_budget is not None and self._disk_bytes > self.disk_budget:
            self._evict_files()

    def _read(self, path: Path, key: str) -> torch.Tensor | None:
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
                self._disk_bytes = max(0, self._disk_bytes - size)
        except OSError:
            pass
        return None

    def _remove_stale_temporaries(self) -> None:
        """Remove what writers killed mid-write left behind: temporaries whose lock is free."""
        assert self.directory is not None
        removed = remove_orphans(self.directory, ".*.tmp", unlocked_older_than_s=STALE_UNLOCKED_S)
        if removed:
            log.info("prefix cache: removed %d temporaries of writers that ended mid-write in %s",
                     len(removed), self.directory)

    def _evict_files(self) -> None:
        assert self.directory is not None and self.disk_budget is not None
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
            self._disk_bytes = total
