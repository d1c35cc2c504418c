"""KvikioReader against a stand-in kvikio module (CPU tensors, reads through os.preadv): it reads
what DiskReader reads, turns short reads into TransferErrors naming the file, returns from a
cancelled or failed read only after every pread it issued completed, never blocks the event
loop, and keeps its own parallelism and task size where kvikio's are process-wide. Plus
``choose_reader`` and ``kvikio_available`` with kvikio present and absent (how the mode is told
apart, and what "auto" picks by it: ``test_kvikio_mode.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from tierflow.errors import ConfigError, TransferError
from tierflow.testing import build_random_checkpoint
from tierflow.tiers.io import kvikio as kv
from tierflow.tiers.io import kvikio_setup as setup
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, CheckpointIndex, UnitLayout
from tierflow.tiers.io.reader import DiskReader, aligned_empty
from tests.tiers.io.test_reader_faults import ending, until_set


class _Future:
    def __init__(self, thread: threading.Thread | None, box: dict) -> None:
        self.thread, self.box = thread, box

    def get(self) -> int:
        if self.thread is not None:
            self.thread.join()
        if "error" in self.box:
            raise self.box["error"]
        return self.box["nbytes"]


class _CuFile:
    def __init__(self, fake: "FakeKvikio", path: str, flags: str = "r") -> None:
        assert flags == "r"
        self.fake, self.path, self.fd = fake, str(path), os.open(path, os.O_RDONLY)
        fake.opened.append(self.path)

    def pread(self, buf, size=None, file_offset=0, task_size=None) -> _Future:
        assert buf.dtype == torch.uint8 and buf.numel() == size
        with self.fake.lock:
            self.fake.preads.append((self.path, file_offset, size, task_size, threading.get_ident()))
        box: dict = {}
        if self.fake.inline:         # as kvikio serves reads under its GDS threshold: inside pread
            self._read(buf, size, file_offset, box)
            return _Future(None, box)
        thread = threading.Thread(target=self._read, args=(buf, size, file_offset, box))
        thread.start()
        return _Future(thread, box)

    def _read(self, buf, size, file_offset, box) -> None:
        fake = self.fake
        fake.started.set()
        with fake.pool:                  # kvikio's process-wide pool runs num_threads tasks at a time
            if not fake.inline:
                fake.pool.wait_for(lambda: fake.running < fake.pool_threads())
            fake.running += 1
            fake.max_running = max(fake.max_running, fake.running)
        try:
            time.sleep(fake.delay_s)
            if (self.path, file_offset) == fake.fail_at:
                until = time.perf_counter() + 5
                while len(fake.preads) < fake.fail_after_issued and time.perf_counter() < until:
                    time.sleep(0.001)
                raise RuntimeError("POSIX error on pread: Input/output error")
            if not fake.gate.wait(5):    # the read blocked the loop that would have opened it
                raise RuntimeError("the gate never opened")
            view, done = memoryview(buf.numpy()), 0
            while done < size:
                got = os.preadv(self.fd, [view[done:size]], file_offset + done)
                if got == 0:             # kvikio treats end of file as an error
                    raise RuntimeError("POSIX error on pread: EOF")
                done += got
            box["nbytes"] = done
        except RuntimeError as exc:
            box["error"] = exc
        finally:
            with fake.lock:
                fake.finished.append(time.perf_counter())
            with fake.pool:
                fake.running -= 1
                fake.pool.notify_all()

    def close(self) -> None:
        os.close(self.fd)
        self.fake.closed.append(self.path)


class FakeKvikio:
    """A stand-in for the kvikio module. Reads wait for ``gate`` (then ``delay_s``); the one at
    ``fail_at`` (path, offset) fails at once, or once ``fail_after_issued`` preads were issued;
    ``inline`` reads inside ``pread`` itself. As in
    kvikio, ``defaults`` are process-wide: the other reads run on one pool of ``num_threads``
    threads (``KVIKIO_NTHREADS``, else 1, until ``defaults.set`` changes it), whoever issued them."""

    def __init__(self, *, compat: bool = True, inline: bool = False, fail_at: tuple[str, int] | None = None,
                 fail_after_issued: int = 0, delay_s: float = 0.0, gds: bool | None = None) -> None:
        self.inline, self.fail_at, self.delay_s = inline, fail_at, delay_s
        self.fail_after_issued = fail_after_issued
        self.gate, self.started, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.gate.set()
        self.preads: list[tuple[str, int, int, int, int]] = []   # path, offset, size, task size, thread
        self.finished: list[float] = []
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.settings: dict[str, int] = {}
        self.settings_log: list[tuple[str, int]] = []            # every defaults.set, in order
        self.pool = threading.Condition()
        self.running = self.max_running = 0                       # reads running now / at most so far
        self.module = types.ModuleType("kvikio")
        self.module.CuFile = functools.partial(_CuFile, self)
        self.module.defaults = types.SimpleNamespace(is_compat_mode_preferred=lambda: compat, set=self._set,
                                                     get=self._get)
        if gds is not None:          # cuFile's driver properties, as kvikio 25.04 and later expose them
            self.module.cufile_driver = types.SimpleNamespace(
                properties=types.SimpleNamespace(is_gds_available=gds, max_device_cache_size=128 * 1024))

    def _set(self, name: str, value: int) -> None:
        with self.pool:
            self.settings[name] = value
            self.settings_log.append((name, value))
            self.pool.notify_all()

    def _get(self, name: str) -> int:
        assert name == "num_threads"
        return self.settings.get(name, int(os.environ.get("KVIKIO_NTHREADS", "1")))

    def pool_threads(self) -> int:
        return self._get("num_threads")


@pytest.fixture
def install(monkeypatch):
    monkeypatch.delenv("KVIKIO_NTHREADS", raising=False)

    def install(**kwargs) -> FakeKvikio:
        fake = FakeKvikio(**kwargs)
        monkeypatch.setitem(sys.modules, "kvikio", fake.module)
        return fake
    return install


@pytest.fixture
def no_kvikio(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)      # makes `import kvikio` fail


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointIndex:
    path = build_random_checkpoint(tmp_path_factory.mktemp("kvikio") / "llama", "llama", num_layers=2,
                                   max_shard_bytes=200_000)
    index = CheckpointIndex.open(path)
    assert len(index.files) > 1
    return index


def _two_range_layout(index: CheckpointIndex) -> UnitLayout:
    """One layout made of two units' ranges: a read with more than one pread in flight."""
    first, second = index.units[1].ranges[0], index.units[2].ranges[0]
    second = dataclasses.replace(second, buffer_offset=first.nbytes)
    return UnitLayout(0, "two", (first, second), (), first.nbytes + second.nbytes, 0)


