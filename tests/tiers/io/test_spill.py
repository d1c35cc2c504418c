"""KV spill files: blocks round-trip, corruption and missing files are caught, a full disk is
a capacity error, and nothing is left behind."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest
import torch

from tierflow.errors import KVCorruptionError, TierCapacityError, TransferError
import zlib

from tierflow.tiers.io import checksum as crc_module
from tierflow.tiers.io.reader import aligned_empty
from tierflow.tiers.io.checksum import checksum, run_checksum
from tierflow.tiers.io.spill import SpillFile


def _block(seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_blocks_round_trip_in_any_slot(tmp_path):
    blocks = [_block(i) for i in range(5)]
    nbytes = blocks[0].numel() * blocks[0].element_size()
    with SpillFile(tmp_path / "kv.spill", nbytes, 5) as f:
        assert os.path.getsize(f.path) == f.size_bytes == 5 * 4096    # slots are 4 KiB aligned, space reserved
        for slot in (3, 0, 4, 1, 2):
            f.write(slot, blocks[slot])
        for slot in range(5):
            out = torch.empty_like(blocks[slot])
            assert torch.equal(f.read(slot, out), blocks[slot])
    assert not (tmp_path / "kv.spill").exists()


def test_a_flipped_byte_is_caught(tmp_path):
    block = _block(0)
    with SpillFile(tmp_path / "kv.spill", block.numel() * 2, 2) as f:
        f.write(1, block)
        with open(f.path, "r+b") as raw:
            raw.seek(4096 + 100)
            byte = raw.read(1)
            raw.seek(4096 + 100)
            raw.write(bytes([byte[0] ^ 0x10]))
        with pytest.raises(KVCorruptionError, match="slot 1 .* fails its checksum"):
            f.read(1, torch.empty_like(block))
        f.write(1, block)                          # rewritten, it reads back correctly
        assert torch.equal(f.read(1, torch.empty_like(block)), block)


def test_an_unwritten_or_freed_slot_is_never_read(tmp_path):
    block = _block(0)
    with SpillFile(tmp_path / "kv.spill", block.numel() * 2, 2) as f:
        with pytest.raises(KVCorruptionError, match="holds no complete block"):
            f.read(0, torch.empty_like(block))
        f.write(0, block)
        f.free(0)
        with pytest.raises(KVCorruptionError):
            f.read(0, torch.empty_like(block))


def test_a_deleted_file_is_a_clear_error(tmp_path):
    block = _block(0)
    with SpillFile(tmp_path / "kv.spill", block.numel() * 2, 1) as f:
        f.write(0, block)
        os.unlink(f.path)
        with pytest.raises(TransferError, match="was deleted while in use"):
            f.read(0, torch.empty_like(block))
        with pytest.raises(TransferError, match="was deleted while in use"):
            f.write(0, block)


def test_a_full_disk_at_creation_is_a_capacity_error_and_leaves_no_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(TierCapacityError, match="the disk is full"):
        SpillFile(tmp_path / "kv.spill", 4096, 8)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_is_a_capacity_error_and_the_slot_stays_invalid(tmp_path, monkeypatch):
    block = _block(0)
    with SpillFile(tmp_path / "kv.spill", block.numel() * 2, 2) as f:
        f.write(0, block)
        real = os.pwrite

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(TierCapacityError, match="is full"):
            f.write(0, _block(1))
        monkeypatch.setattr(os, "pwrite", real)
        with pytest.raises(KVCorruptionError):      # the old block is not served as if it were the new one
            f.read(0, torch.empty_like(block))


def test_a_truncated_file_is_a_short_read(tmp_path):
    block = _block(0)
    with SpillFile(tmp_path / "kv.spill", block.numel() * 2, 2) as f:
        f.write(1, block)
        os.truncate(f.path, 4096 + 10)
        with pytest.raises(TransferError, match="short read"):
            f.read(1, torch.empty_like(block))


def test_oversized_blocks_and_bad_slots_are_refused(tmp_path):
    with SpillFile(tmp_path / "kv.spill", 64, 2) as f:
        with pytest.raises(ValueError, match="does not fit"):
            f.write(0, torch.zeros(65, dtype=torch.uint8))
        with pytest.raises(IndexError):
            f.write(2, torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(TransferError, match="closed"):
        f.read(0, torch.zeros(8, dtype=torch.uint8))


@pytest.mark.parametrize("crc", ["crc32c", "zlib"])
def test_a_run_checksum_is_the_crc_of_the_slots_back_to_back(monkeypatch, crc):
    """The fold of per-slot CRCs equals one CRC over the concatenated slots, for either CRC."""
    if crc == "zlib":
        monkeypatch.setattr(crc_module, "_crc", zlib.crc32)
        crc_module._shift_tables.cache_clear()
    try:
        rng = random.Random(7)
        for slot_bytes in (4096, 12288):
            slots = [rng.randbytes(slot_bytes) for _ in range(6)]
            sums = [checksum(s) for s in slots]
            for count in range(1, 7):
                assert run_checksum(sums[:count], slot_bytes) == checksum(b"".join(slots[:count]))
            swapped = sums[1:2] + sums[:1] + sums[2:]     # the same blocks in another order do not pass
            assert run_checksum(swapped, slot_bytes) != checksum(b"".join(slots))
        assert checksum(slots[1], checksum(slots[0])) == checksum(slots[0] + slots[1])
    finally:
        crc_module._shift_tables.cache_clear()


def test_a_run_is_checked_whole_and_a_bad_block_in_it_is_named(tmp_path):
    """A run of 4 slots reads back with one check; a byte flipped in its third block fails the
    run, naming that slot, and a rewrite of that slot alone makes the run good again."""
    blocks = [_block(i) for i in range(4)]
    nbytes = blocks[0].numel() * blocks[0].element_size()        # 512 bytes: 3.5 KiB of padding per slot
    with SpillFile(tmp_path / "kv.spill", nbytes, 6) as f:
        for slot, block in enumerate(blocks, start=1):
            f.write(slot, block)
        memory = aligned_empty(4 * f.stride)
        memory.fill_(0xAB)                      # the padding read back must be the zeros written
        f.read_run(1, 4, memoryview(memory.numpy()))
        for i, block in enumerate(blocks):
            got = memory[i * f.stride:i * f.stride + nbytes].view(block.dtype).view(block.shape)
            assert torch.equal(got, block)
            assert not memory[i * f.stride + nbytes:(i + 1) * f.stride].any()
        with open(f.path, "r+b") as raw:
            raw.seek(3 * f.stride + 7)
            byte = raw.read(1)
            raw.seek(3 * f.stride + 7)
            raw.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(KVCorruptionError, match="slot 3 .* fails its checksum"):
            f.read_run(1, 4, memoryview(memory.numpy()))
        f.write(3, blocks[2])
        f.read_run(1, 4, memoryview(memory.numpy()))
        stale = list(f.sums(1, 4))
        stale[1] ^= 1                           # checked against the sums given, not the file's
        with pytest.raises(KVCorruptionError, match="slot 2 .* fails its checksum"):
            f.read_run(1, 4, memoryview(memory.numpy()), expected=stale)


@pytest.mark.parametrize("limit", [None, 2])
def test_reads_in_flight_caps_the_requests_at_the_disk(tmp_path, monkeypatch, limit):
    """Three threads reading runs at once: with ``reads_in_flight=2`` at most two requests are in
    the disk at a time (two do get there together), with no limit all three are."""
    block = _block(0)
    inside, most, lock = [0], [0], threading.Lock()
    reached = threading.Event()         # set once `limit` (or 3) requests are in at once
    preadv = os.preadv

    def counting(*args):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            if inside[0] == (limit or 3):
                reached.set()
        reached.wait(timeout=10)        # the first ones stay in until the others arrive
        time.sleep(0.05)                # room for one more request, if the cap let it in
        with lock:
            inside[0] -= 1
        return preadv(*args)

    with SpillFile(tmp_path / "kv.spill", block.numel() * 2, 6, reads_in_flight=limit) as f:
        for slot in range(6):
            f.write(slot, block)
        monkeypatch.setattr(os, "preadv", counting)
        buffers = [aligned_empty(2 * f.stride) for _ in range(3)]
        threads = [threading.Thread(target=f.read_run, args=(2 * i, 2, memoryview(buffers[i].numpy())))
                   for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert most[0] == (limit or 3)
