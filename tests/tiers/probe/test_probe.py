"""The probe: disk, compute and memory figures of this machine, and the cache that keeps
them between runs. Files are kept small (a few MiB, a fraction of a second per measurement)."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os

import pytest
import torch

from tierflow.adapters import adapter_for
from tierflow.errors import TierflowError
from tierflow.tiers.probe import measure as measure_mod
from tierflow.tiers.probe import probe as probe_mod
from tierflow.tiers.plan.costmodel import costs_from_spec
from tierflow.tiers.probe.cache import ProbeCache
from tierflow.tiers.probe.probe import measure_compute, measure_disk, probe, probe_sync
from tierflow.tiers.io.reader import DiskReader

MiB = 2**20
SMALL_DISK = dict(file_bytes=8 * MiB, seconds=0.2)
CPU = torch.device("cpu")

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
               "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": False}


def tiny_costs(dtype="float32"):
    adapter = adapter_for(TINY_CONFIG)
    return costs_from_spec(adapter.spec_from_config(TINY_CONFIG), adapter, dtype, name="tiny")


def leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".tierflow-probe")]


@pytest.fixture
def small_disk_probe(monkeypatch):
    """probe() measures the disk with a small file, briefly."""
    monkeypatch.setattr(probe_mod, "measure_disk", functools.partial(measure_disk, **SMALL_DISK))


# ----------------------------------------------------------------------------- disk
def test_measure_disk_reads_and_cleans_up(tmp_path):
    figures = asyncio.run(measure_disk(tmp_path, **SMALL_DISK))
    assert figures.read_gbps > 0 and figures.write_gbps > 0
    assert figures.io_mode in ("direct", "buffered")
    assert figures.free_bytes > 0
    assert leftovers(tmp_path) == []


def test_measure_disk_removes_its_file_when_a_read_fails(tmp_path, monkeypatch):
    async def failing_read(self, layout, buffer):
        raise OSError(errno.EIO, "injected read failure")

    monkeypatch.setattr(DiskReader, "read", failing_read)
    with pytest.raises(OSError, match="injected"):
        asyncio.run(measure_disk(tmp_path, **SMALL_DISK))
    assert leftovers(tmp_path) == []


def test_measure_disk_on_a_filesystem_that_refuses_o_direct(tmp_path, monkeypatch):
    """Such a filesystem (tmpfs before Linux 6.6, some FUSE filesystems) creates the file and
    then fails ``open(O_CREAT | O_DIRECT)`` with EINVAL. The probe falls back to buffered I/O
    and says so in ``io_mode``; it does not fail."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("this platform has no O_DIRECT")
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & os.O_DIRECT:
            if flags & os.O_CREAT:
                os.close(real_open(path, flags & ~os.O_DIRECT, mode))
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    figures = asyncio.run(measure_disk(tmp_path, **SMALL_DISK))
    assert figures.io_mode == "buffered" and figures.read_gbps > 0
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- compute
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_compute_gives_positive_rates(dtype):
    decode_gbps, prefill_tflops = measure_compute(tiny_costs(), CPU, dtype, prefill_tokens=32, seconds=0.1)
    assert decode_gbps > 0 and prefill_tflops > 0


# ----------------------------------------------------------------------------- probe() and its cache
def sources(provenance):
    return {what: provenance[what]["source"] for what in ("disk", "compute")}


def run_probe(model_dir, cache, **kwargs):
    return asyncio.run(probe(CPU, torch.float32, tiny_costs(), model_dir, cache=cache, **kwargs))


def test_probe_measures_then_takes_figures_from_the_cache(tmp_path, small_disk_probe):
    model_dir, cache = tmp_path / "model", ProbeCache(tmp_path / "cache" / "probe.json")
    said = []
    hw, first = run_probe(model_dir, cache, progress=said.append)
    assert sources(first) == {"disk": "measured", "compute": "measured"}
    assert any("disk" in text for text in said) and any("compute" in text for text in said)
    assert first["memory"]["source"] == "measured"

    assert hw.device == "cpu" and hw.h2d_gbps is None and hw.d2h_gbps is None
    assert hw.device_memory_bytes > 0 and hw.host_memory_bytes > 0 and hw.disk_free_bytes > 0
    assert hw.disk_read_gbps > 0 and hw.decode_gbps > 0 and hw.prefill_tflops > 0
    assert hw.kv_disk_read_gbps == hw.disk_read_gbps     # the spill directory is the model's
    assert hw.compute_dtype == "float32"
    assert leftovers(model_dir) == []

    doc = json.loads(cache.path.read_text())
    assert any(key.startswith(f"{first['machine']}/disk/") for key in doc["entries"])
    assert any(key.startswith(f"{first['machine']}/compute/") for key in doc["entries"])

    again, second = run_probe(model_dir, cache)
    assert sources(second) == {"disk": "cache", "compute": "cache"}
    assert (again.disk_read_gbps, again.decode_gbps, again.prefill_tflops) == \
        (hw.disk_read_gbps, hw.decode_gbps, hw.prefill_tflops)

    _, third = run_probe(model_dir, cache, fresh=True)
    assert sources(third) == {"disk": "measured", "compute": "measured"}
    json.loads(cache.path.read_text())