def _clipped(r) -> int:
    """The bytes of range ``r`` its file holds (a range may run past the end by its padding)."""
    return min(r.nbytes, os.path.getsize(r.path) - r.file_offset)


def _read_with(reader, layout, buffer) -> int:
    async def main():
        return await reader.read(layout, buffer)
    return asyncio.run(main())


# ----------------------------------------------------------------------------- reading
def test_reads_every_unit_as_the_disk_reader_does(checkpoint, install):
    fake = install()
    disk = DiskReader(checkpoint.files, io_threads=2, block_bytes=64 * 2**10)
    reader = kv.KvikioReader(checkpoint.files, threads=3, task_bytes=2 * 2**20)
    try:
        total = 0
        for layout in checkpoint.units:
            expected = aligned_empty(layout.buffer_bytes)
            expected.zero_()
            got = torch.full((layout.buffer_bytes + 4096,), 0xAB, dtype=torch.uint8)
            got[:layout.buffer_bytes] = 0
            nbytes = _read_with(reader, layout, got)
            assert nbytes == _read_with(disk, layout, expected)
            assert torch.equal(got[:layout.buffer_bytes], expected), layout.name
            assert bool((got[layout.buffer_bytes:] == 0xAB).all())     # nothing written past the unit
            total += nbytes
        stats = reader.statistics()
    finally:
        reader.close()
        disk.close()
    assert stats == kv.KvikioStats(total, sum(len(u.ranges) for u in checkpoint.units), stats.busy_s, 3,
                                   2 * 2**20, "compat")
    assert stats.busy_s > 0
    assert sorted(fake.opened) == sorted(checkpoint.files) and sorted(fake.closed) == sorted(checkpoint.files)
    assert fake.settings_log == [("num_threads", setup.PROCESS_POOL_THREADS)]     # not the reader's 3
    assert {task for _, _, _, task, _ in fake.preads} == {2 * 2**20}


