"""The prefix cache: KV blocks keyed by the tokens before them, reused by later requests.

A cached block holds the keys and values of ``block_tokens`` consecutive tokens in every
layer, [layers, 2, kv_heads, block_tokens, head_dim]. Its key is a chain hash: block j's key
is sha256(key of block j-1 + the token ids of block j), started from the model's
fingerprint, so one key names the model and the whole prefix up to the block's end. A new
request looks up the keys of its prompt's full blocks in order and reuses the longest run
found; only the rest of the prompt is prefilled.

Blocks live in host memory (an LRU of ``memory_bytes``) and, with a directory, in one file
per block that later processes reuse; the files' format, their checks and the directory's
upkeep are ``prefix_files``'. Disk writes run on a writer thread.

The keys and the model fingerprint are computed in ``prefix_keys``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tierflow.tiers.kv.prefix_files import FILE_COUNTS, BlockFiles, model_directory
from tierflow.tiers.kv.prefix_keys import FORMAT_VERSION, block_keys

_MAX_PENDING_BYTES = 256 * 2**20     # blocks queued for the writer before store() waits


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
        self._counts = dict.fromkeys(("lookups", "hit_blocks", "stored_blocks"), 0)
        self._header = json.dumps({"version": FORMAT_VERSION, "model": fingerprint, "dtype": str(dtype),
                                   "shape": list(block_shape)}, sort_keys=True)
        self.directory: Path | None = None
        self._files: BlockFiles | None = None
        self._writer: ThreadPoolExecutor | None = None
        if directory is not None:
            self.directory = model_directory(Path(directory), fingerprint)
            self._files = BlockFiles(self.directory, self._header, self.block_shape, dtype, self.block_bytes,
                                     disk_bytes)
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="tierflow-prefix")

    # ------------------------------------------------------------------------------ lookup
    def keys(self, token_ids: Sequence[int]) -> list[str]:
        return block_keys(self.fingerprint, token_ids, self.block_tokens)

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._memory or key in self._pending:
                return True
        return self._files is not None and self._files.exists(key)

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
        if self._files is None:
            return None
        block = self._files.read(key)
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
                    (self._files is not None and self._files.exists(key)):
                return
            self._counts["stored_blocks"] += 1
            self._keep_locked(key, block)
            if self._writer is None or self._files is None:
                return
            future = self._writer.submit(self._files.write, key, block)
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
        c.update(self._files.counts() if self._files is not None else dict.fromkeys(FILE_COUNTS, 0))
        disk_bytes = self._files.disk_bytes if self._files is not None else 0
        return PrefixCacheStats(lookups=c["lookups"], hit_blocks=c["hit_blocks"],
                                hit_tokens=c["hit_blocks"] * self.block_tokens, stored_blocks=c["stored_blocks"],
                                memory_blocks=memory, memory_bytes=memory * self.block_bytes,
                                disk_blocks_written=c["disk_blocks_written"], disk_bytes=disk_bytes,
                                rejected_files=c["rejected_files"], write_errors=c["write_errors"])
