"""The prefix cache on its own: chain keys, the memory LRU, block files across instances,
every kind of bad file rejected (removed, counted, never returned), separate models kept
apart, the directory's size cap, write failures, and threads."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch

from tierflow.tiers.kv import prefix_files as prefixcache
from tierflow.tiers.kv.prefix import PrefixCache
from tierflow.tiers.kv.prefix_files import MAGIC, SUFFIX
from tierflow.tiers.kv.prefix_keys import block_keys, model_fingerprint

BT = 4                                   # tokens per block
SHAPE = (2, 2, 2, BT, 8)                 # layers, k/v, kv_heads, block_tokens, head_dim
FP = hashlib.sha256(b"model a").hexdigest()
OTHER_FP = hashlib.sha256(b"model b").hexdigest()
TOKENS = list(range(100, 100 + 5 * BT))  # five full blocks


def _block(seed: int, dtype: torch.dtype = torch.float32, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _block_bytes(dtype: torch.dtype = torch.float32) -> int:
    return dtype.itemsize * int(torch.Size(SHAPE).numel())


def _disk_cache(directory, fingerprint: str = FP, dtype: torch.dtype = torch.float32, **kw) -> PrefixCache:
    return PrefixCache(fingerprint, SHAPE, dtype, directory=directory, **kw)


def _files(cache: PrefixCache) -> dict[str, Path]:
    return {p.name[:-len(SUFFIX)]: p for p in cache.directory.glob(f"*{SUFFIX}")}


# ---------------------------------------------------------------------------------- keys
def test_block_keys_form_a_chain_over_the_prefix():
    keys = block_keys(FP, TOKENS, BT)
    assert len(keys) == 5 and len(set(keys)) == 5
    assert block_keys(FP, list(TOKENS), BT) == keys                        # deterministic
    assert block_keys(FP, TOKENS[:3 * BT], BT) == keys[:3]                 # a prefix has the prefix's keys
    assert block_keys(FP, TOKENS + [1, 2, 3], BT) == keys                  # a partial trailing block has none
    assert block_keys(FP, TOKENS[:BT - 1], BT) == []
    for j in range(5):                                                     # a change in block j ...
        changed = list(TOKENS)
        changed[j * BT + 1] += 1
        other = block_keys(FP, changed, BT)
        assert other[:j] == keys[:j]                                       # ... keeps the keys before it
        assert all(a != b for a, b in zip(other[j:], keys[j:]))            # ... and changes it and every later one
    same_block_elsewhere = TOKENS[BT:2 * BT] + TOKENS[BT:2 * BT]           # identical tokens, different prefix
    k = block_keys(FP, same_block_elsewhere, BT)
    assert k[0] != k[1]
    assert keys[1] not in k
    assert set(block_keys(OTHER_FP, TOKENS, BT)).isdisjoint(keys)          # the fingerprint changes every key
    cache = PrefixCache(FP, SHAPE, torch.float32)
    assert cache.keys(TOKENS) == keys


def test_model_fingerprint_tells_apart_config_dtype_and_weights_changed_in_place(tmp_path):
    weights = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(3 * 2**20))
    weights.write_bytes(data)
    config = {"hidden_size": 64, "num_hidden_layers": 3}
    base = model_fingerprint(config, [weights], torch.float32)
    assert model_fingerprint(dict(config), [weights], torch.float32) == base
    assert model_fingerprint({**config, "hidden_size": 128}, [weights], torch.float32) != base
    assert model_fingerprint(config, [weights], torch.bfloat16) != base
    data[100] ^= 0xFF                                                      # same size, first MiB changed
    weights.write_bytes(data)
    assert model_fingerprint(config, [weights], torch.float32) != base


# -------------------------------------------------------------------------------- memory
def test_memory_lru_is_bounded_and_keeps_recently_loaded_blocks():
    cache = PrefixCache(FP, SHAPE, torch.float32, memory_bytes=3 * _block_bytes())
    keys = cache.keys(TOKENS)
    blocks = [_block(i) for i in range(5)]
    for key, block in zip(keys[:3], blocks):
        cache.store(key, block)
    assert cache.statistics().memory_blocks == 3
    assert cache.load(keys[:1])[0] is blocks[0]                            # block 0 is now the most recent
    cache.store(keys[3], blocks[3])                                        # evicts block 1, the oldest
    assert [cache.contains(k) for k in keys[:4]] == [True, False, True, True]
    assert cache.match(keys) == 1
    assert cache.load(keys[1:]) == []                                      # a miss stops the load at once
    cache.store(keys[4], blocks[4])                                        # evicts block 2
    assert [cache.contains(k) for k in keys] == [True, False, False, True, True]
    stats = cache.statistics()
    assert stats.memory_blocks == 3 and stats.memory_bytes == 3 * _block_bytes() == cache.memory_budget
    assert stats.stored_blocks == 5 and stats.hit_blocks == 1 and stats.hit_tokens == BT
    got = cache.load([keys[0]])
    assert torch.equal(got[0], blocks[0])


def test_blocks_larger_than_the_memory_budget_are_not_kept():
    cache = PrefixCache(FP, SHAPE, torch.float32, memory_bytes=_block_bytes() - 1)
    key = cache.keys(TOKENS)[0]
    cache.store(key, _block(0))
    assert not cache.contains(key) and cache.load([key]) == []
    assert cache.statistics().memory_bytes == 0


def test_storing_a_wrong_shape_or_dtype_raises():
    cache = PrefixCache(FP, SHAPE, torch.float32, memory_bytes=2**20)
    key = cache.keys(TOKENS)[0]
    with pytest.raises(ValueError, match="prefix block must be"):
        cache.store(key, torch.zeros(2, 2, 2, BT + 1, 8))
    with pytest.raises(ValueError, match="prefix block must be"):
        cache.store(key, torch.zeros(SHAPE, dtype=torch.bfloat16))
    assert not cache.contains(key) and cache.statistics().stored_blocks == 0


# ---------------------------------------------------------------------------------- disk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_survive_across_instances_on_one_directory(tmp_path, dtype):
    writer = _disk_cache(tmp_path, dtype=dtype)
    keys = writer.keys(TOKENS)
    blocks = [_block(i, dtype) for i in range(5)]
    for key, block in zip(keys, blocks):
        writer.store(key, block)
    writer.flush()
    writer.close()
    assert writer.statistics().disk_blocks_written == 5
    assert not any(p.name.endswith(".tmp") for p in writer.directory.iterdir())

    reader = _disk_cache(tmp_path, dtype=dtype)                            # a later process: nothing in memory
    assert reader.statistics().disk_bytes == sum(p.stat().st_size for p in _files(reader).values())
    assert reader.match(keys) == 5
    loaded = reader.load(keys)
    assert len(loaded) == 5
    for got, want in zip(loaded, blocks):
        assert got.dtype == dtype and tuple(got.shape) == SHAPE
        assert torch.equal(got, want)
    assert reader.statistics().rejected_files == 0 and reader.statistics().hit_blocks == 5
    reader.close()


def _foreign_header(path: Path, cache: PrefixCache, key: str, variant: str) -> None:
    """Overwrite ``path`` with a well-formed block file of another shape or dtype."""
    shape, dtype = ((2, 2, 2, BT, 4), torch.float32) if variant == "shape" else (SHAPE, torch.bfloat16)
    other = PrefixCache(cache.fingerprint, shape, dtype, directory=path.parent.parent)
    assert other.directory == cache.directory
    path.unlink()
    other.store(key, _block(9, dtype, shape))
    other.flush()
    other.close()
    assert path.exists()


@pytest.mark.parametrize("fault", ["flipped payload byte", "truncated", "foreign shape", "foreign dtype",
                                   "renamed", "not a block file"])
def test_a_bad_file_is_rejected_removed_counted_and_never_returned(tmp_path, fault):
    writer = _disk_cache(tmp_path)
    keys = writer.keys(TOKENS)[:3]
    blocks = [_block(i) for i in range(3)]
    for key, block in zip(keys, blocks):
        writer.store(key, block)
    writer.flush()
    writer.close()
    files = _files(writer)
    bad = files[keys[1]]
    if fault == "flipped payload byte":
        data = bytearray(bad.read_bytes())
        data[-5] ^= 0x01
        bad.write_bytes(data)
    elif fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:-7])
    elif fault in ("foreign shape", "foreign dtype"):
        _foreign_header(bad, writer, keys[1], fault.split()[1])
    elif fault == "renamed":                                               # block 2's file under block 1's name
        os.replace(files[keys[2]], bad)
    else:
        bad.write_bytes(b"\0" * 64)

    reader = _disk_cache(tmp_path)
    assert reader.match(keys) == (3 if fault != "renamed" else 2)          # the names alone look fine
    loaded = reader.load(keys)
    assert len(loaded) == 1 and torch.equal(loaded[0], blocks[0])          # stops at the bad file
    assert not bad.exists()
    stats = reader.statistics()
    assert stats.rejected_files == 1 and stats.hit_blocks == 1
    if fault != "renamed":
        assert files[keys[2]].exists()                                     # the load stopped there
    assert reader.statistics().disk_bytes == sum(p.stat().st_size for p in _files(reader).values())
    assert reader.match(keys) == 1 and len(reader.load(keys)) == 1         # now a plain miss
    assert reader.statistics().rejected_files == 1
    assert reader.load(keys[1:]) == []
    reader.close()


def test_a_file_with_a_header_naming_another_key_or_model_is_rejected(tmp_path):
    """A hand-made file, right in every byte but its header's key (or model)."""
    cache = _disk_cache(tmp_path)
    key, other_key = cache.keys(TOKENS)[:2]
    block = _block(0)
    payload = block.view(torch.uint8).numpy().tobytes()
    for meta_patch in ({"key": other_key}, {"header": {**json.loads(cache._header), "model": OTHER_FP}}):
        meta = {"header": json.loads(cache._header), "key": key, "crc32": zlib.crc32(payload),
                "nbytes": len(payload), **meta_patch}
        header = json.dumps(meta, sort_keys=True).encode()
        (cache.directory / f"{key}{SUFFIX}").write_bytes(MAGIC + struct.pack("<I", len(header)) + header + payload)
        assert cache.load([key]) == []
        assert not (cache.directory / f"{key}{SUFFIX}").exists()
    assert cache.statistics().rejected_files == 2
    meta = {"header": json.loads(cache._header), "key": key, "crc32": zlib.crc32(payload), "nbytes": len(payload)}
    header = json.dumps(meta, sort_keys=True).encode()                     # the same file, right: accepted
    (cache.directory / f"{key}{SUFFIX}").write_bytes(MAGIC + struct.pack("<I", len(header)) + header + payload)
    (got,) = cache.load([key])
    assert torch.equal(got, block)
    cache.close()