def test_mode_is_gds_when_kvikio_prefers_it_and_cufile_has_nvidia_fs(checkpoint, install):
    install(compat=False, gds=True)
    reader = kv.KvikioReader(checkpoint.files)
    try:
        assert reader.statistics().mode == "gds"
    finally:
        reader.close()


def test_close_is_idempotent_and_a_closed_reader_refuses_reads(checkpoint, install):
    fake = install()
    reader = kv.KvikioReader(checkpoint.files)
    reader.close()
    reader.close()
    assert len(fake.closed) == len(checkpoint.files)
    layout = checkpoint.units[0]
    with pytest.raises(TransferError, match="closed"):
        _read_with(reader, layout, torch.empty(layout.buffer_bytes, dtype=torch.uint8))


def test_a_buffer_too_small_or_not_bytes_is_refused(checkpoint, install):
    install()
    reader = kv.KvikioReader(checkpoint.files)
    layout = checkpoint.units[1]
    try:
        for buffer in (torch.empty(layout.buffer_bytes - 1, dtype=torch.uint8),
                       torch.empty(layout.buffer_bytes, dtype=torch.float32)):
            with pytest.raises(TransferError, match=re.escape(layout.name)):
                _read_with(reader, layout, buffer)
    finally:
        reader.close()


@pytest.mark.parametrize("kwargs", [dict(threads=0), dict(task_bytes=6000), dict(task_bytes=0)])
def test_bad_settings_are_config_errors(checkpoint, install, kwargs):
    install()
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        kv.KvikioReader(checkpoint.files, **kwargs)


# ----------------------------------------------------------------------------- short reads
def _cut_copy(index: CheckpointIndex, tmp_path: Path):
    """A copy of the file holding the head, the head re-pointed at it, and where its last tensor ends."""
    head = index.units[-1]
    assert len({r.path for r in head.ranges}) == 1
    copy = str(tmp_path / "cut.safetensors")
    Path(copy).write_bytes(Path(head.ranges[0].path).read_bytes())
    head = dataclasses.replace(head, ranges=tuple(dataclasses.replace(r, path=copy) for r in head.ranges))
    last = head.ranges[-1]
    return copy, head, last.file_offset + last.needed


def test_the_last_unit_reads_although_its_range_runs_past_the_end(checkpoint, install, tmp_path):
    install()
    copy, head, end = _cut_copy(checkpoint, tmp_path)
    reader = kv.KvikioReader([copy])
    try:
        nbytes = _read_with(reader, head, torch.empty(head.buffer_bytes, dtype=torch.uint8))
    finally:
        reader.close()
    assert end == os.path.getsize(copy) and nbytes < head.buffer_bytes


@pytest.mark.parametrize("when", ["before the reader opened it", "after the reader opened it"])
def test_a_truncated_file_is_a_transfer_error_naming_it(checkpoint, install, tmp_path, when):
    install()
    copy, head, end = _cut_copy(checkpoint, tmp_path)
    if when.startswith("before"):
        os.truncate(copy, end - 1)
        message = rf"{re.escape(copy)}: read .* where unit {re.escape(head.name)} needs .*truncated"
    else:
        message = rf"{re.escape(copy)}: kvikio read of .* failed \(POSIX error on pread: EOF\)"
    reader = kv.KvikioReader([copy])
    try:
        if not when.startswith("before"):
            os.truncate(copy, end - 1)
        with pytest.raises(TransferError, match=message):
            _read_with(reader, head, torch.empty(head.buffer_bytes, dtype=torch.uint8))
    finally:
        reader.close()


# ----------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("inline", [False, True], ids=["background", "inside-pread"])
def test_the_loop_keeps_running_while_a_read_is_in_flight(checkpoint, install, inline):
    fake = install(inline=inline)
    fake.gate.clear()
    layout = _two_range_layout(checkpoint)
    reader = kv.KvikioReader(checkpoint.files)

    async def main():
        loop_thread = threading.get_ident()
        task = asyncio.create_task(reader.read(layout, torch.empty(layout.buffer_bytes, dtype=torch.uint8)))
        await until_set(fake.started, tries=2000)
        ticks, until = 0, time.perf_counter() + 0.1
        while time.perf_counter() < until:
            await asyncio.sleep(0.001)
            ticks += 1
        assert not task.done()
        fake.gate.set()
        return ticks, await task, loop_thread

    try:
        ticks, nbytes, loop_thread = asyncio.run(main())
    finally:
        reader.close()
    assert ticks >= 20
    assert nbytes == sum(_clipped(r) for r in layout.ranges)
    assert loop_thread not in {thread for *_, thread in fake.preads}


