"""The probe: measure the machine the planner plans for.

- memory: free and total device memory (CUDA), available RAM and how much can be pinned. Free
  device memory is read last, after the probe's own tensors are gone and the caching
  allocator has handed its cached blocks back (synchronize, then empty its cache): otherwise
  the blocks the PCIe and compute measurements left cached would read as memory in use;
- device overhead (CUDA): what the runtime holds beside the plan's buffers, for the engine's
  life — the cuBLAS workspaces of the streams that multiply (measured:
  ``measure.measure_device_overhead``) and, where GPUDirect Storage is verified, cuFile's GPU
  bounce buffers (``kvikio_setup.kvikio_status``), which also gives the profile's
  ``kvikio_mode`` ("gds", "compat" or "absent": what ``reader="auto"`` goes by);
- disk: O_DIRECT read bandwidth of a directory's filesystem, through the engine's own
  ``DiskReader`` (same block size, same queue depth, the weight stream's chunked access),
  on a file the probe writes with O_DIRECT and removes — the page cache never answers —
  into the engine's own staging buffers, whose page layout goes with the figure
  (``provenance["disk"]["buffers"]``: huge-page share and physical pieces per read block);
- PCIe (CUDA): host→device and device→host copies from pinned memory;
- compute: the model's own layer matmuls at one token (decode) and at a prefill chunk.

Memory is measured on every call (it changes); disk, PCIe and compute figures are cached
per machine, filesystem and shape in ``<cache>/probe.json`` (``tierflow probe --fresh``
measures again; a cache that cannot be written is warned about once, and the probe goes on
without it: ``cache.ProbeCache``). Each measurement takes about a second at most.

The directory measured must be a directory, or a new one in an existing directory (made then):
a file, a path under a file or a whole missing tree is a ``ConfigError``. Where it takes no
probe file (a read-only checkpoint), the disk is measured in the cache's directory instead, else
in the system's temporary directory; where none takes one, a ``ConfigError`` says to set
``TIERFLOW_CACHE_DIR`` or to give a profile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from tierflow.errors import ConfigError, TierflowError
from tierflow.tiers.checkpoint.index import ALIGN_BYTES
from tierflow.tiers.plan.costmodel import ModelCosts
from tierflow.tiers.plan.planner import largest_read
from tierflow.tiers.plan.reads import io_block_for
from tierflow.tiers.io.kvikio_setup import kvikio_status
from tierflow.tiers.probe.cache import ProbeCache
from tierflow.tiers.probe.measure import (CHUNK_BYTES, MATMUL_STREAMS, measure_compute, measure_device_overhead,
                                          measure_disk, measure_pcie, release_cached_blocks)
from tierflow.tiers.probe.nvml import device_figures
from tierflow.tiers.plan.hardware import HardwareProfile
from tierflow.tiers.io.cachedir import directory_problem

log = logging.getLogger(__name__)


def machine_key() -> str:
    """What identifies this machine's hardware for the cache."""
    parts = [platform.node(), platform.machine(), platform.processor(), str(psutil.cpu_count()),
             str(psutil.virtual_memory().total), torch.__version__]
    if torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- memory
def nvml_figures(index: int) -> dict[str, Any]:
    """NVML's PCIe link and clocks of GPU ``index`` (empty without nvidia-ml-py or a driver)."""
    figures = device_figures(index)
    if figures is None:
        return {}
    return {"pcie_link": figures.pcie_link, "pcie_link_gbps": figures.pcie_max_gbps,
            "sm_clock_mhz": figures.sm_clock_mhz, "max_sm_clock_mhz": figures.max_sm_clock_mhz}


def memory_figures(device: torch.device) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    out: dict[str, Any] = {"host_memory_bytes": int(vm.available), "host_total_bytes": int(vm.total)}
    if device.type == "cuda":
        release_cached_blocks(device)
        free, total = torch.cuda.mem_get_info(device)
        out |= {"device_memory_bytes": int(free), "device_total_bytes": int(total),
                "device_name": torch.cuda.get_device_name(device), **nvml_figures(device.index or 0),
                # cudaHostAlloc is not bound by RLIMIT_MEMLOCK; pinning more than the RAM that is
                # available starves the rest of the system, so that is the limit.
                "pinned_memory_bytes": int(vm.available)}
    else:
        out |= {"device_memory_bytes": int(vm.available), "device_total_bytes": int(vm.total),
                "device_name": _cpu_name()}
    return out