def test_another_model_uses_its_own_subdirectory_and_never_sees_these_blocks(tmp_path):
    a = _disk_cache(tmp_path, memory_bytes=2**20)
    b = _disk_cache(tmp_path, fingerprint=OTHER_FP, memory_bytes=2**20)
    assert a.directory != b.directory and a.directory.parent == b.directory.parent == tmp_path
    keys = a.keys(TOKENS)
    for i, key in enumerate(keys):
        a.store(key, _block(i))
    a.flush()
    assert len(_files(a)) == 5 and _files(b) == {}
    assert b.match(keys) == 0 and b.load(keys) == []                       # not even under a's keys
    assert b.match(b.keys(TOKENS)) == 0 and b.load(b.keys(TOKENS)) == []
    b2 = _disk_cache(tmp_path, fingerprint=OTHER_FP)                       # a later process of model b
    assert b2.statistics().disk_bytes == 0 and b2.load(keys) == [] and b2.load(b2.keys(TOKENS)) == []
    assert b2.statistics().rejected_files == 0
    for c in (a, b, b2):
        c.close()


def test_the_directory_cap_removes_least_recently_used_files(tmp_path):
    filler = _disk_cache(tmp_path)
    keys = filler.keys(TOKENS)
    blocks = [_block(i) for i in range(5)]
    for key, block in zip(keys[:3], blocks):
        filler.store(key, block)
    filler.flush()
    filler.close()
    files = _files(filler)
    sizes = [p.stat().st_size for p in files.values()]
    cap = 3 * max(sizes) + min(sizes) // 2                                 # room for three files, not four
    for key, mtime in zip(keys[:3], (1_000_000, 3_000_000, 2_000_000)):
        os.utime(files[key], (mtime, mtime))

    def on_disk() -> set[str]:
        return set(_files(filler))

    def total() -> int:
        return sum(p.stat().st_size for p in filler.directory.glob(f"*{SUFFIX}"))

    cache = _disk_cache(tmp_path, disk_bytes=cap)
    cache.store(keys[3], blocks[3])
    cache.flush()
    assert on_disk() == {keys[1], keys[2], keys[3]}                        # block 0 was the oldest
    assert total() <= cap and cache.statistics().disk_bytes == total()

    for key, mtime in zip((keys[1], keys[2], keys[3]), (1_000_000, 2_000_000, 3_000_000)):
        os.utime(filler.directory / f"{key}{SUFFIX}", (mtime, mtime))
    (got,) = cache.load([keys[1]])                                         # a load makes block 1 recent
    assert torch.equal(got, blocks[1])
    cache.store(keys[4], blocks[4])
    cache.flush()
    assert on_disk() == {keys[1], keys[3], keys[4]}                        # so block 2 went
    assert total() <= cap and cache.statistics().disk_bytes == total()
    assert cache.statistics().disk_blocks_written == 2
    loaded = _disk_cache(tmp_path).load([keys[1]])
    assert len(loaded) == 1 and torch.equal(loaded[0], blocks[1])
    cache.close()