def _interrupted(reader, fake: FakeKvikio, layout, *, cancel: bool):
    """Start a read, cancel it (or let the failing pread end it), open the gate 0.2 s later.
    Returns (outcome, when the read returned)."""
    async def main():
        task = asyncio.create_task(reader.read(layout, torch.empty(layout.buffer_bytes, dtype=torch.uint8)))
        await until_set(fake.started, tries=2000)
        asyncio.get_running_loop().call_later(0.2, fake.gate.set)
        if cancel:
            task.cancel()
        return await ending(task), time.perf_counter()

    return asyncio.run(main())


def test_a_cancelled_read_returns_after_its_preads_completed(checkpoint, install):
    fake = install()
    fake.gate.clear()
    layout = _two_range_layout(checkpoint)
    reader = kv.KvikioReader(checkpoint.files)
    try:
        started = time.perf_counter()
        outcome, returned = _interrupted(reader, fake, layout, cancel=True)
        with fake.lock:
            finished, issued = list(fake.finished), len(fake.preads)
    finally:
        reader.close()
    assert outcome == "cancelled"
    assert returned - started >= 0.2                          # it waited for the gate
    assert issued >= 1 and len(finished) == issued
    assert all(end <= returned for end in finished)


def test_a_failed_read_returns_after_its_other_preads_completed(checkpoint, install):
    layout = _two_range_layout(checkpoint)
    failing = layout.ranges[0]
    # It fails once the other pread was issued too: a failure stops the tasks not started yet.
    fake = install(fail_at=(failing.path, failing.file_offset), fail_after_issued=2)
    fake.gate.clear()
    reader = kv.KvikioReader(checkpoint.files)
    try:
        outcome, returned = _interrupted(reader, fake, layout, cancel=False)
        with fake.lock:
            finished, issued = list(fake.finished), len(fake.preads)
    finally:
        reader.close()
    assert outcome == f"{failing.path}: kvikio read of {_clipped(failing)} bytes at offset {failing.file_offset} " \
                      "failed (POSIX error on pread: Input/output error)"
    assert issued == 2 and len(finished) == 2                 # the second was still waiting when the first failed
    assert all(end <= returned for end in finished)


# ----------------------------------------------------------------------------- settings per reader
def _ranges_of(index: CheckpointIndex, names: tuple[str, ...]) -> UnitLayout:
    """One layout made of every range of the units ``names``, back to back in one buffer."""
    ranges, offset = [], 0
    for unit in index.units:
        if unit.name in names:
            for r in unit.ranges:
                ranges.append(dataclasses.replace(r, buffer_offset=offset))
                offset += r.nbytes
    return UnitLayout(0, "many", tuple(ranges), (), offset, 0)


