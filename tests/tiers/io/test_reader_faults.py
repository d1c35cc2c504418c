"""DiskReader under faults: a cancelled or failing read returns only after its threads stopped
writing into the caller's buffer (slow reads through a patched ``os.preadv``), and a file cut
short after the index was built gives a TransferError naming the file."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from tierflow.errors import TransferError
from tierflow.testing import build_random_checkpoint
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, CheckpointIndex
from tierflow.tiers.io.reader import DiskReader, aligned_empty

BLOCK = ALIGN_BYTES          # small blocks: one unit is many concurrent requests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("faults") / "llama", "llama", num_layers=2)


def _units(path: Path):
    index = CheckpointIndex.open(path)
    assert len(index.files) == 1
    return index.files[0], index.units


def _largest(units):
    return max(units, key=lambda u: u.buffer_bytes)


def _expected(path: str, layout) -> bytes:
    data = Path(path).read_bytes()
    return b"".join(data[r.file_offset + t.buffer_offset - r.buffer_offset:][:t.nbytes]
                    for t in layout.tensors for r in layout.ranges
                    if r.buffer_offset <= t.buffer_offset < r.buffer_offset + r.nbytes)


def _got(buffer: torch.Tensor, layout) -> bytes:
    return b"".join(bytes(buffer[t.buffer_offset:t.buffer_offset + t.nbytes].numpy()) for t in layout.tensors)


class _SlowPreadv:
    """os.preadv that sleeps before reading; records (start, end) of each call, and fails the
    call at ``fail_offset`` at once with EIO."""

    def __init__(self, delay: float, fail_offset: int | None = None) -> None:
        self.real, self.delay, self.fail_offset = os.preadv, delay, fail_offset
        self.calls: list[tuple[float, float]] = []
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, fd, buffers, offset):
        start = time.perf_counter()
        self.started.set()
        if offset == self.fail_offset:
            with self.lock:
                self.calls.append((start, time.perf_counter()))
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(self.delay)
        try:
            return self.real(fd, buffers, offset)
        finally:
            with self.lock:
                self.calls.append((start, time.perf_counter()))


async def until_set(event: threading.Event, tries: int) -> None:
    """Wait (polling every millisecond, ``tries`` times at most) until a reader thread sets ``event``."""
    for _ in range(tries):
        if event.is_set():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("no read started")


async def ending(task: asyncio.Task) -> str:
    """How a read ended: "returned", "cancelled", or its TransferError's message."""
    try:
        await task
        return "returned"
    except asyncio.CancelledError:
        return "cancelled"
    except TransferError as exc:
        return str(exc)


