"""Measurements the probe makes: O_DIRECT disk reads through the engine's own reader, PCIe
copies from pinned memory, and the model's layer matmuls (decode and prefill sizes).

Each takes about a second at most. The disk is measured on a file the probe writes with
O_DIRECT and removes, so the page cache never answers; ``read_pass`` reads units through a
``DiskReader`` as the weight stream does (same block size, same queue depth).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from tierflow.tiers.checkpoint.index import ALIGN_BYTES, ByteRange, UnitLayout
from tierflow.tiers.io.reader import DiskReader, aligned_empty
from tierflow.tiers.io.staging import BufferLayout, buffer_layout
from tierflow.tiers.plan.costmodel import ModelCosts

PROBE_FILE_BYTES = 256 * 2**20
CHUNK_BYTES = 64 * 2**20

@dataclass(frozen=True, slots=True)
class DiskFigures:
    read_gbps: float
    write_gbps: float
    io_mode: str             # "direct" | "buffered" (the filesystem refused O_DIRECT: page cache figures)
    free_bytes: int
    # What backed the read buffers (``tiers.io.staging.BufferLayout`` of the ring: huge-page
    # share, physically contiguous pieces per read block), e.g. "huge pages: 100% THP, 4.0
    # pieces per 8 MiB": a figure read into scattered 4 KiB pages is lower than the disk's.
    buffers: dict[str, object] = field(default_factory=dict)


def _write_probe_file(path: Path, nbytes: int) -> float:
    """Write ``nbytes`` of incompressible data with O_DIRECT (so none of it sits in the page
    cache afterwards); returns the write bandwidth in GB/s."""
    block = aligned_empty(min(nbytes, 8 * 2**20))
    block.copy_(torch.randint(0, 256, (block.numel(),), dtype=torch.uint8))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:   # the filesystem refuses O_DIRECT (it may have created the file first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(block.numpy())
    started = time.perf_counter()
    try:
        for offset in range(0, nbytes, len(view)):
            os.pwrite(fd, view[:min(len(view), nbytes - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return nbytes / (time.perf_counter() - started) / 1e9


async def measure_disk(directory: str | Path, *, io_threads: int = 4, block_bytes: int = 8 * 2**20,
                       in_flight: int = 3, chunk_bytes: int = CHUNK_BYTES, seconds: float = 1.0,
                       file_bytes: int = PROBE_FILE_BYTES) -> DiskFigures:
    """O_DIRECT read bandwidth of ``directory``'s filesystem, read the way the weight stream
    reads: ``chunk_bytes`` chunks (one unit each) into ``in_flight`` reused aligned buffers."""
    directory = Path(directory)
    free = psutil.disk_usage(str(directory)).free
    file_bytes = max(ALIGN_BYTES, min(file_bytes, free // 4) // ALIGN_BYTES * ALIGN_BYTES)
    path = directory / f".tierflow-probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        write_gbps = await asyncio.to_thread(_write_probe_file, path, file_bytes)
        reader = DiskReader([str(path)], io_threads=io_threads, block_bytes=block_bytes)
        try:
            chunk = min(chunk_bytes, file_bytes)
            layouts = [UnitLayout(-1, "probe", (ByteRange(str(path), start, min(chunk, file_bytes - start), 0),), (),
                                  min(chunk, file_bytes - start), min(chunk, file_bytes - start))
                       for start in range(0, file_bytes, chunk)]
            ring = [aligned_empty(chunk) for _ in range(in_flight)]
            for buffer in ring:
                buffer.fill_(0)          # fault the pages in now, never while timing
            rates: list[float] = []
            started = time.perf_counter()
            while not rates or (time.perf_counter() - started < seconds and len(rates) < 20):
                rates.append(file_bytes / await read_pass(reader, layouts, ring) / 1e9)
            modes = set(reader.statistics().modes.values())
            buffers = ring_layout([buffer_layout(b, block_bytes) for b in ring])
        finally:
            reader.close()
    finally:
        path.unlink(missing_ok=True)
    return DiskFigures(statistics.median(rates), write_gbps, modes.pop() if len(modes) == 1 else "mixed", free,
                       buffers)


def ring_layout(layouts: list[BufferLayout]) -> dict[str, object]:
    """The layout of a ring of buffers as one record: the worst buffer's line and the means."""
    worst = max(layouts, key=lambda x: (x.pieces_per_block or 0, -(x.huge_fraction or 0)))
    pieces = [x.pieces_per_block for x in layouts]
    shares = [x.huge_fraction for x in layouts]
    return {**worst.as_dict(), "buffers": len(layouts),
            "pieces_per_block": None if None in pieces else statistics.mean(pieces),
            "huge_fraction": None if None in shares else statistics.mean(shares)}


