"""GPU decode benchmark: a Llama-3.1-8B-shape model under an 8 GiB GPU budget, streamed from disk
and from pinned host RAM, against its rooflines and against accelerate's disk offload.

    python bench/gpu.py [--out DIR] [--sections build,disk,...] [--resume] [--new-tokens N] [--rounds R]
                        [--budget-gib G] [--host-gib G] [--tiny]

One run does these sections in this order (``--sections`` picks some; each one's result, or its
error, goes into --out/gpu.json as soon as it ends, and a failing section does not stop the others):
  build:      a random Llama-3.1-8B-shape bf16 checkpoint (32 layers, hidden 4096, intermediate 14336,
              32/8 heads, vocab 128256, untied head, rope_theta 500000 with Llama 3.1's rope scaling,
              131072 positions, about 16 GB) in --out/model, drawn on the GPU; reused when present;
  disk:       O_DIRECT read bandwidth of that file through the engine's own reader (``DiskProbe``);
  pcie:       host->device bandwidth: a 512 MiB pinned buffer copied on a side stream, CUDA events,
              median of 10;
  streamed:   the engine with ``device_memory_bytes`` = the budget: the planner keeps what fits on
              the GPU and streams the rest from disk. Greedy decode timed per token (the first token,
              i.e. the prefill, excluded), disk probed right before and after it with the plan's read
              pattern; a Chrome trace in --out/trace-streamed.json;
  pinned:     the same budget with every decoder layer pinned to the host tier (profile override):
              disk is out of the loop, every layer crosses PCIe each token;
  resident:   no budget: the whole model in GPU memory. Its time per token is the compute term of
              the other sections' rooflines;
  accelerate: transformers + accelerate, ``device_map="auto"`` with the same GPU budget and no CPU
              memory (the rest offloaded to disk), greedy ``generate`` of the same tokens.
Then: rooflines (streamed: max(streamed bytes per token / disk GB/s, bytes over PCIe per token /
PCIe GB/s, resident time per token); pinned: max(layer bytes / PCIe GB/s, resident time per token)),
ratios roofline / measured, tierflow streamed / accelerate, peak GPU memory (torch's allocator
counters and nvidia-smi sampled every 50 ms, net of the reading before the model was loaded) against
the budget, and whether the greedy tokens of the tierflow runs agree. Prints a table.

The engine measures the machine (disk, compute, PCIe) the first time it opens; that measurement
runs before the timed sections' memory tracking, cached in --out/probe-cache.

Each command on the benchmark machine is limited to 10 minutes; run the sections in pieces,
each adding to gpu.json (--resume keeps what is there and skips sections that already succeeded):
    python bench/gpu.py --out /tmp/gpubench --sections build,disk,pcie
    python bench/gpu.py --out /tmp/gpubench --resume --sections streamed
    python bench/gpu.py --out /tmp/gpubench --resume --sections resident,pinned
    python bench/gpu.py --out /tmp/gpubench --resume --sections accelerate

--tiny: a small model (hidden 256, 2 layers) and a 6 MiB budget, on the CPU when there is no GPU
(then pcie, pinned and accelerate are recorded as skipped): checks the script end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))     # tierflow from this checkout when not installed
from _common import (GB, PROMPT, DiskProbe, ModelShape, TimingStreamer, VramMonitor,  # noqa: E402
                     build_checkpoint_on, drop_page_cache, per_token, print_table, quiesce, timed_stream)

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, CheckpointIndex  # noqa: E402

SECTIONS = ("build", "disk", "pcie", "streamed", "pinned", "resident", "accelerate")
TARGETS = {"streamed": 0.80, "pinned": 0.85}      # roofline / measured, at least
WARMUP_TOKENS = 3
LLAMA31_8B = ModelShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=32,
                        dtype="bfloat16")
LLAMA31_CONFIG = {"rope_theta": 500000.0, "max_position_embeddings": 131072,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
TINY = ModelShape(hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=1000, layers=2, dtype="bfloat16")
PCIE_BYTES, PCIE_REPEATS = 512 * 2**20, 10


@dataclasses.dataclass
class Bench:
    out: Path
    shape: ModelShape
    device: str                  # "cuda" or "cpu"
    budget_bytes: int
    host_bytes: int              # pinned host memory in the streamed section
    new_tokens: int
    rounds: int
    command: str
    probe_warmed: bool = False

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def prompt(self) -> list[int]:
        return [t % self.shape.vocab for t in PROMPT]


def say(text: str) -> None:
    print(f"    {time.strftime('%H:%M:%S')} {text}", flush=True)


class Skipped(Exception):
    """A section that cannot run here (recorded as skipped, not as an error)."""


# --------------------------------------------------------------------------- sections
def ensure_model(b: Bench) -> dict[str, Any]:
    started = time.perf_counter()
    _, reused = build_checkpoint_on(b.model_dir, b.shape, device=b.device, config=LLAMA31_CONFIG)
    weights = b.model_dir / "model.safetensors"
    if not reused:
        say(f"built {weights} ({os.path.getsize(weights) / GB:.2f} GB, drawn on {b.device}) in "
            f"{time.perf_counter() - started:.1f} s")
    return {"dir": str(b.model_dir), "reused": reused, "build_s": time.perf_counter() - started,
            "drawn_on": b.device, **dataclasses.asdict(b.shape), "config": LLAMA31_CONFIG,
            "weight_bytes": os.path.getsize(weights), "expected_bytes": b.shape.total_bytes()}


def section_build(b: Bench) -> dict[str, Any]:
    return ensure_model(b)


def section_disk(b: Bench) -> dict[str, Any]:
    """The engine's default read pattern (4 threads x 8 MiB requests), chunks of one decoder
    layer, two in flight: as the engine's own probe reads."""
    ensure_model(b)
    index = CheckpointIndex.open(b.model_dir)
    layer_bytes = max(u.buffer_bytes for u in index.units[1:-1])
    slot = -(-layer_bytes // ALIGN_BYTES) * ALIGN_BYTES
    probe = DiskProbe(str(b.model_dir / "model.safetensors"), io_threads=4, block_bytes=8 * 2**20, slot_bytes=slot,
                      in_flight=2)
    try:
        for _ in range(2):
            got = asyncio.run(probe.measure(1))
            say(f"disk pass: {probe_text(got)} ({probe.mode})")
        return {"io_threads": 4, "block_bytes": 8 * 2**20, "slot_bytes": slot, "in_flight": 2,
                "mode": probe.mode, "passes_gbps": probe.passes, "gbps": probe_gbps(probe.passes)}
    finally:
        probe.close()


def probe_text(passes: dict[str, list[float]]) -> str:
    return ", ".join(f"{kind} {statistics.median(v):.2f} GB/s" for kind, v in passes.items())


def probe_gbps(passes: dict[str, list[float]]) -> float | None:
    """The faster buffer kind's median (see DiskProbe: the other depends on memory fragmentation)."""
    got = [statistics.median(v) for v in passes.values() if v]
    return max(got) if got else None


def section_pcie(b: Bench) -> dict[str, Any]:
    if not b.cuda:
        raise Skipped("skipped: no CUDA")
    src = torch.empty(PCIE_BYTES, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(PCIE_BYTES, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    seconds = []
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)          # warm-up: first-touch costs out of the timing
        for _ in range(PCIE_REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    rates = [PCIE_BYTES / s / GB for s in seconds]
    say(f"host->device {statistics.median(rates):.2f} GB/s (median of {PCIE_REPEATS})")
    return {"bytes": PCIE_BYTES, "repeats": PCIE_REPEATS, "seconds": seconds, "gbps": statistics.median(rates),
            "gbps_min": min(rates), "gbps_max": max(rates)}


def section_streamed(b: Bench) -> dict[str, Any]:
    """Pinned host memory is capped (``--host-gib``, default 4): room for the pinned read buffers
    and the embedding (looked up on the host), so the layers that miss the GPU budget stream
    from disk, not from RAM (on a machine with RAM to spare the planner would otherwise keep
    them all in pinned host memory, which is the ``pinned`` section)."""
    config = EngineConfig(device=b.device, dtype="bfloat16", device_memory_bytes=b.budget_bytes,
                          host_memory_bytes=b.host_bytes if b.cuda else None,
                          trace_path=str(b.out / "trace-streamed.json"))
    return asyncio.run(engine_section(b, config, probe_disk=True)) | {"trace": config.trace_path}


def section_pinned(b: Bench) -> dict[str, Any]:
    if not b.cuda:
        raise Skipped("skipped: no CUDA (on a CPU device the host tier is the device: the planner refuses 'host')")
    ensure_model(b)
    profile = b.out / "profile-pinned.json"
    layers = f"layers.0-{b.shape.layers - 1}"
    profile.write_text(json.dumps({"version": 1, "overrides": {"tiers": {layers: "host"}}}, indent=2))
    config = EngineConfig(device=b.device, dtype="bfloat16", device_memory_bytes=b.budget_bytes, profile=str(profile))
    index = CheckpointIndex.open(b.model_dir)
    layer_bytes = sum(u.buffer_bytes for u in index.units[1:b.shape.layers + 1])
    return asyncio.run(engine_section(b, config, probe_disk=False)) | {"profile": str(profile),
                                                                      "layer_bytes": layer_bytes}


def section_resident(b: Bench) -> dict[str, Any]:
    return asyncio.run(engine_section(b, EngineConfig(device=b.device, dtype="bfloat16"), probe_disk=False))


# --------------------------------------------------------------------------- one engine, timed
def config_record(config: EngineConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != f.default}


async def warm_probe(b: Bench) -> dict[str, Any] | None:
    """Let the engine measure this machine (or read its cache) outside the tracked windows:
    the probe's own GPU buffers are not the engine's memory."""
    if b.probe_warmed:
        return None
    from tierflow.engine.planning import plan_engine

    started = time.perf_counter()
    say("the engine's hardware probe (cached in TIERFLOW_CACHE_DIR after the first time)")
    index = CheckpointIndex.open(b.model_dir)
    planned = await plan_engine(index, EngineConfig(device=b.device, dtype="bfloat16"), torch.device(b.device),
                                torch.bfloat16)
    b.probe_warmed = True
    free_device_memory(b)
    return {"seconds": time.perf_counter() - started, "hardware": dataclasses.asdict(planned.hardware),
            "provenance": planned.provenance}


def free_device_memory(b: Bench) -> None:
    gc.collect()
    if b.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def visible_gpu() -> int:
    """nvidia-smi's index of the GPU that torch calls cuda:0."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def start_memory_tracking(b: Bench) -> VramMonitor | None:
    free_device_memory(b)
    if not b.cuda:
        return None
    torch.cuda.reset_peak_memory_stats()
    return VramMonitor(gpu=visible_gpu()).start()


def memory_record(b: Bench, monitor: VramMonitor | None, *, budgeted: bool = True) -> dict[str, Any]:
    """Peak GPU memory since ``start_memory_tracking``, checked against the budget where there is one."""
    if monitor is None:
        return {"skipped": "skipped: no CUDA"}
    smi = monitor.stop()
    torch_alloc, torch_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    within = lambda v: None if v is None or not budgeted else v <= b.budget_bytes      # noqa: E731
    return {"budget_bytes": b.budget_bytes if budgeted else None, "torch_max_allocated_bytes": torch_alloc,
            "torch_max_reserved_bytes": torch_reserved, "nvidia_smi": smi,
            "within_budget": {"torch_allocated": within(torch_alloc), "torch_reserved": within(torch_reserved),
                              "nvidia_smi_net": within(smi["net_peak_bytes"])}}


def stats_record(stats: Any) -> dict[str, Any]:
    out = dataclasses.asdict(stats)
    for name in ("gpu_busy_s", "gpu_span_s", "gpu_idle_fraction"):
        out[name] = getattr(stats, name, None)
    return out


async def engine_section(b: Bench, config: EngineConfig, *, probe_disk: bool) -> dict[str, Any]:
    ensure_model(b)
    probe_run = await warm_probe(b)
    monitor = start_memory_tracking(b)
    try:
        info = await timed_engine(b, config, probe_disk=probe_disk)
    finally:
        memory = memory_record(b, monitor, budgeted=config.device_memory_bytes is not None)
    runs = info["runs"]
    return info | {"memory": memory, "warm_probe": probe_run, "tokens": runs[0]["tokens"],
                   "s_per_token": statistics.median(r["timing"]["mean_s"] for r in runs),
                   "bytes_streamed_per_token": statistics.median(r["bytes_streamed_per_token"] for r in runs)}


async def timed_engine(b: Bench, config: EngineConfig, *, probe_disk: bool) -> dict[str, Any]:
    """Open, warm up, time ``rounds`` greedy decodes; with ``probe_disk``, the disk's bandwidth
    right before and after each (this disk's rate drifts), read in the plan's own pattern."""
    started = time.perf_counter()
    engine = await Engine.open(b.model_dir, config)
    info: dict[str, Any] = {"config": config_record(config), "open_s": time.perf_counter() - started}
    say(f"engine open in {info['open_s']:.1f} s: tiers {dict(collections.Counter(engine.plan.tiers))}, predicted "
        f"{engine.plan.predicted.decode_s_per_token * 1e3:.1f} ms/token ({engine.plan.predicted.bottleneck}-bound)")
    probe, probes, runs, windows = None, [], [], []
    try:
        plan = engine.plan
        host_units = [u for u in plan.units_in("host") if u != 0]      # an embedding on the host uploads rows only
        info |= {"plan": plan.to_json(), "tier_counts": dict(collections.Counter(plan.tiers)),
                 "predicted_decode_s_per_token": plan.predicted.decode_s_per_token,
                 "predicted_bottleneck": plan.predicted.bottleneck,
                 "streamed_bytes_per_sweep": sum(engine.index.units[u].buffer_bytes for u in plan.streamed),
                 "host_bytes_per_sweep": sum(engine.index.units[u].buffer_bytes for u in host_units),
                 "hardware": dataclasses.asdict(engine.hardware), "hardware_source": engine.hardware_source}
        await engine.generate(b.prompt, SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        await quiesce(engine)
        say(f"warm-up ({WARMUP_TOKENS} tokens) done")
        if probe_disk and plan.streamed:
            probe = DiskProbe(str(b.model_dir / "model.safetensors"), io_threads=plan.io_threads,
                              block_bytes=plan.io_block_bytes, slot_bytes=plan.host_slot_bytes or plan.device_slot_bytes,
                              in_flight=max(plan.num_slots, 2), direct_io=config.direct_io)
            probes.append(await probe.measure(1))
            say(f"disk before: {probe_text(probes[-1])}")
        for _ in range(b.rounds):
            before = engine.stats()
            runs.append(await timed_stream(engine, b.new_tokens, b.prompt))
            windows.append(gpu_window(before, engine.stats()))
            say(f"decode: {runs[-1]['timing']['mean_s'] * 1e3:.1f} ms/token over {b.new_tokens - 1} tokens, "
                f"{runs[-1]['bytes_streamed_per_token'] / GB:.3f} GB streamed per token")
            await quiesce(engine)
            if probe is not None:
                probes.append(await probe.measure(1))
                say(f"disk after: {probe_text(probes[-1])}")
        info |= {"stats": stats_record(engine.stats()), "pipeline": repr(engine.pipeline_statistics()),
                 "runs": runs, "gpu_windows": windows}
        if probe is not None:
            info |= {"disk_mode": probe.mode, "disk_probes": probes,
                     "disk_gbps": probe_gbps({k: [p[k][0] for p in probes] for k in DiskProbe.KINDS})}
    finally:
        await engine.close()
        if probe is not None:
            probe.close()
    return info


def gpu_window(before: Any, after: Any) -> dict[str, float | None]:
    """GPU busy and span seconds over one timed run (prefill included), where the engine reports them."""
    busy = [getattr(s, "gpu_busy_s", None) for s in (before, after)]
    span = [getattr(s, "gpu_span_s", None) for s in (before, after)]
    if None in busy or None in span:
        return {"gpu_busy_s": None, "gpu_span_s": None, "gpu_idle_fraction": None}
    b, s = busy[1] - busy[0], span[1] - span[0]
    return {"gpu_busy_s": b, "gpu_span_s": s, "gpu_idle_fraction": 1 - b / s if s > 0 else None}


# --------------------------------------------------------------------------- accelerate
def section_accelerate(b: Bench) -> dict[str, Any]:
    if not b.cuda:
        raise Skipped("skipped: no CUDA")
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import accelerate

    hf_logging.set_verbosity_error()
    ensure_model(b)
    offload = b.out / "offload"
    shutil.rmtree(offload, ignore_errors=True)
    newer = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    dtype_kw = {"dtype" if newer else "torch_dtype": torch.bfloat16}
    monitor = start_memory_tracking(b)
    attempts: list[dict[str, Any]] = []
    model = None
    try:
        for cpu_bytes in (0, 2**30):
            budget = {0: b.budget_bytes, "cpu": cpu_bytes}
            started = time.perf_counter()
            try:
                model = AutoModelForCausalLM.from_pretrained(b.model_dir, device_map="auto", max_memory=budget,
                                                             offload_folder=str(offload), **dtype_kw).eval()
                attempts.append({"max_memory_bytes": budget, "load_s": time.perf_counter() - started})
                say(f"loaded with max_memory {budget} in {attempts[-1]['load_s']:.1f} s")
                break
            except (ValueError, RuntimeError, KeyError) as exc:     # a refused budget: try the next, say so
                attempts.append({"max_memory_bytes": budget, "error": f"{type(exc).__name__}: {exc}"})
                say(f"max_memory {budget} refused: {attempts[-1]['error']}")
        if model is None:
            raise RuntimeError(f"accelerate refused every budget: {attempts}")
        placement = dict(collections.Counter(str(v) for v in model.hf_device_map.values()))
        ids = torch.tensor([b.prompt], device="cuda")
        hf_generate(model, ids, WARMUP_TOKENS)
        say(f"device map {placement}; warm-up ({WARMUP_TOKENS} tokens) done")
        offload_bytes = sum(p.stat().st_size for p in offload.rglob("*") if p.is_file())
        for path in [b.model_dir / "model.safetensors", *(p for p in offload.rglob("*") if p.is_file())]:
            drop_page_cache(path)       # the timed run's first token reads from the disk, not from RAM
        runs = [hf_generate(model, ids, b.new_tokens) for _ in range(b.rounds)]
        say(f"decode: {runs[-1]['timing']['mean_s'] * 1e3:.1f} ms/token over {b.new_tokens - 1} tokens")
    finally:
        del model
        gc.collect()
        memory = memory_record(b, monitor)
        shutil.rmtree(offload, ignore_errors=True)
    return {"transformers": transformers.__version__, "accelerate": accelerate.__version__, "attempts": attempts,
            "cpu_budget_note": None if attempts[0].get("error") is None else
            f"max_memory cpu 0 was refused ({attempts[0]['error']}); ran with {attempts[-1]['max_memory_bytes']}",
            "device_map_counts": placement, "offload_folder_bytes": offload_bytes, "memory": memory, "runs": runs,
            "tokens": runs[0]["tokens"], "s_per_token": statistics.median(r["timing"]["mean_s"] for r in runs),
            "note": "accelerate reads offloaded weights with buffered (mmap) reads: the page cache was dropped "
                    "before the timed run, but after its first token the weights may be served from RAM"}


def hf_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    streamer = TimingStreamer()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, min_new_tokens=new_tokens, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None, streamer=streamer)
    return {"tokens": out[0, ids.shape[1]:].tolist(), "timing": per_token(streamer.stamps),
            "first_token_s": streamer.stamps[0] - started if streamer.stamps else None}


# --------------------------------------------------------------------------- summary
def ok(section: dict[str, Any] | None) -> bool:
    return section is not None and "error" not in section and "skipped" not in section


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Rooflines and ratios from whatever sections have results (None where one is missing)."""
    sec = {name: results.get(name) for name in SECTIONS}
    pcie = sec["pcie"]["gbps"] if ok(sec["pcie"]) else None
    compute = sec["resident"]["s_per_token"] if ok(sec["resident"]) else None
    out: dict[str, Any] = {"pcie_gbps": pcie, "compute_s_per_token": compute}
    s = sec["streamed"]
    if ok(s):
        # the disk probed around the timed run, in the plan's read pattern; else the disk section
        disk = s.get("disk_gbps") or (sec["disk"]["gbps"] if ok(sec["disk"]) else None)
        disk_bytes = s["bytes_streamed_per_token"]
        pcie_bytes = disk_bytes + s["host_bytes_per_sweep"]          # streamed units are uploaded too
        terms = {"disk_s": seconds(disk_bytes, disk), "compute_s": compute}
        if results["cuda"]:
            terms["pcie_s"] = seconds(pcie_bytes, pcie)
        out["streamed"] = roofline(s["s_per_token"], terms) | {
            "disk_gbps": disk, "disk_bytes_per_token": disk_bytes,
            "pcie_bytes_per_token": pcie_bytes if results["cuda"] else None}
    p = sec["pinned"]
    if ok(p):
        pcie_bytes = p["layer_bytes"] + p["bytes_streamed_per_token"]
        terms = {"pcie_s": seconds(pcie_bytes, pcie), "compute_s": compute}
        out["pinned"] = roofline(p["s_per_token"], terms) | {"pcie_bytes_per_token": pcie_bytes}
    a = sec["accelerate"]
    if ok(a) and ok(s):
        out["streamed_over_accelerate"] = s["s_per_token"] / a["s_per_token"]
    out["tokens"] = token_check(results)
    return out


def seconds(nbytes: float, gbps: float | None) -> float | None:
    """Time to move ``nbytes`` at ``gbps`` (0 when there is nothing to move; None when the rate is unknown)."""
    if not nbytes:
        return 0.0
    return nbytes / (gbps * GB) if gbps else None


def roofline(measured_s: float, terms: dict[str, float | None]) -> dict[str, Any]:
    known = {k: v for k, v in terms.items() if v is not None}
    missing = sorted(k for k, v in terms.items() if v is None)
    roof = max(known.values()) if known and not missing else None
    return {"s_per_token": measured_s, "roofline_s": roof, "terms": terms, "missing_terms": missing,
            "bound": max(known, key=known.get) if known and not missing else None,
            "roofline_over_measured": roof / measured_s if roof is not None else None}


def token_check(results: dict[str, Any]) -> dict[str, Any]:
    got = {n: results[n]["tokens"] for n in ("resident", "streamed", "pinned", "accelerate") if ok(results.get(n))}
    tierflow = {n: t for n, t in got.items() if n != "accelerate"}
    ref_name = next(iter(tierflow), None)
    mismatches = {}
    for name, tokens in got.items():
        if ref_name is not None and name != ref_name and tokens != tierflow[ref_name]:
            first = next((i for i, (x, y) in enumerate(zip(tokens, tierflow[ref_name])) if x != y),
                         min(len(tokens), len(tierflow[ref_name])))
            mismatches[name] = {"first_difference_at": first, "tokens": tokens}
    return {"reference": ref_name, "compared": sorted(got), "reference_tokens": tierflow.get(ref_name),
            "tierflow_agree": not any(n in mismatches for n in tierflow) if len(tierflow) > 1 else None,
            "accelerate_agrees": None if "accelerate" not in got or ref_name is None else "accelerate" not in mismatches,
            "mismatches": mismatches}


# --------------------------------------------------------------------------- report
def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def fmt_gb(x: int | None) -> str:
    if x is None:
        return "-"
    return f"{x / 2**30:.2f} GiB" if abs(x) >= 2**30 else f"{x / 2**20:.1f} MiB"


def memory_cell(section: dict[str, Any]) -> tuple[str, str]:
    m = section.get("memory") or {}
    if "torch_max_allocated_bytes" not in m:
        return "-", "-"
    w = m["within_budget"]
    mark = lambda v: "" if v is None else (" ok" if v else " OVER")     # noqa: E731
    smi = m["nvidia_smi"]
    return (f"{fmt_gb(m['torch_max_allocated_bytes'])}{mark(w['torch_allocated'])} / "
            f"{fmt_gb(m['torch_max_reserved_bytes'])}{mark(w['torch_reserved'])}",
            f"{fmt_gb(smi['net_peak_bytes'])}{mark(w['nvidia_smi_net'])} (raw {fmt_gb(smi['peak_bytes'])})")


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    x = r["summary"]
    rows = []
    for name in SECTIONS:
        sec = r.get(name)
        if sec is None:
            rows.append([name, "not run"] + [""] * 5)
            continue
        if not ok(sec):
            rows.append([name, "skipped" if "skipped" in sec else "FAILED"] + [""] * 5)
            continue
        s_tok, roof, ratio, target = fmt_s(sec.get("s_per_token")), "", "", ""
        if name in ("streamed", "pinned") and name in x:
            y = x[name]
            bound = y["bound"].removesuffix("_s") if y["bound"] else "missing " + ",".join(y["missing_terms"])
            roof = f"{fmt_s(y['roofline_s'])} ({bound})"
            if y["roofline_over_measured"] is not None:
                ratio = f"{y['roofline_over_measured']:.3f}"
                target = f">= {TARGETS[name]} " + ("OK" if y["roofline_over_measured"] >= TARGETS[name] else "MISS")
        elif name == "build":
            s_tok = f"{fmt_gb(sec['weight_bytes'])}, {'reused' if sec['reused'] else 'built'} in {sec['build_s']:.0f} s"
        elif name == "disk":
            s_tok = f"{sec['gbps']:.2f} GB/s ({sec['mode']})"
        elif name == "pcie":
            s_tok = f"{sec['gbps']:.2f} GB/s"
        elif name == "accelerate" and "streamed_over_accelerate" in x:
            ratio = f"streamed/acc {x['streamed_over_accelerate']:.3f}"
        torch_mem, smi_mem = memory_cell(sec)
        rows.append([name, s_tok, roof, ratio, target, torch_mem, smi_mem])
    return rows


def report(r: dict[str, Any]) -> None:
    e = r["environment"]
    print(f"\ncommand: {r['command']}")
    print(f"{e['gpu'] or 'no GPU'}; torch {e['torch']} (CUDA {e['cuda']}); {r['date']}")
    print(f"model {r['shape']}; prompt {len(r['prompt'])} token ids, {r['new_tokens']} new tokens greedy, "
          f"{r['rounds']} round(s), medians; decode time excludes the first token; budget {fmt_gb(r['budget_bytes'])}")
    head = ["section", "s/token", "roofline", "ratio", "target", "peak torch alloc / reserved", "peak nvidia-smi net"]
    print_table([head] + table_rows(r))
    for name in SECTIONS:
        sec = r.get(name) or {}
        if "skipped" in sec or "error" in sec:
            print(f"{name}: {sec.get('skipped') or sec['error']}")
    x = r["summary"]
    for name in ("streamed", "pinned"):
        if name in x:
            terms = ", ".join(f"{k} {fmt_s(v)}" for k, v in x[name]["terms"].items())
            print(f"{name} roofline terms: {terms}")
    for name in ("streamed", "pinned", "resident"):
        s = r.get(name)
        if ok(s):
            idle = s["stats"]["gpu_idle_fraction"]
            print(f"{name} plan: tiers {s['tier_counts']}, predicted {fmt_s(s['predicted_decode_s_per_token'])} "
                  f"({s['predicted_bottleneck']}-bound); streamed {fmt_gb(s['bytes_streamed_per_token'])} per token; "
                  f"gpu_idle_fraction {'-' if idle is None else f'{idle:.3f}'}"
                  + (f"; trace {s['trace']}" if "trace" in s else ""))
    t = x["tokens"]
    agree = {None: "n/a", True: "yes", False: "NO"}
    print(f"greedy tokens of {', '.join(t['compared']) or 'nothing'} against {t['reference']}: tierflow runs agree "
          f"{agree[t['tierflow_agree']]}, accelerate agrees {agree[t['accelerate_agrees']]}")
    for name, m in t["mismatches"].items():
        print(f"  {name} differs from token {m['first_difference_at']}: {m['tokens']}")
    print(f"wrote {r['json']}")


# --------------------------------------------------------------------------- main
RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "build": section_build, "disk": section_disk, "pcie": section_pcie, "streamed": section_streamed,
    "pinned": section_pinned, "resident": section_resident, "accelerate": section_accelerate}


def run_sections(b: Bench, todo: list[str], runners: dict[str, Callable[[Bench], dict[str, Any]]],
                 results: dict[str, Any], json_path: Path, resume: bool,
                 save: Callable[[dict[str, Any]], None]) -> None:
    """Run ``todo`` in order, each section's result (or error, or reason to skip) into
    ``results`` and saved at once; with ``resume`` a section that already succeeded is kept."""
    for k, name in enumerate(todo, 1):
        if resume and ok(results.get(name)):
            print(f"[{k}/{len(todo)}] {name}: kept from {json_path}", flush=True)
            continue
        print(f"[{k}/{len(todo)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            got = runners[name](b)
        except Skipped as exc:
            got = {"skipped": str(exc)}
        except Exception as exc:     # one section's failure is recorded and the others still run
            got = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(got["traceback"], file=sys.stderr, flush=True)
        try:
            free_device_memory(b)
        except RuntimeError as exc:     # e.g. a sticky CUDA error: record it, later sections will say more
            got["cleanup_error"] = f"{type(exc).__name__}: {exc}"
        got |= {"elapsed_s": time.perf_counter() - t0, "command": b.command,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        results[name] = got
        state = "skipped" if "skipped" in got else "FAILED" if "error" in got else "done"
        print(f"[{k}/{len(todo)}] {name} {state} in {got['elapsed_s']:.1f} s", flush=True)
        save(results)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out/gpu", help="directory for the model, gpu.json and the trace")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--resume", action="store_true",
                   help="keep the results in --out/gpu.json and skip sections that already succeeded")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="timed decodes per section (medians shown)")
    p.add_argument("--budget-gib", type=float, default=None, help="GPU memory budget (default 8; --tiny: 6 MiB)")
    p.add_argument("--host-gib", type=float, default=4.0,
                   help="pinned host memory in the streamed section (default 4: the read buffers, the embedding, little more)")
    p.add_argument("--tiny", action="store_true", help="a small model, for checking the script end to end")
    args = p.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token is excluded from decode timing)")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def environment() -> dict[str, Any]:
    import psutil

    versions = {}
    for name in ("transformers", "accelerate", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    driver = None
    if cuda:
        try:
            driver = subprocess.run(["nvidia-smi", "-i", str(visible_gpu()), "--query-gpu=driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            driver = f"unknown ({type(exc).__name__})"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if cuda else None,
            "driver": driver,
            "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
            "python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, **versions}


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TIERFLOW_CACHE_DIR", str(out / "probe-cache"))    # one probe, shared by all sections
    json_path = out / "gpu.json"
    cuda = torch.cuda.is_available()
    budget = int(args.budget_gib * 2**30) if args.budget_gib else (6 * 2**20 if args.tiny else 8 * 2**30)
    shape = TINY if args.tiny else LLAMA31_8B
    results: dict[str, Any] = json.loads(json_path.read_text()) if args.resume and json_path.exists() else {}
    if results and results.get("shape") != dataclasses.asdict(shape):
        print(f"note: {json_path} is for another model; starting afresh", flush=True)
        results = {}
    b = Bench(out=out, shape=shape, device="cuda" if cuda else "cpu", budget_bytes=budget,
              host_bytes=int(args.host_gib * 2**30), new_tokens=args.new_tokens,
              rounds=args.rounds, command="python " + shlex.join(sys.argv))
    results |= {"command": b.command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
                "shape": dataclasses.asdict(shape), "cuda": cuda, "device": b.device, "budget_bytes": budget,
                "new_tokens": args.new_tokens, "rounds": args.rounds, "prompt": b.prompt, "json": str(json_path),
                "targets": TARGETS}
    started = time.perf_counter()

    def save(results: dict[str, Any]) -> None:
        results.pop("summary", None)
        results["summary"] = summarize(results)
        json_path.write_text(json.dumps(results, indent=2, default=str))

    run_sections(b, [s for s in SECTIONS if s in args.sections], RUNNERS, results, json_path, args.resume, save)
    results.pop("summary", None)
    results["summary"] = summarize(results)
    results["total_s"] = time.perf_counter() - started
    json_path.write_text(json.dumps(results, indent=2, default=str))
    report(results)


if __name__ == "__main__":
    main()