def _interrupted_read(path: str, layout, slow: _SlowPreadv, cancel: bool):
    """Start a read, cancel it once a thread is reading (or let the failing call end it).
    Returns (outcome, when the read returned, the calls then, the calls a while later, blocks)."""
    async def main():
        reader = DiskReader([path], io_threads=2, block_bytes=BLOCK, direct_io="off")
        try:
            buffer = aligned_empty(layout.buffer_bytes)
            task = asyncio.create_task(reader.read(layout, buffer))
            await until_set(slow.started, tries=1000)
            if cancel:
                task.cancel()
            outcome = await ending(task)
            returned = time.perf_counter()
            with slow.lock:
                then = list(slow.calls)
            await asyncio.sleep(4 * slow.delay)
            with slow.lock:
                later = list(slow.calls)
            return outcome, returned, then, later
        finally:
            reader.close()

    blocks = sum(-(-r.nbytes // BLOCK) for r in layout.ranges)
    return (*asyncio.run(main()), blocks)


def test_cancelled_read_returns_after_its_threads_stopped(checkpoint, monkeypatch):
    path, units = _units(checkpoint)
    layout = _largest(units)
    slow = _SlowPreadv(delay=0.1)
    monkeypatch.setattr(os, "preadv", slow)
    outcome, returned, then, later, blocks = _interrupted_read(path, layout, slow, cancel=True)
    assert outcome == "cancelled"
    assert blocks > 8
    assert then, "no read had started"
    assert later == then, "a read thread was still running (or started) after the cancelled read returned"
    assert all(end <= returned for _, end in then)
    assert len(then) < blocks                    # the requests not started yet never ran


def test_failed_read_returns_after_its_other_threads_stopped(checkpoint, monkeypatch):
    path, units = _units(checkpoint)
    layout = _largest(units)
    first = layout.ranges[0]
    slow = _SlowPreadv(delay=0.1, fail_offset=first.file_offset + BLOCK)    # the second block fails
    monkeypatch.setattr(os, "preadv", slow)
    outcome, returned, then, later, blocks = _interrupted_read(path, layout, slow, cancel=False)
    assert re.search(rf"{re.escape(path)}: read of {BLOCK} bytes at offset {first.file_offset + BLOCK} failed",
                     outcome), outcome
    assert later == then and len(then) >= 2      # the first block was still sleeping when the second failed
    assert all(end <= returned for _, end in then)
    assert len(then) < blocks


def _cut_copy(checkpoint: Path, tmp_path: Path):
    """A copy of the checkpoint file, its units re-pointed at the copy, the unit whose tensors
    end last in the file and the offset where its last tensor ends."""
    import dataclasses
    path, units = _units(checkpoint)
    copy = str(tmp_path / "cut.safetensors")
    Path(copy).write_bytes(Path(path).read_bytes())
    units = [dataclasses.replace(u, ranges=tuple(dataclasses.replace(r, path=copy) for r in u.ranges))
             for u in units]

    def end(u):
        return max(r.file_offset + t.buffer_offset - r.buffer_offset + t.nbytes for t in u.tensors
                   for r in u.ranges if r.buffer_offset <= t.buffer_offset < r.buffer_offset + r.nbytes)

    last = max(units, key=end)
    return copy, last, end(last)


def _read(path: str, layout, *, cut_before_open: int | None = None, cut_after_open: int | None = None):
    async def main():
        if cut_before_open is not None:
            os.truncate(path, cut_before_open)
        reader = DiskReader([path], io_threads=2, block_bytes=BLOCK)
        try:
            if cut_after_open is not None:
                os.truncate(path, cut_after_open)
            buffer = aligned_empty(layout.buffer_bytes)
            nbytes = await reader.read(layout, buffer)
            return nbytes, _got(buffer, layout)
        finally:
            reader.close()

    return asyncio.run(main())


def test_last_unit_reads_although_its_aligned_range_runs_past_the_end(checkpoint, tmp_path):
    copy, last, end = _cut_copy(checkpoint, tmp_path)
    size = os.path.getsize(copy)
    assert size == end and last.ranges[-1].file_offset + last.ranges[-1].nbytes > size   # only padding is missing
    expected = _expected(copy, last)
    nbytes, got = _read(copy, last)
    assert got == expected and nbytes < last.buffer_bytes


@pytest.mark.parametrize("when", ["before the reader opened it", "after the reader opened it"])
def test_file_truncated_after_the_index_was_built(checkpoint, tmp_path, when):
    copy, last, end = _cut_copy(checkpoint, tmp_path)
    cut = end - 1                                # one byte of the last tensor missing
    if when.startswith("before"):               # the reader delivers fewer bytes than the tensors need
        message = rf"{re.escape(copy)}: read {cut - last.ranges[-1].file_offset} bytes at offset " \
                  rf"{last.ranges[-1].file_offset} where unit {re.escape(last.name)} needs .*truncated"
        with pytest.raises(TransferError, match=message):
            _read(copy, last, cut_before_open=cut)
    else:                                        # the file ends under a running read
        with pytest.raises(TransferError, match=rf"{re.escape(copy)}: file ended at byte {cut}.*truncated"):
            _read(copy, last, cut_after_open=cut)