def test_two_readers_in_one_process_keep_their_own_threads_and_task_size(checkpoint, install):
    """Two engines' readers in one process. kvikio's thread pool and task size are process-wide:
    a reader that sets them (as this one once did) re-sizes the other's reads. Each keeps its own."""
    fake = install(delay_s=0.03)
    layout = _ranges_of(checkpoint, ("layer.0", "layer.1"))
    assert len(layout.ranges) >= 3
    disk = DiskReader(checkpoint.files, io_threads=2, block_bytes=64 * 2**10)
    expected = aligned_empty(layout.buffer_bytes)
    expected.zero_()
    try:
        _read_with(disk, layout, expected)
    finally:
        disk.close()
    small, large = 4 * ALIGN_BYTES, 8 * ALIGN_BYTES
    first = kv.KvikioReader(checkpoint.files, threads=2, task_bytes=large)
    second = kv.KvikioReader(checkpoint.files, threads=5, task_bytes=small)    # made after the first
    seen = {}
    try:
        for name, reader in (("first", first), ("second", second), ("first again", first)):
            fake.max_running, before = 0, len(fake.preads)
            got = torch.zeros(layout.buffer_bytes, dtype=torch.uint8)
            assert _read_with(reader, layout, got) == sum(_clipped(r) for r in layout.ranges)
            assert torch.equal(got, expected), name
            preads = fake.preads[before:]
            seen[name] = (fake.max_running, {task for *_, task, _ in preads}, max(size for _, _, size, _, _ in preads),
                          len(preads))
        stats = first.statistics(), second.statistics()
    finally:
        first.close()
        second.close()

    def tasks(task_bytes: int) -> int:
        return sum(-(-_clipped(r) // task_bytes) for r in layout.ranges)

    assert fake.settings_log == [("num_threads", setup.PROCESS_POOL_THREADS)]     # once, to neither reader's threads
    assert seen["first"] == seen["first again"] == (2, {large}, large, tasks(large))
    running, task_sizes, biggest, count = seen["second"]
    assert 2 < running <= 5 and (task_sizes, biggest, count) == ({small}, small, tasks(small))
    assert [(s.threads, s.task_bytes, s.requests) for s in stats] == [(2, large, 2 * tasks(large)),
                                                                        (5, small, tasks(small))]


def test_the_process_pool_is_sized_once_and_never_shrunk(checkpoint, install):
    fake = install()
    fake.settings["num_threads"] = setup.PROCESS_POOL_THREADS * 2       # larger already (the user's choice)
    kv.KvikioReader(checkpoint.files, threads=3).close()
    assert fake.settings_log == []
    other = install()                                                   # another process' kvikio
    for threads in (1, 7):
        kv.KvikioReader(checkpoint.files, threads=threads).close()
    assert other.settings_log == [("num_threads", setup.PROCESS_POOL_THREADS)]


def test_kvikio_nthreads_from_the_environment_stands(checkpoint, install, monkeypatch, caplog):
    fake = install()
    monkeypatch.setenv("KVIKIO_NTHREADS", "2")
    with caplog.at_level(logging.WARNING, logger="tierflow.tiers.io.kvikio"):
        kv.KvikioReader(checkpoint.files, threads=4).close()
    assert fake.settings_log == []
    assert "has 2 threads, fewer than this reader's 4" in caplog.text and "KVIKIO_NTHREADS" in caplog.text


# ----------------------------------------------------------------------------- choosing a reader
@pytest.mark.parametrize("requested", [None, "auto", "direct", "kvikio"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("present", [True, False], ids=["kvikio", "no-kvikio"])
def test_choose_reader(install, monkeypatch, requested, device, present):
    if present:
        install()
    else:
        monkeypatch.setitem(sys.modules, "kvikio", None)
    if requested == "kvikio" and device == "cpu":
        with pytest.raises(ConfigError, match=r"reader='kvikio' reads into GPU memory, but the device is 'cpu'"):
            setup.choose_reader(requested, device)
    elif requested == "kvikio" and not present:
        with pytest.raises(ConfigError, match=r"needs the kvikio package.*pip install \"tierflow\[cuda"):
            setup.choose_reader(requested, device)
    else:       # the stand-in runs in compatibility mode: "auto" never takes it (tests/tiers/io/test_kvikio_mode.py)
        want = "kvikio" if requested == "kvikio" else "direct"
        assert setup.choose_reader(requested, device) == want


def test_choose_reader_refuses_an_unknown_reader(install):
    install()
    with pytest.raises(ConfigError, match=r"reader must be one of \('auto', 'direct', 'kvikio'\), got 'gds'"):
        setup.choose_reader("gds", "cuda")


@pytest.mark.parametrize("cuda, extra", [("12.4", "cuda12"), ("13.0", "cuda13")])
def test_the_install_hint_matches_torchs_cuda(no_kvikio, monkeypatch, cuda, extra):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    with pytest.raises(ConfigError) as info:
        setup.require_kvikio()
    assert f'pip install "tierflow[{extra}]"' in str(info.value) and f"CUDA {cuda}" in str(info.value)


def test_the_install_hint_on_a_cpu_build_of_torch(no_kvikio, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"CPU build.*tierflow\[cuda12\].*tierflow\[cuda13\]"):
        setup.require_kvikio()


def test_kvikio_available(install, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)
    assert setup.kvikio_available() is False
    install()
    assert setup.kvikio_available() is True


def test_the_reader_needs_kvikio(checkpoint, no_kvikio):
    with pytest.raises(ConfigError, match=r"pip install"):
        kv.KvikioReader(checkpoint.files)
