"""Planner accuracy: predicted vs measured seconds per decode token, three placements of a >= 1 GB model.

    python bench/planner_accuracy.py [--out DIR] [--new-tokens N] [--rounds R]

One run:
  1. builds (or reuses) the random Llama-shape checkpoint of >= 1 GiB that bench/decode.py uses;
  2. measures this machine with tierflow's probe, fresh (no cache): free RAM, O_DIRECT read
     bandwidth of the checkpoint's filesystem, compute at this model's layer shapes;
  3. for three device budgets — no cap (everything resident), the budget whose plan streams the
     share of the model's bytes closest to half, and the smallest budget that runs it
     (everything that can stream, streams) — re-measures the disk
     (this virtual disk drifts by tens of percent within minutes), opens the engine with that
     hardware profile so it plans and runs exactly what the planner predicts for, and decodes
     --new-tokens tokens --rounds times;
  4. prints predicted and measured seconds per token (median of the rounds, first token of each
     round excluded) and their ratio, and writes DIR/planner_accuracy.json.
The target is a ratio within 1 ± 0.25 for every placement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuMonitor, ModelShape, build_checkpoint, quiesce, timed_stream  # noqa: E402

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.engine.planning import engine_overrides, engine_workload, index_costs, load_engine_profile  # noqa: E402
from tierflow.testing import streaming_budget  # noqa: E402
from tierflow.tiers.checkpoint.index import CheckpointIndex  # noqa: E402
from tierflow.tiers.plan.planner import plan  # noqa: E402
from tierflow.tiers.probe.measure import measure_disk  # noqa: E402
from tierflow.tiers.probe.cache import ProbeCache  # noqa: E402
from tierflow.tiers.probe.probe import probe  # noqa: E402

TOLERANCE = 0.25
KV_TOKENS = 256


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/decode-model"))
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


def half_budget(index: CheckpointIndex, config: EngineConfig, smallest: int) -> int:
    """The device budget whose plan streams the share of the model's bytes closest to half
    (units are coarse: the embedding and head of this model are 262 MB each)."""
    costs = index_costs(index, torch.float32)
    profile = load_engine_profile(config)
    total = sum(u.stream_bytes for u in costs.units)
    best = None
    for step in range(1, 40):
        cap = smallest + (index.total_bytes * 1.2 - smallest) * step / 40
        planned = plan(costs, profile.hardware, engine_workload(config),
                       replace(engine_overrides(config, profile), device_memory_bytes=int(cap)))
        share = sum(costs.units[u].stream_bytes for u in planned.streamed) / total
        if best is None or abs(share - 0.5) < best[0]:
            best = (abs(share - 0.5), int(cap))
    assert best is not None
    return best[1]


async def run_placement(path: Path, name: str, hardware: dict[str, Any], cap: int | None, new_tokens: int,
                        rounds: int) -> dict[str, Any]:
    disk_before = await measure_disk(path)
    hw = {**hardware, "disk_read_gbps": disk_before.read_gbps, "kv_disk_read_gbps": disk_before.read_gbps}
    config = EngineConfig(device="cpu", dtype="float32", device_memory_bytes=cap, kv_reserve_tokens=KV_TOKENS,
                          profile={"version": 1, "hardware": hw})
    engine = await Engine.open(path, config)
    try:
        plan = engine.plan
        await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))   # warm-up
        await quiesce(engine)
        cpu = CpuMonitor()
        runs = [await timed_stream(engine, new_tokens) for _ in range(rounds)]
        stats = engine.stats()
        foreign = cpu.foreign_load()
    finally:
        await engine.close()
    disk_after = await measure_disk(path)
    measured = statistics.median(r["timing"]["mean_s"] for r in runs)
    predicted = plan.predicted.decode_s_per_token
    streamed = [engine.index.units[u].buffer_bytes for u in plan.streamed]
    return {
        "placement": name, "cap_bytes": cap, "tiers": list(plan.tiers),
        "units_streamed": len(plan.streamed), "units": len(plan.tiers),
        "streamed_bytes_per_token": sum(streamed),
        "disk_gbps_before": disk_before.read_gbps, "disk_gbps_after": disk_after.read_gbps,
        "io_mode": disk_before.io_mode,
        "predicted_s_per_token": predicted, "predicted": plan.to_json()["predicted"],
        "measured_s_per_token": measured, "measured_rounds_s": [r["timing"]["mean_s"] for r in runs],
        "ratio": measured / predicted,
        "stats_predicted_decode": asdict(stats.predicted_decode),
        "stats_measured_decode": asdict(stats.measured_decode),
        "foreign_cpu_load": foreign,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    path, reused = build_checkpoint(args.out, ModelShape().resolved())
    index = CheckpointIndex.open(path)
    model_bytes = index.total_bytes
    hw, provenance = await probe(torch.device("cpu"), torch.float32, index_costs(index, torch.float32), path,
                                 cache=ProbeCache(None), fresh=True)
    hardware = hw.to_json()
    base = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=KV_TOKENS,
                        profile={"version": 1, "hardware": hardware})
    smallest = streaming_budget(path, base)
    placements = [("all resident", None), ("about half streamed", half_budget(index, base, smallest)),
                  ("all streamed", smallest)]
    rows = []
    for name, cap in placements:
        rows.append(await run_placement(path, name, hardware, cap, args.new_tokens, args.rounds))
    return {"command": "python bench/planner_accuracy.py " + shlex.join(sys.argv[1:]),
            "model": {"dir": str(path), "reused": reused, "bytes": model_bytes,
                      "layers": index.spec.num_layers, "hidden": index.spec.hidden_size},
            "hardware": hardware, "probe": provenance, "tolerance": TOLERANCE, "rows": rows,
            "within_tolerance": all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows),
            "total_s": time.perf_counter() - started}


def report(result: dict[str, Any]) -> None:
    m = result["model"]
    print(f"model: {m['dir']} ({m['bytes'] / 1e9:.2f} GB, {m['layers']} layers, hidden {m['hidden']}), fp32, CPU")
    hw = result["hardware"]
    print(f"probe: disk {hw['disk_read_gbps']:.2f} GB/s, compute {hw['decode_gbps']:.1f} GB/s at 1 token, "
          f"{hw['prefill_tflops']:.3f} TFLOP/s at prefill")
    head = f"{'placement':<22}{'units streamed':>15}{'MB/token':>10}{'disk GB/s':>11}{'predicted':>11}{'measured':>10}" \
           f"{'ratio':>7}  bottleneck"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['placement']:<22}{r['units_streamed']:>9}/{r['units']:<5}{r['streamed_bytes_per_token'] / 1e6:>10.0f}"
              f"{r['disk_gbps_before']:>6.2f}→{r['disk_gbps_after']:<4.2f}{r['predicted_s_per_token'] * 1e3:>9.1f}ms"
              f"{r['measured_s_per_token'] * 1e3:>8.1f}ms{r['ratio']:>7.2f}  {r['predicted']['bottleneck']}")
    verdict = "within" if result["within_tolerance"] else "NOT within"
    loads = ", ".join(f"{r['foreign_cpu_load']:.2f}" for r in result["rows"])
    print(f"measured / predicted {verdict} 1 ± {result['tolerance']} for every placement "
          f"(CPU load from other processes: {loads} CPUs)")


def main() -> None:
    args = parse_args()
    result = asyncio.run(main_async(args))
    out = args.out / "planner_accuracy.json"
    out.write_text(json.dumps(result, indent=2))
    report(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
