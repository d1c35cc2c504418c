"""Decode benchmark: tierflow streamed from disk vs. its roofline, tierflow resident vs. transformers.

    python bench/decode.py [--out DIR] [--layers N] [--hidden H] [--dtype float32|bfloat16] [--new-tokens N]
                           [--rounds R]

One run:
  1. builds (or reuses) a random Llama-shape checkpoint of >= 1 GiB in --out;
  2. measures the O_DIRECT read bandwidth of that checkpoint file with the engine's own
     reader (same block size, same number of threads = queue depth), before and after
     every streamed run (this virtual disk drifts by tens of percent within seconds);
  3. streams every decoder layer from disk (embedding / head resident) and times the decode
     tokens (the first token, i.e. the prefill, is excluded);
  4. times the same model fully resident;
  5. roofline = max(streamed bytes per token / disk bandwidth, resident time per token);
  6. times transformers' greedy decode with KV cache on the same checkpoint, alternating
     with the resident tierflow runs, and checks that the greedy tokens match;
  7. prints a table and writes --out/decode.json.
Each timed figure is the median of R rounds; ratios are medians of per-round paired ratios.
The machine's CPU load from other processes is measured during every timed run and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DTYPES, GB, PROMPT, CpuMonitor, DiskProbe, ModelShape, TimingStreamer, build_checkpoint,  # noqa: E402
                     max_segments, per_token, physical_runs, quiesce, streamed_profile, timed_stream)

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.tiers.plan.costmodel import DISK  # noqa: E402

TARGET_STREAMED = 1.25
TARGET_RESIDENT = 1.15
WARMUP_TOKENS = 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out/decode-model", help="checkpoint directory (and decode.json)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: fewest that make >= 1 GiB)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed runs per measurement, interleaved (medians shown)")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token is excluded from decode timing)")
    return args


def placement_info(engine: Engine) -> dict[str, Any]:
    stats = engine.stats()
    return {"tiers": list(engine.plan.tiers), "units_streamed": stats.units_streamed,
            "units_resident": stats.units_resident, "resident_bytes": stats.resident_bytes,
            "staging_bytes": stats.staging_bytes,
            "streamed_bytes_per_sweep": sum(engine.index.units[u].buffer_bytes for u in engine.plan.streamed)}


def engine_slots(engine: Engine) -> list[torch.Tensor]:
    """The engine's staging slot buffers (private attributes: diagnostics only)."""
    stream = getattr(engine, "_stream", None)
    ring = getattr(stream, "_ring", None)
    return list(getattr(ring, "slots", []) or [])


async def streamed_phase(path: Path, dtype_name: str, new_tokens: int, rounds: int) -> dict[str, Any]:
    """Disk probes interleaved with streamed decode runs: each run gets the disk bandwidth
    measured right before and right after it (this virtual disk drifts within seconds)."""
    base = EngineConfig(device="cpu", dtype=dtype_name, profile=streamed_profile(path))
    weights = str(path / "model.safetensors")
    engine = await Engine.open(path, base)
    plan = engine.plan
    probe = None
    try:
        info = placement_info(engine) | {"slot_bytes": plan.device_slot_bytes, "num_slots": plan.num_slots}
        assert all(t == DISK for t in info["tiers"][1:-1]), f"a decoder layer is not on disk: {info['tiers']}"
        probe = DiskProbe(weights, io_threads=plan.io_threads, block_bytes=plan.io_block_bytes,
                          slot_bytes=plan.device_slot_bytes, in_flight=plan.num_slots, direct_io=base.direct_io)
        await engine.generate(PROMPT, SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        await quiesce(engine)
        probes = [await probe.measure(1)]
        runs = []
        for _ in range(rounds):
            runs.append(await timed_stream(engine, new_tokens))
            await quiesce(engine)
            probes.append(await probe.measure(1))
        info["io_mode"] = engine.stats().io_mode
        reader = getattr(engine, "_reader", None)      # per-file modes: reader.statistics().modes
        if reader is not None:
            rs = reader.statistics()
            info |= {"reader_modes": rs.modes, "reader_requests": rs.requests, "reader_busy_s": rs.busy_s}
        slots = [physical_runs(b, plan.io_block_bytes) for b in engine_slots(engine)]
        contiguity = {"engine_slots": None if not slots or None in slots else sum(slots) / len(slots),
                      **{f"probe_{k}": v for k, v in probe.runs_per_block().items()},
                      "max_segments": max_segments(weights)}
        mode, passes = probe.mode, probe.passes
    finally:
        await engine.close()
        if probe is not None:
            probe.close()
    for r, run in enumerate(runs):
        for kind in DiskProbe.KINDS:
            run[f"disk_{kind}_gbps"] = statistics.median(probes[r][kind] + probes[r + 1][kind])
        run["disk_gbps"] = max(run[f"disk_{kind}_gbps"] for kind in DiskProbe.KINDS)
    return {"placement": info, "runs": runs, "probes": probes, "probe_passes": passes, "disk_mode": mode,
            "contiguity": contiguity, "io_threads": plan.io_threads, "block_bytes": plan.io_block_bytes}


def hf_timed(model: Any, new_tokens: int) -> dict[str, Any]:
    cpu = CpuMonitor()
    streamer = TimingStreamer()
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, streamer=streamer)
    return {"tokens": out[0, len(PROMPT):].tolist(), "timing": per_token(streamer.stamps),
            "foreign_cpu_load": cpu.foreign_load()}


