"""The probe's memory figures: free device memory is read after the probe's own tensors are gone
and the caching allocator has handed its cached blocks back; the device overhead (cuBLAS
workspaces, cuFile's buffers) is measured on CUDA and is 0 on CPU, with its provenance."""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref

import pytest
import torch

from tierflow.tiers.io import kvikio_setup
from tierflow.tiers.probe import measure as measure_mod
from tierflow.tiers.probe import probe as probe_mod
from tierflow.tiers.probe.measure import measure_device_overhead, measure_disk
from tierflow.tiers.probe.cache import ProbeCache
from tierflow.tiers.probe.probe import probe
from tests.tiers.probe.test_probe import SMALL_DISK, tiny_costs

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.fixture
def small_disk_probe(monkeypatch):
    monkeypatch.setattr(probe_mod, "measure_disk", functools.partial(measure_disk, **SMALL_DISK))


def test_the_probe_on_cpu_gives_no_device_overhead(tmp_path, small_disk_probe):
    hw, provenance = asyncio.run(probe(CPU, torch.float32, tiny_costs(), tmp_path, cache=ProbeCache(None)))
    assert hw.device_overhead_bytes == 0 and hw.kvikio_mode == ""
    assert provenance["device_overhead"] == {"source": "measured", "bytes": 0, "cublas_workspace_bytes": 0,
                                             "cufile_cache_bytes": 0}
    assert provenance["reader"] == {"source": "measured", "kvikio_mode": ""}
    assert measure_device_overhead(CPU, torch.bfloat16) == 0


class _Bench:
    """A layer benchmark that holds "weights" until it is dropped."""

    def __init__(self) -> None:
        self.weights = torch.ones(16)

    def __call__(self, tokens: int) -> None:
        self.weights.sum()


def test_the_layer_benchmark_is_dropped_before_memory_is_read(tmp_path, small_disk_probe, monkeypatch):
    """Its weights would otherwise still be allocated on the device when free memory is read."""
    bench = _Bench()
    alive = weakref.ref(bench)
    read = []
    real = probe_mod.memory_figures

    def memory_figures(device):
        gc.collect()            # only to rule out a cycle: the probe must not need one
        read.append(alive() is None)
        return real(device)

    monkeypatch.setattr(probe_mod, "memory_figures", memory_figures)
    monkeypatch.setattr(probe_mod, "measure_compute", lambda *args, **kwargs: (1.0, 1.0))
    job = probe(CPU, torch.float32, tiny_costs(), tmp_path, cache=ProbeCache(None), layer=bench)
    del bench
    asyncio.run(job)
    assert read == [True]


# ----------------------------------------------------------------------------- CUDA, through stand-ins
class _Calls:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.reserved = 0

    def record(self, name, result=None):
        def fn(*args, **kwargs):
            self.log.append(name)
            return result
        return fn


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory functions, logging their calls: a reading and what came before it."""
    calls = _Calls()
    monkeypatch.setattr(torch.cuda, "synchronize", calls.record("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", calls.record("release cached blocks"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", calls.record("mem_get_info", (6 * 2**30, 8 * 2**30)))
    monkeypatch.setattr(torch.cuda, "get_device_name", calls.record("get_device_name", "Stand-in GPU"))
    monkeypatch.setattr(probe_mod, "nvml_figures", lambda index: {})
    return calls


def test_free_device_memory_is_read_after_the_cache_is_released(fake_cuda):
    figures = probe_mod.memory_figures(CUDA)
    assert figures["device_memory_bytes"] == 6 * 2**30 and figures["device_total_bytes"] == 8 * 2**30
    log = fake_cuda.log
    assert log.index("synchronize") < log.index("release cached blocks") < log.index("mem_get_info")


def test_the_device_overhead_counts_the_workspaces_and_cufile_buffers_where_gds_is_verified(fake_cuda,
                                                                                            monkeypatch):
    monkeypatch.setattr(probe_mod, "measure_device_overhead", lambda device, dtype: 40 * 2**20)
    monkeypatch.setattr(probe_mod, "kvikio_status", lambda: kvikio_setup.KvikioStatus("gds", "", 128 * 2**20))
    overhead, reader = probe_mod.device_overhead(CUDA, torch.bfloat16)
    assert overhead["bytes"] == 168 * 2**20 and overhead["cufile_cache_bytes"] == 128 * 2**20
    assert reader == {"kvikio_mode": "gds", "why_not_gds": "", "auto": "kvikio"}
    monkeypatch.setattr(probe_mod, "kvikio_status",
                        lambda: kvikio_setup.KvikioStatus("compat", "no nvidia-fs", 0))
    overhead, reader = probe_mod.device_overhead(CUDA, torch.bfloat16)
    assert overhead["bytes"] == overhead["cublas_workspace_bytes"] == 40 * 2**20
    assert reader == {"kvikio_mode": "compat", "why_not_gds": "no nvidia-fs", "auto": "direct"}


def test_measuring_the_workspaces_reads_reserved_memory_with_the_cache_released(fake_cuda, monkeypatch):
    """Reserved memory before and after one matmul per new stream, each reading after the
    allocator's cached blocks were released (what stays reserved is the workspaces)."""
    readings = iter([100 * 2**20, 164 * 2**20])

    def memory_reserved(device=None):
        fake_cuda.log.append("memory_reserved")
        return next(readings)

    class Stream:
        def __init__(self, device=None) -> None:
            fake_cuda.log.append("stream")

    class Using:
        def __init__(self, stream) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "memory_reserved", memory_reserved)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", Using)
    real_ones = torch.ones
    monkeypatch.setattr(measure_mod.torch, "ones", lambda *shape, device=None, dtype=None: real_ones(*shape))
    assert measure_device_overhead(CUDA, torch.float32, streams=2) == 64 * 2**20
    log = [x for x in fake_cuda.log]
    assert log == ["synchronize", "release cached blocks", "memory_reserved", "stream", "stream",
                   "synchronize", "release cached blocks", "memory_reserved"]