def device_overhead(device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the runtime's device memory beside the plan's buffers, ``bytes``, with its parts; how
    streamed weights would reach the device). Measured on every call, as memory is; on CPU
    there is neither overhead nor kvikio."""
    if device.type != "cuda":
        return {"bytes": 0, "cublas_workspace_bytes": 0, "cufile_cache_bytes": 0}, {"kvikio_mode": ""}
    workspaces = measure_device_overhead(device, dtype)
    status = kvikio_status()
    overhead = {"bytes": workspaces + status.cufile_cache_bytes, "cublas_workspace_bytes": workspaces,
                "matmul_streams": MATMUL_STREAMS, "cufile_cache_bytes": status.cufile_cache_bytes}
    reader = {"kvikio_mode": status.mode, "why_not_gds": status.reason,
              "auto": "kvikio" if status.mode == "gds" else "direct"}
    return overhead, reader


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({psutil.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({psutil.cpu_count()} CPUs)"


# ----------------------------------------------------------------------------- disk
def _measured_directory(path: Path, what: str) -> Path:
    """``path``, whose filesystem the probe measures: a directory (read-only is fine: the disk
    is then measured elsewhere), or a new one in an existing directory, made here. A file, a
    path under a file or a whole missing tree is a ConfigError (a mistyped path is never made)."""
    if path.is_dir():
        return path
    problem = directory_problem(path)
    if problem is None:
        try:
            path.mkdir()
            return path
        except OSError as exc:
            problem = f"cannot be created ({exc.strerror})"
    raise ConfigError(f"the probe measures the disk of {what}, {path}, which {problem}; give it an existing "
                      "directory on the disk to measure (or a new one in an existing directory)")


def _fallback_dirs(cache: ProbeCache) -> list[Path]:
    """Where the disk is measured when the model's directory takes no probe file: the cache's
    directory, then the system's temporary directory."""
    found = [cache.path.parent] if cache.path is not None else []
    temporary = Path(tempfile.gettempdir())
    return found + [temporary] if temporary not in found else found


def _filesystem_key(directory: Path) -> str:
    st = os.stat(directory)
    return f"{st.st_dev}"