async def resident_phase(path: Path, dtype_name: str, new_tokens: int, rounds: int) -> dict[str, Any]:
    """tierflow fully resident and transformers, both loaded, timed alternately (ABBA...)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    engine = await Engine.open(path, EngineConfig(device="cpu", dtype=dtype_name))
    try:
        info = placement_info(engine)
        assert info["units_streamed"] == 0, info["tiers"]
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name]).eval()
        hf_load_s = time.perf_counter() - started
        await engine.generate(PROMPT, SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        hf_timed(model, WARMUP_TOKENS)
        tf_runs, hf_runs = [], []
        for r in range(rounds):
            for which in (("tf", "hf") if r % 2 == 0 else ("hf", "tf")):
                if which == "tf":
                    tf_runs.append(await timed_stream(engine, new_tokens))
                else:
                    hf_runs.append(hf_timed(model, new_tokens))
        del model
        gc.collect()
    finally:
        await engine.close()
    return {"placement": info, "runs": tf_runs, "transformers_runs": hf_runs, "transformers_load_s": hf_load_s}


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def summarize(streamed: dict[str, Any], resident: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median
    s_runs, tf_runs, hf_runs = streamed["runs"], resident["runs"], resident["transformers_runs"]
    bytes_per_token = streamed["placement"]["streamed_bytes_per_sweep"]
    passes = streamed["probe_passes"]
    disk = max(med(v) for v in passes.values())
    s_t = [r["timing"]["mean_s"] for r in s_runs]
    tf_t = [r["timing"]["mean_s"] for r in tf_runs]
    hf_t = [r["timing"]["mean_s"] for r in hf_runs]
    resident_s = med(tf_t)
    io_s = bytes_per_token / (disk * GB)
    roof = max(io_s, resident_s)
    per_round_roof = [max(bytes_per_token / (r["disk_gbps"] * GB), resident_s) for r in s_runs]
    return {
        "disk_gbps": disk,
        **{f"disk_{k}_{stat}": fn(v) for k, v in passes.items()
           for stat, fn in (("gbps", med), ("min", min), ("max", max), ("passes", len))},
        "contiguity": streamed["contiguity"],
        "streamed_s_per_token": med(s_t), "streamed_rounds_s": s_t,
        "streamed_bytes_per_token": bytes_per_token,
        "streamed_bytes_per_token_measured": med(r["bytes_streamed_per_token"] for r in s_runs),
        "achieved_gbps": med(r["achieved_gbps"] for r in s_runs),
        "achieved_over_disk": med(r["achieved_gbps"] / r["disk_gbps"] for r in s_runs),
        "read_s_per_token": med(r["read_s_per_token"] for r in s_runs),
        "compute_s_per_token": med(r["compute_s_per_token"] for r in s_runs),
        "stall_s_per_token": med(r["stall_s_per_token"] for r in s_runs),
        "resident_s_per_token": resident_s, "resident_rounds_s": tf_t,
        "resident_compute_s_per_token": med(r["compute_s_per_token"] for r in tf_runs),
        "transformers_s_per_token": med(hf_t), "transformers_rounds_s": hf_t,
        "roofline_s": roof, "roofline_io_s": io_s, "roofline_compute_s": resident_s,
        "roofline_bound": "io" if io_s >= resident_s else "compute",
        "streamed_over_roofline": med(t / r for t, r in zip(s_t, per_round_roof)),
        "streamed_over_roofline_rounds": [t / r for t, r in zip(s_t, per_round_roof)],
        "streamed_over_roofline_of_medians": med(s_t) / roof,
        "resident_over_transformers": med(a / b for a, b in zip(tf_t, hf_t)),
        "resident_over_transformers_rounds": [a / b for a, b in zip(tf_t, hf_t)],
        "resident_over_transformers_of_medians": resident_s / med(hf_t),
        "foreign_cpu_load_streamed": max(r["foreign_cpu_load"] for r in s_runs),
        "foreign_cpu_load_resident": max(r["foreign_cpu_load"] for r in tf_runs + hf_runs),
        "tokens_resident_vs_transformers": all(a["tokens"] == hf_runs[0]["tokens"] for a in tf_runs + hf_runs),
        "tokens_streamed_vs_resident": all(a["tokens"] == tf_runs[0]["tokens"] for a in s_runs),
    }


def report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120, highlight=False, soft_wrap=False)
    x, m, sp = r["summary"], r["model"], r["streamed"]
    place = sp["placement"]
    built = "reused" if m["reused"] else f"built in {m['build_s']:.1f} s"
    rounds = lambda v, f=ms: ", ".join(f(t) for t in v)            # noqa: E731
    ok = lambda v, target: "[green]OK[/]" if v <= target else "[red]MISS[/]"   # noqa: E731
    console.print(f"command: {r['command']}")
    console.print(f"model: {m['dir']} ({built}): {m['layers']} layers, hidden {m['hidden']}, intermediate "
                  f"{m['intermediate']}, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}, {m['dtype']}, "
                  f"{m['weight_bytes'] / GB:.3f} GB")
    e = r["environment"]
    console.print(f"torch {e['torch']} ({e['threads']} threads, {e['cpus']} CPUs), transformers {e['transformers']}; "
                  f"prompt {r['prompt_tokens']} token ids, {r['new_tokens']} new tokens greedy, {r['rounds']} rounds "
                  f"per measurement, medians shown; decode time excludes the first token")

    t = Table(title="tierflow decode benchmark", show_lines=False)
    t.add_column("figure", style="bold", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("note")
    c = x["contiguity"]
    runs = lambda v: "n/a" if v is None else f"{v:.0f}"      # noqa: E731
    t.add_row("disk O_DIRECT read bandwidth", f"{x['disk_gbps']:.3f} GB/s",
              f"checkpoint file read whole with the engine's DiskReader ({sp['io_threads']} threads x "
              f"{sp['block_bytes'] >> 20} MiB blocks, mode {sp['disk_mode']}) in the stream's pattern: "
              f"{place['slot_bytes'] / 2**20:.0f} MiB chunks into {place['num_slots']} reused slots; probed before "
              "and after every streamed run; the faster buffer kind below is the roofline's")
    t.add_row("  into huge-page slots", f"{x['disk_hugepage_gbps']:.3f} GB/s",
              f"{x['disk_hugepage_passes']} passes {x['disk_hugepage_min']:.2f}..{x['disk_hugepage_max']:.2f}; "
              f"{runs(c['probe_hugepage'])} physical runs per {sp['block_bytes'] >> 20} MiB block")
    t.add_row("  into aligned_empty slots", f"{x['disk_regular_gbps']:.3f} GB/s",
              f"{x['disk_regular_passes']} passes {x['disk_regular_min']:.2f}..{x['disk_regular_max']:.2f}; "
              f"{runs(c['probe_regular'])} runs per block (the engine's slots: {runs(c['engine_slots'])}; "
              f"device max_segments {c['max_segments']})")
    t.add_section()
    tiers = "".join("D" if z == "disk" else "R" for z in place["tiers"])
    t.add_row("streamed: placement", f"{place['units_streamed']} disk, {place['units_resident']} resident",
              f"tiers {tiers} (R resident, D disk; pinned by profile overrides); "
              f"engine io_mode {place['io_mode']}, reader.statistics().modes "
              f"{ {Path(k).name: v for k, v in place.get('reader_modes', {}).items()} }")
    t.add_row("streamed: time / decode token", ms(x["streamed_s_per_token"]), f"rounds {rounds(x['streamed_rounds_s'])}")
    t.add_row("streamed: bytes read / token", f"{x['streamed_bytes_per_token_measured'] / GB:.3f} GB",
              f"engine.stats() delta; layouts say {x['streamed_bytes_per_token'] / GB:.3f} GB per sweep")
    t.add_row("streamed: achieved disk rate", f"{x['achieved_gbps']:.3f} GB/s",
              f"{x['achieved_over_disk']:.0%} of the disk bandwidth probed around each run")
    t.add_row("streamed: read / compute / stall", f"{ms(x['read_s_per_token'])} / {ms(x['compute_s_per_token'])} / "
              f"{ms(x['stall_s_per_token'])}", "per decode token; read_s sums overlapping unit reads")
    t.add_section()
    t.add_row("resident: time / decode token", ms(x["resident_s_per_token"]),
              f"rounds {rounds(x['resident_rounds_s'])}; compute {ms(x['resident_compute_s_per_token'])}")
    t.add_row("transformers: time / decode token", ms(x["transformers_s_per_token"]),
              f"rounds {rounds(x['transformers_rounds_s'])}; generate(), KV cache")
    t.add_row("other CPU load (streamed / resident)",
              f"{x['foreign_cpu_load_streamed']:.2f} / {x['foreign_cpu_load_resident']:.2f}",
              "CPUs busy with other processes or steal during the timed runs (max); > 0.1 makes timings noisy")
    t.add_section()
    t.add_row("roofline / token", ms(x["roofline_s"]),
              f"max(io {ms(x['roofline_io_s'])}, compute {ms(x['roofline_compute_s'])}): {x['roofline_bound']}-bound")
    t.add_row("streamed / roofline", f"{x['streamed_over_roofline']:.3f}",
              f"target <= {TARGET_STREAMED} {ok(x['streamed_over_roofline'], TARGET_STREAMED)}; rounds "
              f"{rounds(x['streamed_over_roofline_rounds'], lambda v: f'{v:.3f}')}; of medians "
              f"{x['streamed_over_roofline_of_medians']:.3f}")
    t.add_row("tierflow resident / transformers", f"{x['resident_over_transformers']:.3f}",
              f"target <= {TARGET_RESIDENT} {ok(x['resident_over_transformers'], TARGET_RESIDENT)}; rounds "
              f"{rounds(x['resident_over_transformers_rounds'], lambda v: f'{v:.3f}')}; of medians "
              f"{x['resident_over_transformers_of_medians']:.3f}")
    t.add_row("greedy tokens resident == transformers", "yes" if x["tokens_resident_vs_transformers"] else "NO",
              f"streamed == resident: {'yes' if x['tokens_streamed_vs_resident'] else 'NO'}")
    console.print(t)
    if c["engine_slots"] and c["max_segments"] and c["engine_slots"] > c["max_segments"]:
        console.print(f"[yellow]note: the engine's staging slots are physically fragmented ({c['engine_slots']:.0f} "
                      f"contiguous runs per {sp['block_bytes'] >> 20} MiB read > the device's max_segments "
                      f"{c['max_segments']}), so the block layer splits every read into several requests; "
                      "huge-page slots avoid it (compare the two probe rows)[/]")
    busy = max(x["foreign_cpu_load_streamed"], x["foreign_cpu_load_resident"])
    if busy > 0.1:
        console.print(f"[yellow]warning: other work kept {busy:.2f} CPUs busy during timed runs; timings on this "
                      f"{e['cpus']}-CPU machine are inflated and noisy — rerun when it is idle[/]")
    console.print(f"tokens (tierflow) : {r['resident']['runs'][0]['tokens']}")
    console.print(f"tokens (transformers): {r['resident']['transformers_runs'][0]['tokens']}")
    console.print(f"wrote {r['json']} (total run {r['total_s']:.1f} s)")


def main() -> None:
    args = parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = time.perf_counter()
    intermediate = 5632 if args.hidden == 2048 else int(round(args.hidden * 2.75 / 256)) * 256
    heads = max(args.hidden // 128, 1)
    shape = ModelShape(hidden=args.hidden, intermediate=intermediate, heads=heads, kv_heads=max(heads // 4, 1),
                       layers=args.layers, dtype=args.dtype).resolved()
    out_dir = Path(args.out)
    if shape.total_bytes() < 2**30:
        print(f"note: {shape.total_bytes() / GB:.3f} GB of weights is below the 1 GiB this benchmark is meant for",
              flush=True)
    print(f"[1/4] checkpoint: {shape.layers} layers, {shape.total_bytes() / GB:.3f} GB ({args.dtype}) in {out_dir}",
          flush=True)
    t0 = time.perf_counter()
    path, reused = build_checkpoint(out_dir, shape)
    build_s = time.perf_counter() - t0
    print(f"[2/4] disk probes interleaved with streamed decode ({args.rounds} rounds)", flush=True)
    streamed = asyncio.run(streamed_phase(path, args.dtype, args.new_tokens, args.rounds))
    gc.collect()
    print(f"[3/4] tierflow resident and transformers, alternating ({args.rounds} rounds)", flush=True)
    resident = asyncio.run(resident_phase(path, args.dtype, args.new_tokens, args.rounds))
    print("[4/4] report\n", flush=True)
    import transformers
    results = {
        "command": command, "new_tokens": args.new_tokens, "prompt_tokens": len(PROMPT), "rounds": args.rounds,
        "model": {"dir": str(path), "reused": reused, "build_s": build_s, **asdict(shape),
                  "weight_bytes": os.path.getsize(path / "model.safetensors")},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "transformers": transformers.__version__,
                        "kernel": platform.release()},
        "targets": {"streamed_over_roofline": TARGET_STREAMED, "resident_over_transformers": TARGET_RESIDENT},
        "summary": summarize(streamed, resident), "streamed": streamed, "resident": resident,
        "json": str(out_dir / "decode.json"),
    }
    results["total_s"] = time.perf_counter() - started
    (out_dir / "decode.json").write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