def test_probe_without_a_cache_file_measures_every_time(tmp_path, small_disk_probe):
    _, first = run_probe(tmp_path, None)
    _, second = run_probe(tmp_path, ProbeCache(None))
    assert sources(first) == sources(second) == {"disk": "measured", "compute": "measured"}


def cache_version(directory):
    """The version the cache writes today."""
    cache = ProbeCache(directory / "fresh-cache.json")
    cache.put("key", {})
    return json.loads(cache.path.read_text())["version"]


# VERSION stands for the version the cache writes today.
CORRUPT = {
    "not JSON": b"{ this is not json",
    "binary garbage": b"\xff\xfe\x00\x81garbage",
    "empty": b"",
    "a list": b"[1, 2]",
    "null": b"null",
    "no entries": b'{"version": VERSION}',
    "entries not an object": b'{"version": VERSION, "entries": []}',
    "another version": b'{"version": -1, "entries": {"x": 1}}',
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, small_disk_probe, case):
    path = tmp_path / "probe.json"
    path.write_bytes(CORRUPT[case].replace(b"VERSION", str(cache_version(tmp_path)).encode()))
    hw, provenance = run_probe(tmp_path / "model", ProbeCache(path))
    assert sources(provenance) == {"disk": "measured", "compute": "measured"}
    assert hw.disk_read_gbps > 0
    assert len(json.loads(path.read_text())["entries"]) == 2
    _, again = run_probe(tmp_path / "model", ProbeCache(path))
    assert sources(again) == {"disk": "cache", "compute": "cache"}


def test_cache_entries_for_other_keys_are_kept(tmp_path):
    cache = ProbeCache(tmp_path / "sub" / "probe.json")
    assert cache.get("a") is None
    cache.put("a", {"x": 1.0})
    cache.put("b", {"x": 2.0})
    assert cache.get("a") == {"x": 1.0} and cache.get("b") == {"x": 2.0}
    assert [p.name for p in cache.path.parent.iterdir()] == ["probe.json"]   # no temporary file left


# ----------------------------------------------------------------------------- probe_sync
def test_probe_sync_refuses_to_run_inside_an_event_loop(tmp_path):
    async def main():
        probe_sync(CPU, torch.float32, tiny_costs(), tmp_path, cache=ProbeCache(None))

    with pytest.raises(TierflowError, match="await probe"):
        asyncio.run(main())
    assert leftovers(tmp_path) == []


def test_probe_sync_outside_an_event_loop(tmp_path, small_disk_probe):
    hw, provenance = probe_sync(CPU, torch.float32, tiny_costs(), tmp_path, cache=ProbeCache(None))
    assert hw.device == "cpu" and sources(provenance)["disk"] == "measured"


def test_a_checkpoint_directory_that_takes_no_probe_file_is_measured_elsewhere(tmp_path, small_disk_probe,
                                                                                monkeypatch):
    """A read-only (or full) model directory must not stop the engine from opening: the disk is
    measured in the cache's directory instead, and the provenance says so."""
    model_dir, cache = tmp_path / "model", ProbeCache(tmp_path / "cache" / "probe.json")
    model_dir.mkdir()
    real = measure_mod._write_probe_file

    def refuse_in_model_dir(path, nbytes):
        if path.parent == model_dir:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, nbytes)

    monkeypatch.setattr(measure_mod, "_write_probe_file", refuse_in_model_dir)
    hw, provenance = run_probe(model_dir, cache)
    assert hw.disk_read_gbps > 0
    assert provenance["disk"]["instead_of"] == str(model_dir)
    assert provenance["disk"]["directory"] == str(tmp_path / "cache")
    assert leftovers(model_dir) == [] and leftovers(tmp_path / "cache") == []