@pytest.mark.parametrize("memory_bytes", [0, 2**20])
def test_a_failed_write_is_counted_and_leaves_no_file(tmp_path, monkeypatch, memory_bytes):
    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = _disk_cache(tmp_path, memory_bytes=memory_bytes)
    keys = cache.keys(TOKENS)
    monkeypatch.setattr(prefixcache.os, "replace", no_space)
    cache.store(keys[0], _block(0))                                        # raises nothing
    cache.flush()
    monkeypatch.undo()
    stats = cache.statistics()
    assert stats.write_errors == 1 and stats.disk_blocks_written == 0 and stats.disk_bytes == 0
    assert os.listdir(cache.directory) == []                               # no block, no temporary file
    assert len(cache.load(keys[:1])) == (1 if memory_bytes else 0)         # memory still has it, if any
    cache.store(keys[1], _block(1))                                        # the next write works again
    cache.flush()
    assert set(_files(cache)) == {keys[1]} and cache.statistics().write_errors == 1
    assert cache.statistics().disk_blocks_written == 1
    cache.close()


def test_concurrent_stores_and_loads_from_threads(tmp_path):
    cache = _disk_cache(tmp_path, memory_bytes=4 * _block_bytes())
    tokens = list(range(16 * BT))
    keys = cache.keys(tokens)
    blocks = {key: _block(i) for i, key in enumerate(keys)}
    errors: list[BaseException] = []
    wrong: list[str] = []
    start = threading.Barrier(6)

    def work(offset: int) -> None:
        try:
            start.wait()
            for round_ in range(3):
                for i in range(len(keys)):
                    key = keys[(i + offset) % len(keys)]
                    cache.store(key, blocks[key].clone())
                    for got, want in zip(cache.load(keys), keys):
                        if not torch.equal(got, blocks[want]):
                            wrong.append(want)
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 3,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.flush()
    assert errors == [] and wrong == []
    stats = cache.statistics()
    assert stats.memory_bytes <= 4 * _block_bytes() and stats.write_errors == 0 and stats.rejected_files == 0
    assert set(_files(cache)) == set(keys)
    # Each block is kept, counted and written once, however many threads stored it at once.
    assert stats.stored_blocks == stats.disk_blocks_written == len(keys)
    assert stats.disk_bytes == sum(p.stat().st_size for p in _files(cache).values())
    assert not any(p.name.endswith(".tmp") for p in cache.directory.iterdir())
    cache.close()
    fresh = _disk_cache(tmp_path)
    loaded = fresh.load(keys)
    assert len(loaded) == len(keys) and all(torch.equal(g, blocks[k]) for g, k in zip(loaded, keys))
    assert fresh.statistics().rejected_files == 0
    fresh.close()
