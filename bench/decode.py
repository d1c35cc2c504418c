"""Decode benchmark: tierflow streamed from disk vs. its roofline, tierflow resident vs. transformers.

    python bench/decode.py [--out DIR] [--layers N] [--hidden H] [--dtype float32|bfloat16] [--new-tokens N]

One run:
  1. builds (or reuses) a random Llama-shape checkpoint of >= 1 GiB in --out;
  2. measures the O_DIRECT read bandwidth of that checkpoint file with the engine's own
     reader (same block size, same number of threads = queue depth);
  3. streams every decoder layer from disk (embedding / head resident) and times the decode
     tokens (the first token, i.e. the prefill, is excluded);
  4. times the same model fully resident;
  5. roofline = max(streamed bytes per token / disk bandwidth, resident time per token);
  6. times transformers' greedy decode with KV cache on the same checkpoint, and checks
     that the greedy tokens match;
  7. prints a table and writes --out/decode.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DTYPES, GB, ModelShape, TimingStreamer, build_checkpoint, per_token,  # noqa: E402
                     probe_disk, probe_stream_pattern)

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.tiers.checkpoint import CheckpointIndex  # noqa: E402
from tierflow.tiers.placement import DISK  # noqa: E402

TARGET_STREAMED = 1.25
TARGET_RESIDENT = 1.15
PROMPT = [1, 415, 2936, 9060, 17354, 8309, 23517, 975, 278, 17366, 11203, 29889]   # 12 token ids
WARMUP_TOKENS = 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out/decode-model", help="checkpoint directory (and decode.json)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: fewest that make >= 1 GiB)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token is excluded from decode timing)")
    return args


def streaming_budget(path: Path, base: EngineConfig, dtype: torch.dtype) -> int:
    """The device budget that keeps the embedding and head resident and streams every
    decoder layer (1 MiB of slack: less than any layer, so placement cannot add one)."""
    index = CheckpointIndex.open(path)
    keep = {0, index.spec.num_units - 1}
    try:
        from tierflow.engine import placement_request
        from tierflow.tiers.placement import evaluate
        return evaluate(placement_request(index, base, dtype), keep).total_bytes + 2**20
    except ImportError:        # an engine version without those helpers: size it here
        spec, layers = index.spec, index.units[1:-1]
        fixed = (base.kv_reserve_tokens * spec.kv_bytes_per_token(dtype.itemsize)
                 + base.prefill_chunk_tokens * spec.activation_bytes_per_token(dtype.itemsize)
                 + base.max_num_seqs * spec.vocab_size * 4)
        slot = max(u.buffer_bytes for u in layers)
        convert = max(0 if all(t.dtype == dtype for t in u.tensors) else u.compute_bytes(dtype) for u in layers)
        resident = sum(index.units[u].compute_bytes(dtype) for u in keep)
        return fixed + (base.prefetch_depth + 1) * slot + convert + resident + 2**20


async def timed_engine_run(path: Path, config: EngineConfig, new_tokens: int) -> dict[str, Any]:
    engine = await Engine.open(path, config)
    try:
        tiers = engine.placement.tiers
        streamed_units = [engine.index.units[u] for u in engine.placement.streamed]
        await engine.generate(PROMPT, SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        stamps: list[float] = []
        tokens: list[int] = []
        first = None
        async for chunk in engine.stream(PROMPT, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            now = time.perf_counter()
            if chunk.token_ids:
                stamps += [now] * len(chunk.token_ids)
                tokens += chunk.token_ids
                if first is None:
                    first = engine.stats()
        last = engine.stats()
        modes = engine._reader.statistics().modes
    finally:
        await engine.close()
    decode_tokens = len(tokens) - 1
    window = stamps[-1] - stamps[0]
    delta = {k: getattr(last, k) - getattr(first, k) for k in
             ("bytes_streamed", "bytes_read_from_disk", "read_s", "compute_s", "stall_s", "sweeps")}
    return {
        "tokens": tokens, "timing": per_token(stamps), "decode_window_s": window,
        "tiers": list(tiers), "units_streamed": last.units_streamed, "units_resident": last.units_resident,
        "streamed_bytes_per_sweep": sum(u.buffer_bytes for u in streamed_units),
        "resident_bytes": last.resident_bytes, "staging_bytes": last.staging_bytes,
        "io_mode": last.io_mode, "reader_modes": modes,
        "decode_deltas": delta,
        "bytes_streamed_per_token": delta["bytes_streamed"] / decode_tokens,
        "achieved_gbps": delta["bytes_streamed"] / window / GB if window > 0 else 0.0,
        "read_s_per_token": delta["read_s"] / decode_tokens,
        "compute_s_per_token": delta["compute_s"] / decode_tokens,
        "stall_s_per_token": delta["stall_s"] / decode_tokens,
    }


async def tierflow_part(path: Path, dtype_name: str, new_tokens: int) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    base = EngineConfig(device="cpu", dtype=dtype_name)
    out: dict[str, Any] = {}
    weights = str(path / "model.safetensors")

    probe = await probe_disk(weights, io_threads=base.io_threads, block_bytes=base.io_block_bytes,
                             direct_io=base.direct_io)
    out["disk"] = {**asdict(probe), "gbps": probe.gbps}

    budget = streaming_budget(path, base, dtype)
    streamed_cfg = replace(base, device_memory_bytes=budget)
    index = CheckpointIndex.open(path)
    layer_layouts = list(index.units[1:-1])
    out["stream_pattern_gbps"] = await probe_stream_pattern(
        layer_layouts, io_threads=base.io_threads, block_bytes=base.io_block_bytes,
        in_flight=base.prefetch_depth + 1, direct_io=base.direct_io)

    streamed = await timed_engine_run(path, streamed_cfg, new_tokens)
    layers_on_disk = [t == DISK for t in streamed["tiers"][1:-1]]
    assert all(layers_on_disk), f"not every decoder layer streams from disk: {streamed['tiers']}"
    streamed["budget_bytes"] = budget
    out["streamed"] = streamed
    gc.collect()

    resident = await timed_engine_run(path, base, new_tokens)
    assert resident["units_streamed"] == 0, resident["tiers"]
    out["resident"] = resident
    return out


def transformers_part(path: Path, dtype_name: str, new_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name])
    model.eval()
    load_s = time.perf_counter() - started
    ids = torch.tensor([PROMPT])
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, min_new_tokens=WARMUP_TOKENS, max_new_tokens=WARMUP_TOKENS, **kwargs)
        streamer = TimingStreamer()
        out = model.generate(ids, min_new_tokens=new_tokens, max_new_tokens=new_tokens, streamer=streamer,
                             **kwargs)
    tokens = out[0, len(PROMPT):].tolist()
    del model
    gc.collect()
    return {"tokens": tokens, "timing": per_token(streamer.stamps), "load_s": load_s}


def ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def report(r: dict[str, Any], command: str, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=118, highlight=False)
    s, res, hf, disk = r["streamed"], r["resident"], r["transformers"], r["disk"]
    m = r["model"]
    console.print(f"command: {command}")
    built = "reused" if m["reused"] else f"built in {m['build_s']:.1f} s"
    console.print(f"model: {m['dir']} ({built}) "
                  f"{m['layers']} layers, hidden {m['hidden']}, {m['dtype']}, "
                  f"{m['weight_bytes'] / GB:.3f} GB of weights; torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads; prompt {len(PROMPT)} tokens, {r['new_tokens']} new tokens")

    t = Table(title="decode benchmark (time per decode token excludes the first token)", show_lines=False)
    t.add_column("figure", style="bold")
    t.add_column("value", justify="right")
    t.add_column("note")
    t.add_row("disk O_DIRECT bandwidth", f"{disk['gbps']:.3f} GB/s",
              f"whole file, {disk['io_threads']} threads x {disk['block_bytes'] >> 20} MiB blocks, mode "
              f"{disk['mode']}; passes {', '.join(f'{g:.3f}' for g in disk['passes_gbps'])}")
    t.add_row("stream-pattern I/O ceiling", f"{r['stream_pattern_gbps']:.3f} GB/s",
              "layer units in sweep order, prefetch_depth+1 in flight, no compute")
    t.add_section()
    t.add_row("streamed: placement", f"{s['units_streamed']} disk / {s['units_resident']} resident",
              f"budget {s['budget_bytes'] / GB:.3f} GB; io_mode {s['io_mode']}; tiers {''.join(x[0] for x in s['tiers'])}")
    t.add_row("streamed: time / decode token", ms(s["timing"]["mean_s"]),
              f"p50 {ms(s['timing']['p50_s'])}, min {ms(s['timing']['min_s'])}, max {ms(s['timing']['max_s'])}")
    t.add_row("streamed: bytes read / token", f"{s['bytes_streamed_per_token'] / GB:.3f} GB",
              f"static per sweep {s['streamed_bytes_per_sweep'] / GB:.3f} GB")
    t.add_row("streamed: achieved disk rate", f"{s['achieved_gbps']:.3f} GB/s",
              f"{s['achieved_gbps'] / disk['gbps']:.0%} of the measured disk bandwidth")
    t.add_row("streamed: read / compute / stall", f"{ms(s['read_s_per_token'])} / {ms(s['compute_s_per_token'])} / "
              f"{ms(s['stall_s_per_token'])}", "per decode token (read_s sums overlapping unit reads)")
    t.add_section()
    t.add_row("resident: time / decode token", ms(res["timing"]["mean_s"]),
              f"p50 {ms(res['timing']['p50_s'])}; compute {ms(res['compute_s_per_token'])}/token")
    t.add_row("transformers: time / decode token", ms(hf["timing"]["mean_s"]),
              f"p50 {ms(hf['timing']['p50_s'])}; generate() with KV cache")
    t.add_section()
    rf = r["roofline"]
    t.add_row("roofline / token", ms(rf["s"]), f"max(io {ms(rf['io_s'])}, compute {ms(rf['compute_s'])}) "
              f"-> {rf['bound']}-bound")
    ok = lambda v, target: "[green]OK[/]" if v <= target else "[red]MISS[/]"   # noqa: E731
    t.add_row("streamed / roofline", f"{r['ratios']['streamed_over_roofline']:.3f}",
              f"target <= {TARGET_STREAMED} {ok(r['ratios']['streamed_over_roofline'], TARGET_STREAMED)}")
    t.add_row("tierflow resident / transformers", f"{r['ratios']['resident_over_transformers']:.3f}",
              f"target <= {TARGET_RESIDENT} {ok(r['ratios']['resident_over_transformers'], TARGET_RESIDENT)}")
    t.add_row("greedy tokens: resident == transformers", "yes" if r["match"]["resident_vs_transformers"] else "NO",
              f"streamed == resident: {'yes' if r['match']['streamed_vs_resident'] else 'NO'}")
    console.print(t)
    console.print(f"tokens tierflow   : {res['tokens']}")
    console.print(f"tokens transformers: {hf['tokens']}")
    console.print(f"wrote {out_dir / 'decode.json'}  (total run {r['total_s']:.1f} s)")


def main() -> None:
    args = parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started = time.perf_counter()
    intermediate = 5632 if args.hidden == 2048 else int(round(args.hidden * 2.75 / 256)) * 256
    heads = max(args.hidden // 128, 1)
    shape = ModelShape(hidden=args.hidden, intermediate=intermediate, heads=heads, kv_heads=max(heads // 4, 1),
                       layers=args.layers, dtype=args.dtype).resolved()
    out_dir = Path(args.out)
    print(f"[1/4] checkpoint: {shape.layers} layers, {shape.total_bytes() / GB:.3f} GB ({args.dtype}) in {out_dir}",
          flush=True)
    t0 = time.perf_counter()
    path, reused = build_checkpoint(out_dir, shape)
    build_s = time.perf_counter() - t0
    print("[2/4] disk probe + tierflow streamed + resident runs", flush=True)
    results = asyncio.run(tierflow_part(path, args.dtype, args.new_tokens))
    print("[3/4] transformers run", flush=True)
    results["transformers"] = transformers_part(path, args.dtype, args.new_tokens)
    print("[4/4] report", flush=True)

    s, res, hf = results["streamed"], results["resident"], results["transformers"]
    io_s = s["streamed_bytes_per_sweep"] / (results["disk"]["gbps"] * GB)
    compute_s = res["timing"]["mean_s"]
    roof = max(io_s, compute_s)
    results |= {
        "command": command, "new_tokens": args.new_tokens, "prompt_tokens": len(PROMPT),
        "model": {"dir": str(path), "reused": reused, "build_s": build_s, **asdict(shape),
                  "weight_bytes": os.path.getsize(path / "model.safetensors")},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "transformers": __import__("transformers").__version__},
        "roofline": {"s": roof, "io_s": io_s, "compute_s": compute_s, "bound": "io" if io_s >= compute_s else "compute"},
        "ratios": {"streamed_over_roofline": s["timing"]["mean_s"] / roof,
                   "resident_over_transformers": res["timing"]["mean_s"] / hf["timing"]["mean_s"]},
        "match": {"resident_vs_transformers": res["tokens"] == hf["tokens"],
                  "streamed_vs_resident": s["tokens"] == res["tokens"]},
        "targets": {"streamed_over_roofline": TARGET_STREAMED, "resident_over_transformers": TARGET_RESIDENT},
    }
    results["total_s"] = time.perf_counter() - started
    (out_dir / "decode.json").write_text(json.dumps(results, indent=2))
    report(results, command, out_dir)


if __name__ == "__main__":
    main()