async def read_pass(reader: DiskReader, layouts: list[UnitLayout], ring: list[torch.Tensor]) -> float:
    """Seconds to read ``layouts`` into the reused buffers of ``ring``, one read per buffer in flight."""
    free = list(range(len(ring)))
    gate = asyncio.Semaphore(len(ring))

    async def one(layout: UnitLayout) -> None:
        async with gate:
            slot = free.pop()
            try:
                await reader.read(layout, ring[slot])
            finally:
                free.append(slot)

    started = time.perf_counter()
    await asyncio.gather(*(one(layout) for layout in layouts))
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- PCIe
def measure_pcie(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """(host→device, device→host) GB/s with pinned host memory, median of ``repeats``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    rates: dict[str, list[float]] = {"h2d": [], "d2h": []}
    with torch.cuda.stream(stream):
        for _ in range(repeats):
            for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                rates[name].append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
    return statistics.median(rates["h2d"]), statistics.median(rates["d2h"])


# ----------------------------------------------------------------------------- compute
def _layer_shapes(model: ModelCosts) -> list[tuple[int, int]]:
    h, i = model.hidden_size, model.intermediate_size
    q, kv = model.num_heads * model.head_dim, model.kv_bytes_per_token_layer // (2 * model.dtype_bytes)
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def measure_compute(model: ModelCosts, device: torch.device, dtype: torch.dtype, *, prefill_tokens: int = 256,
                    seconds: float = 0.5, layer: Callable[[int], None] | None = None) -> tuple[float, float]:
    """(decode GB/s of weights, prefill TFLOP/s) of one decoder layer, at one token and at
    ``prefill_tokens``. ``layer(tokens)`` runs the model family's real layer forward (norms,
    rotary, attention, KV append and all), which is what the engine runs; without it the
    layer's matmuls alone are timed (shrunk to fit when a layer is very large)."""
    unit = next(u for u in model.units if u.kind == "layer")
    nbytes, params = unit.resident_bytes, unit.matmul_params
    if model.experts is not None:      # a token also runs through its routed experts
        nbytes += model.experts.per_token * model.experts.resident_bytes
        params += model.experts.per_token * model.experts.matmul_params
    if layer is None:
        shapes = _layer_shapes(model)
        room = max(64 * 2**20, psutil.virtual_memory().available // 8)
        scale = min(1.0, room / max(1, nbytes))
        shapes = [(max(1, int(a * scale)), b) if a >= b else (a, max(1, int(b * scale))) for a, b in shapes]
        gen = torch.Generator(device="cpu").manual_seed(0)
        weights = [(torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype) for shape in shapes]
        nbytes = sum(w.numel() for w in weights) * weights[0].element_size()
        params = sum(w.numel() for w in weights)
        inputs = {n: torch.randn(n, model.hidden_size, generator=gen).to(device, dtype) for n in (1, prefill_tokens)}

        def layer(tokens: int) -> None:
            with torch.inference_mode():
                for w in weights:
                    x = inputs[tokens]
                    torch.nn.functional.linear(x if x.shape[-1] == w.shape[1] else x.new_zeros(tokens, w.shape[1]), w)

    decode = _time(layer, 1, device, seconds / 2)
    prefill = _time(layer, prefill_tokens, device, seconds / 2)
    return nbytes / decode / 1e9, 2 * params * prefill_tokens / prefill / 1e12


def _time(fn: Callable[[int], None], tokens: int, device: torch.device, seconds: float) -> float:
    """Median seconds of one call, after a warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(tokens)
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        started = time.perf_counter()
        fn(tokens)
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ----------------------------------------------------------------------------- device overhead
MATMUL_STREAMS = 2      # the engine's compute stream, and one more (planner: hardware.DEFAULT_DEVICE_OVERHEAD_BYTES)


def release_cached_blocks(device: torch.device) -> None:
    """Wait for the device, then hand the caching allocator's free cached blocks back to the
    driver, so free and reserved memory show what is held rather than what a measurement left
    cached. Only the probe does this, once per measurement, never the engine's hot path (which
    ``tests/test_memory.py`` keeps free of cache-emptying calls, spelled out)."""
    torch.cuda.synchronize(device)
    release = torch.cuda.empty_cache
    release()


def measure_device_overhead(device: torch.device, dtype: torch.dtype, *, streams: int = MATMUL_STREAMS) -> int:
    """Device memory the caching allocator holds after one matmul in ``dtype`` on each of
    ``streams`` new streams, with and without a bias (cuBLAS and cuBLASLt), once their inputs
    are freed: PyTorch gives each (cuBLAS handle, stream) pair a workspace from the allocator on
    its first matmul and keeps it until the process exits. What the allocator rounds that
    workspace to is part of the figure (an 8.125 MiB workspace takes a 20 MiB segment). 0 on CPU."""
    if device.type != "cuda":
        return 0
    release_cached_blocks(device)
    before = torch.cuda.memory_reserved(device)
    for stream in [torch.cuda.Stream(device) for _ in range(streams)]:
        with torch.cuda.stream(stream), torch.inference_mode():
            x = torch.ones(256, 256, device=device, dtype=dtype)
            torch.nn.functional.linear(x, x, torch.ones(256, device=device, dtype=dtype))
            torch.matmul(x, x)
            del x
    release_cached_blocks(device)
    return max(0, torch.cuda.memory_reserved(device) - before)


# ----------------------------------------------------------------------------- the cache