async def probe(device: torch.device, dtype: torch.dtype, model: ModelCosts, model_dir: str | Path,
                spill_dir: str | Path | None = None, *, io_threads: int = 4, block_bytes: int | None = None,
                cache: ProbeCache | None = None, fresh: bool = False, layer: Callable[[int], None] | None = None,
                progress: Callable[[str], None] | None = None) -> tuple[HardwareProfile, dict[str, Any]]:
    """Measure (or take from the cache) everything a ``HardwareProfile`` holds. Returns the
    profile and a provenance record: what was measured when, and what came from the cache.
    ``layer(tokens)`` runs the model's real layer forward for the compute figures."""
    cache = cache or ProbeCache(None)
    say = progress or (lambda text: log.info("%s", text))
    machine = machine_key()
    provenance: dict[str, Any] = {"machine": machine, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    async def cached(key: str, what: str, measure: Callable[[], Any]) -> dict[str, Any]:
        full = f"{machine}/{key}"
        hit = None if fresh else cache.get(full)
        if hit is None:
            say(f"measuring {what}")
            started = time.perf_counter()
            hit = await measure()
            hit["seconds"] = round(time.perf_counter() - started, 3)
            cache.put(full, hit)
            provenance[what] = {"source": "measured", **hit}
        else:
            provenance[what] = {"source": "cache", **hit}
        return hit

    # Read the way the engine will: chunks the size of the model's layers, two in flight (the
    # shallowest prefetch), in the request size the plan will use.
    largest = largest_read(model) or CHUNK_BYTES
    chunk = min(CHUNK_BYTES, -(-largest // ALIGN_BYTES) * ALIGN_BYTES)
    block = block_bytes or io_block_for(largest, io_threads)
    pattern = f"{io_threads}x{block}/{chunk}x2"

    async def disk_of(directory: Path) -> dict[str, Any]:
        figures = await measure_disk(directory, io_threads=io_threads, block_bytes=block, in_flight=2,
                                     chunk_bytes=chunk)
        if figures.io_mode != "direct":
            log.warning("%s refuses O_DIRECT: the disk figures are page-cache figures", directory)
        return {"read_gbps": figures.read_gbps, "write_gbps": figures.write_gbps, "io_mode": figures.io_mode,
                "directory": str(directory), "buffers": figures.buffers}

    async def checkpoint_disk() -> dict[str, Any]:
        try:
            return await disk_of(model_dir)
        except OSError as exc:   # no probe file can be written beside the checkpoint (read-only, full)
            tried = [f"{model_dir} ({exc.strerror})"]
        for elsewhere in _fallback_dirs(cache):
            try:
                elsewhere.mkdir(parents=True, exist_ok=True)
                figures = await disk_of(elsewhere)
            except OSError as exc:
                tried.append(f"{elsewhere} ({exc.strerror})")
                continue
            log.warning("cannot measure the disk in %s; measured %s instead", tried[0], elsewhere)
            return {**figures, "instead_of": str(model_dir)}
        raise ConfigError(f"the probe cannot measure the disk: it reads a probe file it writes (and removes), and "
                          f"none can be written in {', nor in '.join(tried)}; set TIERFLOW_CACHE_DIR to a writable "
                          "directory, or give the engine a profile that holds the hardware figures "
                          "(EngineConfig.profile; `tierflow probe --out` writes one)", settings=("profile",))

    async def spill_disk() -> dict[str, Any]:
        try:
            return await disk_of(spill)
        except OSError as exc:
            raise ConfigError(f"the probe cannot measure the KV spill directory {spill}: no file can be written in "
                              f"it ({exc.strerror}); give a directory this process can write (EngineConfig."
                              "kv_cache_dir)", settings=("kv_cache_dir",)) from exc

    model_dir = _measured_directory(Path(model_dir), "the model's directory")
    spill = _measured_directory(Path(spill_dir), "the KV spill directory") if spill_dir is not None else model_dir
    disk = await cached(f"disk/{_filesystem_key(model_dir)}/{pattern}", "disk", checkpoint_disk)
    kv_disk = disk if _filesystem_key(spill) == _filesystem_key(model_dir) else await cached(
        f"disk/{_filesystem_key(spill)}/{pattern}", "kv_disk", spill_disk)
    shape = f"{model.hidden_size}x{model.intermediate_size}x{model.num_heads}x{model.head_dim}"

    async def compute() -> dict[str, Any]:
        decode, prefill = await asyncio.to_thread(measure_compute, model, device, dtype, layer=layer)
        return {"decode_gbps": decode, "prefill_tflops": prefill}

    kind = "layer" if layer is not None else "matmul"
    flops = await cached(f"compute/{device.type}/{dtype}/{shape}/{kind}/{torch.get_num_threads()}", "compute", compute)
    layer = None    # the benchmark's weights (``compute`` shares this binding) are freed before memory is read
    h2d = d2h = None
    if device.type == "cuda":
        async def pcie() -> dict[str, Any]:
            up, down = await asyncio.to_thread(measure_pcie, device)
            return {"h2d_gbps": up, "d2h_gbps": down}
        link = await cached(f"pcie/{torch.cuda.get_device_name(device)}", "pcie", pcie)
        h2d, d2h = link["h2d_gbps"], link["d2h_gbps"]
    overhead, reader = await asyncio.to_thread(device_overhead, device, dtype)
    provenance["device_overhead"] = {"source": "measured", **overhead}
    provenance["reader"] = {"source": "measured", **reader}
    mem = memory_figures(device)
    provenance["memory"] = {"source": "measured", **mem}
    hw = HardwareProfile(
        device=device.type, device_memory_bytes=mem["device_memory_bytes"], host_memory_bytes=mem["host_memory_bytes"],
        disk_read_gbps=disk["read_gbps"], decode_gbps=flops["decode_gbps"], prefill_tflops=flops["prefill_tflops"],
        h2d_gbps=h2d, d2h_gbps=d2h, device_name=mem["device_name"], device_total_bytes=mem["device_total_bytes"],
        pcie_link=mem.get("pcie_link", ""), pcie_link_gbps=mem.get("pcie_link_gbps"),
        pinned_memory_bytes=mem.get("pinned_memory_bytes"), kv_disk_read_gbps=kv_disk["read_gbps"], kv_disk_write_gbps=kv_disk["write_gbps"],
        disk_free_bytes=psutil.disk_usage(str(spill)).free, compute_dtype=str(dtype).removeprefix("torch."),
        device_overhead_bytes=overhead["bytes"], kvikio_mode=reader["kvikio_mode"])
    return hw, provenance


def probe_sync(*args: Any, **kwargs: Any) -> tuple[HardwareProfile, dict[str, Any]]:
    """``probe`` from synchronous code (not from inside a running event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(probe(*args, **kwargs))
    raise TierflowError("probe_sync() was called inside a running event loop; await probe() instead")
