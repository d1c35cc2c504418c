"""Offload benchmark: a model bigger than the RAM left to it, every decoder layer from disk —
tierflow against accelerate's disk offload and transformers' device_map offload.

    python bench/offload.py [--layers 25] [--hidden 2048] [--dtype float32] [--new-tokens 6] [--rounds 3]
                            [--ram-fraction 0.8] [--model-dir bench/out/offload-model]
                            [--out bench/results/offload-cpu.json]

One run:
  1. builds (once; reused later) a random Llama with transformers' own LlamaForCausalLM and
     save_pretrained (safetensors), and accelerate's offload folder of it (its .dat files);
  2. locks RAM away in a helper process (mlock; released at the end) so that the RAM
     available is --ram-fraction x the model's size: no one can keep the model in RAM;
  3. in --rounds interleaved rounds (the order rotates), runs each of these in its own
     process, with the page cache of every model file dropped before each:
       tierflow      Engine, every decoder layer on disk (profile overrides), embedding and
                     head resident; O_DIRECT reads into its staging buffers;
       accelerate    init_empty_weights + disk_offload(model, offload folder): every weight
                     read from its memory-mapped .dat files at every forward;
       transformers  from_pretrained(device_map="auto", max_memory={"cpu": what tierflow
                     keeps resident}, offload_folder=...): the layers that do not fit are
                     read from the safetensors file at every forward;
     each a greedy decode of the same prompt (the first token, the prefill, is not timed);
  4. before every round and after the last, measures raw O_DIRECT read bandwidth: the whole
     checkpoint file through tierflow's DiskReader (the plan's threads and block size) into a
     freshly allocated ring of staging buffers (2 MiB pages made at once; their layout is
     printed);
  5. prints s/token, bytes streamed per token, achieved GB/s, the ratios, the tokens of all
     three (they must match), the machine's load, and writes --out (JSON) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (GB, PROMPT, CpuMonitor, MemoryLock, ModelShape, TimingStreamer,  # noqa: E402
                     build_transformers_llama, drop_page_cache, engine_plan_figures, loadavg, max_segments,
                     mem_available_bytes, per_token, print_table, streamed_profile)

PEERS = ("tierflow", "accelerate", "transformers")
TARGET_OF_RAW = 0.9


# --------------------------------------------------------------------------- workers (one process each)
def disk_read_bytes() -> int:
    """Bytes this process made the block layer read (/proc/self/io read_bytes): O_DIRECT and
    page-cache misses count, page-cache hits do not."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_tierflow(model: Path, new_tokens: int) -> dict[str, Any]:
    from tierflow import Engine, EngineConfig, SamplingParams
    from tierflow.tiers.io.staging import buffer_layout

    async def go() -> dict[str, Any]:
        started = time.perf_counter()
        engine = await Engine.open(model, EngineConfig(device="cpu", dtype="float32", profile=streamed_profile(model)))
        load_s = time.perf_counter() - started
        try:
            tiers = list(engine.plan.tiers)
            assert all(t == "disk" for t in tiers[1:-1]), f"a decoder layer is not on disk: {tiers}"
            cpu, stamps, tokens, first, io_first = CpuMonitor(), [], [], None, 0
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            async for chunk in engine.stream(PROMPT, params):
                if chunk.token_ids:
                    stamps += [time.perf_counter()] * len(chunk.token_ids)
                    tokens += chunk.token_ids
                    if first is None:
                        first, io_first = engine.stats(), disk_read_bytes()
            io_last, last = disk_read_bytes(), engine.stats()
            # The engine's staging slots (private attributes: diagnostics only).
            stream = getattr(getattr(engine, "_runtime", None), "stream", None)
            slots = list(getattr(getattr(stream, "_ring", None), "slots", []) or [])
            layouts = [buffer_layout(s, engine.plan.io_block_bytes) for s in slots]
            n = len(tokens) - 1
            return {"tokens": tokens, "stamps": stamps, "load_s": load_s,
                    "streamed_bytes_per_token": (last.bytes_streamed - first.bytes_streamed) / n,
                    "disk_bytes_per_token": (io_last - io_first) / n,
                    "placement": {"tiers": tiers, "resident_bytes": last.resident_bytes,
                                  "staging_bytes": last.staging_bytes, "io_mode": last.io_mode},
                    "read_s_per_token": (last.read_s - first.read_s) / n,
                    "compute_s_per_token": (last.compute_s - first.compute_s) / n,
                    "stall_s_per_token": (last.stall_s - first.stall_s) / n,
                    "slot_layouts": [x.as_dict() for x in layouts], "foreign_cpu_load": cpu.foreign_load()}
        finally:
            await engine.close()
    return asyncio.run(go())


class _IoStreamer(TimingStreamer):
    """Token stamps, and the process's disk reads when the first new token arrived."""

    io_first = 0

    def put(self, value: torch.Tensor) -> None:
        seen = self._prompt_seen
        super().put(value)
        if seen and len(self.stamps) == 1:
            self.io_first = disk_read_bytes()


def hf_decode(model: Any, new_tokens: int) -> dict[str, Any]:
    cpu, streamer = CpuMonitor(), _IoStreamer()
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None, streamer=streamer)
    n = len(streamer.stamps) - 1
    return {"tokens": out[0, len(PROMPT):].tolist(), "stamps": streamer.stamps,
            "disk_bytes_per_token": (disk_read_bytes() - streamer.io_first) / n, "foreign_cpu_load": cpu.foreign_load()}


def run_accelerate(model: Path, folder: Path, new_tokens: int) -> dict[str, Any]:
    from accelerate import disk_offload, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(model)
    with init_empty_weights():
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    disk_offload(lm, folder, execution_device=torch.device("cpu"))
    load_s = time.perf_counter() - started
    streamed = sum(p.numel() * p.element_size() for p in lm.parameters())   # every weight, every forward
    return {**hf_decode(lm, new_tokens), "load_s": load_s, "streamed_bytes_per_token": streamed,
            "placement": {"offloaded": "all weights (disk_offload)", "offload_folder": str(folder)}}


def run_transformers(model: Path, folder: Path, new_tokens: int, cpu_bytes: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, device_map="auto",
                                              max_memory={"cpu": cpu_bytes}, offload_folder=str(folder)).eval()
    load_s = time.perf_counter() - started
    device_map = dict(getattr(lm, "hf_device_map", {}))
    on_disk = [name for name, where in device_map.items() if where == "disk"]
    # Offloaded parameters sit on the meta device with their shapes: enough to count bytes.
    streamed = sum(p.numel() * p.element_size() for name, p in lm.named_parameters()
                   if any(name == m or name.startswith(m + ".") for m in on_disk))
    return {**hf_decode(lm, new_tokens), "load_s": load_s, "streamed_bytes_per_token": streamed,
            "placement": {"device_map": device_map, "max_memory_cpu_bytes": cpu_bytes, "modules_on_disk": len(on_disk)}}


def worker(args: argparse.Namespace) -> None:
    model = Path(args.model_dir)
    if args.worker == "tierflow":
        out = run_tierflow(model, args.new_tokens)
    elif args.worker == "accelerate":
        out = run_accelerate(model, accelerate_folder(model), args.new_tokens)
    else:
        out = run_transformers(model, transformers_folder(model), args.new_tokens, args.cpu_bytes)
    out |= {"timing": per_token(out["stamps"]), "peak_rss_bytes": peak_rss_bytes(),
            "available_at_end_bytes": mem_available_bytes()}
    Path(args.result).write_text(json.dumps(out))


# --------------------------------------------------------------------------- the run
def accelerate_folder(model: Path) -> Path:
    return model.with_name(model.name + "-accelerate-offload")


def transformers_folder(model: Path) -> Path:
    return model.with_name(model.name + "-transformers-offload")


def build_accelerate_folder(model: Path) -> bool:
    """accelerate's offload folder (one .dat file per weight + index.json), written once from
    the checkpoint one tensor at a time; True if it was there already."""
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    folder = accelerate_folder(model)
    if (folder / "index.json").exists():
        return True
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                index = offload_weight(f.get_tensor(name), name, str(folder), index=index)
    for dat in folder.glob("*.dat"):
        fd = os.open(dat, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    save_offload_index(index, str(folder))
    return False


def drop_model_caches(model: Path) -> None:
    for path in list(model.glob("*.safetensors")) + list(accelerate_folder(model).glob("*.dat")) + \
            list(transformers_folder(model).glob("*")):
        if path.is_file():
            drop_page_cache(path)


def raw_odirect(weights: Path, plan: dict[str, int]) -> dict[str, Any]:
    """The whole file through tierflow's DiskReader into a ring of freshly made staging buffers.

    Called with the model files' page cache dropped, as each engine starts: with the cache
    left full by a peer that read through it, MADV_COLLAPSE was seen to leave a fresh ring
    38-41% in huge pages (200+ pieces per 8 MiB), which lowers this ceiling and would flatter
    the ratio; the layout of every ring is kept beside its figure."""
    from tierflow.tiers.checkpoint.index import ALIGN_BYTES, ByteRange, UnitLayout
    from tierflow.tiers.io.reader import DiskReader
    from tierflow.tiers.io.staging import staging_empty
    from tierflow.tiers.probe.measure import read_pass, ring_layout
    from tierflow.tiers.io.staging import buffer_layout

    slot = plan["slot_bytes"]
    size = -(-os.path.getsize(weights) // ALIGN_BYTES) * ALIGN_BYTES
    chunks = [UnitLayout(-1, f"c{i}", (ByteRange(str(weights), s, min(slot, size - s), 0),), (),
                         min(slot, size - s), min(slot, size - s)) for i, s in enumerate(range(0, size, slot))]
    ring = [staging_empty(slot) for _ in range(plan["num_slots"])]
    for b in ring:
        b.fill_(1)
    layout = ring_layout([buffer_layout(b, plan["block_bytes"]) for b in ring])
    reader = DiskReader([str(weights)], io_threads=plan["io_threads"], block_bytes=plan["block_bytes"])
    try:
        seconds = asyncio.run(read_pass(reader, chunks, ring))
        mode = set(reader.statistics().modes.values())
    finally:
        reader.close()
    return {"gbps": sum(c.buffer_bytes for c in chunks) / seconds / GB, "bytes": size, "buffers": layout,
            "io_mode": mode.pop() if len(mode) == 1 else "mixed", "loadavg": loadavg()}


def spawn(name: str, args: argparse.Namespace, cpu_bytes: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", name, "--result", str(result), "--model-dir", args.model_dir,
           "--new-tokens", str(args.new_tokens), "--cpu-bytes", str(cpu_bytes)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.worker_timeout)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}", "wall_s": time.perf_counter() - started}
        return json.loads(result.read_text()) | {"wall_s": time.perf_counter() - started}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout} s", "wall_s": time.perf_counter() - started}
    finally:
        result.unlink(missing_ok=True)


def summarize(runs: dict[str, list[dict[str, Any]]], raws: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    out: dict[str, Any] = {"raw_odirect_gbps": med(r["gbps"] for r in raws),
                           "raw_odirect_rounds_gbps": [r["gbps"] for r in raws]}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[name] = {"errors": [r["error"] for r in rs]}
            continue
        s = [r["timing"]["mean_s"] for r in ok]
        out[name] = {"s_per_token": med(s), "rounds_s_per_token": s,
                     "streamed_bytes_per_token": med(r["streamed_bytes_per_token"] for r in ok),
                     "disk_bytes_per_token": med(r["disk_bytes_per_token"] for r in ok),
                     "achieved_gbps": med(r["streamed_bytes_per_token"] / r["timing"]["mean_s"] / GB for r in ok),
                     "load_s": med(r["load_s"] for r in ok), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
                     "foreign_cpu_load": max(r["foreign_cpu_load"] for r in ok),
                     "errors": [r["error"] for r in rs if "error" in r]}
    tf = runs["tierflow"]
    # Each tierflow round against the raw bandwidth measured right before and right after it.
    per_round = [r["streamed_bytes_per_token"] / r["timing"]["mean_s"] / GB / med([raws[k]["gbps"], raws[k + 1]["gbps"]])
                 for k, r in enumerate(tf) if "error" not in r]
    if per_round:
        out["tierflow_over_raw"] = med(per_round)
        out["tierflow_over_raw_rounds"] = per_round
        out["tierflow_over_raw_of_medians"] = out["tierflow"]["achieved_gbps"] / out["raw_odirect_gbps"]
    out["raw_rings_not_all_huge"] = sum(1 for r in raws if (r["buffers"].get("huge_fraction") or 0) < 1)
    for peer in ("accelerate", "transformers"):
        pairs = [(a["timing"]["mean_s"], b["timing"]["mean_s"]) for a, b in zip(tf, runs[peer])
                 if "error" not in a and "error" not in b]
        if pairs:
            out[f"{peer}_over_tierflow_s_per_token"] = med(b / a for a, b in pairs)
            out[f"{peer}_over_tierflow_rounds"] = [b / a for a, b in pairs]
    tokens = {name: [r["tokens"] for r in rs if "error" not in r] for name, rs in runs.items()}
    reference = next((t[0] for t in tokens.values() if t), None)
    out["tokens_match"] = all(t == reference for ts in tokens.values() for t in ts)
    out["tokens"] = {name: ts[0] if ts else None for name, ts in tokens.items()}
    return out


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = doc["summary"]
    names = [n for n in PEERS if "s_per_token" in x[n]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(names, [x[n]["s_per_token"] for n in names], color=["tab:green", "tab:gray", "tab:blue"][:len(names)])
    left.bar_label(bars, fmt="%.2f s")
    left.set_ylabel("decode s / token (lower is better)")
    left.set_title("greedy decode, every layer from disk", fontsize=9)
    labels = ["raw O_DIRECT"] + names
    values = [x["raw_odirect_gbps"]] + [x[n]["achieved_gbps"] for n in names]
    bars = right.bar(labels, values, color=["black", "tab:green", "tab:gray", "tab:blue"][:len(labels)])
    right.bar_label(bars, fmt="%.2f")
    right.set_ylabel("GB/s (bytes streamed per token / s per token)")
    right.set_title("achieved disk rate", fontsize=9)
    m = doc["model"]
    fig.suptitle(f"{m['weight_bytes'] / GB:.2f} GB {m['dtype']} Llama, {doc['lock']['available_after_bytes'] / GB:.1f} GB "
                 f"RAM available ({doc['ram_fraction']:.1f} x model), {doc['environment']['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(doc: dict[str, Any]) -> None:
    x, m = doc["summary"], doc["model"]
    print(f"\ncommand: {doc['command']}")
    print(f"model: {m['layers']} layers, hidden {m['hidden']}, {m['dtype']}, {m['weight_bytes'] / GB:.2f} GB; RAM "
          f"available while locked {doc['lock']['available_after_bytes'] / GB:.2f} GB ({doc['lock']['locked_bytes'] / GB:.1f} "
          f"GB locked away); {doc['new_tokens']} new tokens x {doc['rounds']} rounds, first token not timed")
    rows = [["", "s / token", "GB streamed / token", "disk GB read / token", "achieved GB/s", "peak RSS GB", "load s"]]
    for n in PEERS:
        r = x[n]
        if "s_per_token" not in r:
            rows.append([n, "failed: " + r["errors"][0][:80], "", "", "", "", ""])
            continue
        rows.append([n, f"{r['s_per_token']:.3f}", f"{r['streamed_bytes_per_token'] / GB:.3f}",
                     f"{r['disk_bytes_per_token'] / GB:.3f}", f"{r['achieved_gbps']:.3f}",
                     f"{r['peak_rss_bytes'] / GB:.2f}", f"{r['load_s']:.1f}"])
    rows.append(["raw O_DIRECT", "", "", "", f"{x['raw_odirect_gbps']:.3f}", "", ""])
    print_table(rows)
    print(f"raw O_DIRECT: the whole file into fresh staging buffers, before each round and after the last: "
          f"{', '.join(f'{v:.2f}' for v in x['raw_odirect_rounds_gbps'])} GB/s; device max_segments {doc['max_segments']}")
    for k, raw in enumerate(doc["raw"]):
        print(f"  measurement {k + 1}: {raw['gbps']:.2f} GB/s into {raw['buffers']['layout']}")
    if "tierflow_over_raw" in x:
        verdict = "met" if x["tierflow_over_raw"] >= TARGET_OF_RAW else "NOT met"
        print(f"tierflow achieved / raw O_DIRECT: {x['tierflow_over_raw']:.3f} (target >= {TARGET_OF_RAW}: {verdict}); "
              f"rounds {', '.join(f'{v:.3f}' for v in x['tierflow_over_raw_rounds'])} (each against the raw figures "
              f"before and after it); of medians {x['tierflow_over_raw_of_medians']:.3f}")
    for peer in ("accelerate", "transformers"):
        key = f"{peer}_over_tierflow_s_per_token"
        if key in x:
            print(f"{peer} s/token / tierflow s/token: {x[key]:.2f} (tierflow {x[key]:.2f}x faster); rounds "
                  f"{', '.join(f'{v:.2f}' for v in x[f'{peer}_over_tierflow_rounds'])}")
    for k, run in enumerate(doc["runs"]["tierflow"]):
        if run.get("slot_layouts"):
            worst = max(run["slot_layouts"], key=lambda s: s["pieces_per_block"] or 0)
            print(f"tierflow's staging slots, round {k + 1}: worst of {len(run['slot_layouts'])}: {worst['layout']}")
    print(f"greedy tokens match across all three: {'yes' if x['tokens_match'] else 'NO'}")
    for n, t in x["tokens"].items():
        print(f"  {n:12s} {t}")
    load = max(x[n].get("foreign_cpu_load", 0) for n in PEERS)
    print(f"other load: loadavg {doc['loadavg_start']} at the start, {doc['loadavg_end']} at the end; other processes "
          f"kept up to {load:.2f} CPUs busy during the timed decodes" + (" (noisy)" if load > 0.2 else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=25)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--dtype", choices=("float32",), default="float32")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ram-fraction", type=float, default=0.8, help="RAM left available, as a fraction of the model")
    p.add_argument("--model-dir", default="bench/out/offload-model")
    p.add_argument("--out", default="bench/results/offload-cpu.json")
    p.add_argument("--worker-timeout", type=int, default=420)
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--cpu-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token is not timed)")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    started, load_start = time.perf_counter(), loadavg()
    shape = ModelShape(hidden=args.hidden, intermediate=5632 if args.hidden == 2048 else args.hidden * 11 // 4,
                       heads=max(args.hidden // 128, 1), kv_heads=max(args.hidden // 512, 1), layers=args.layers,
                       dtype=args.dtype)
    model = Path(args.model_dir)
    print(f"[1/4] checkpoint: {shape.layers} layers, {shape.total_bytes() / GB:.2f} GB in {model}", flush=True)
    t0 = time.perf_counter()
    _, reused = build_transformers_llama(model, shape)
    accelerate_reused = build_accelerate_folder(model)
    build_s = time.perf_counter() - t0
    weights = sorted(model.glob("*.safetensors"))
    weight_bytes = sum(w.stat().st_size for w in weights)
    plan = engine_plan_figures(model)
    resident = plan["resident_bytes"]
    leave = int(args.ram_fraction * weight_bytes)
    print(f"[2/4] locking RAM until {leave / GB:.2f} GB stay available", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in PEERS}
    raws: list[dict[str, Any]] = []
    drop_model_caches(model)
    with MemoryLock(leave) as lock:
        print(f"      locked {lock.locked_bytes / GB:.1f} GB; {lock.available_after / GB:.2f} GB available", flush=True)
        print(f"[3/4] {args.rounds} rounds of {', '.join(PEERS)} (rotating order), {args.new_tokens} new tokens each",
              flush=True)
        for r in range(args.rounds):
            drop_model_caches(model)          # the state each engine starts in (see raw_odirect)
            raws.append(raw_odirect(weights[0], plan))
            print(f"      raw O_DIRECT {raws[-1]['gbps']:.2f} GB/s ({raws[-1]['buffers']['layout']})", flush=True)
            order = PEERS[r % 3:] + PEERS[:r % 3]
            for name in order:
                drop_model_caches(model)
                got = spawn(name, args, resident)
                runs[name].append(got)
                print(f"      round {r + 1} {name:12s} " + (got["error"][-300:] if "error" in got else
                      f"{got['timing']['mean_s']:.3f} s/token, {got['streamed_bytes_per_token'] / GB:.2f} GB streamed / "
                      f"token, disk {got['disk_bytes_per_token'] / GB:.2f} GB / token ({got['wall_s']:.0f} s)"), flush=True)
        drop_model_caches(model)
        raws.append(raw_odirect(weights[0], plan))
        print(f"      raw O_DIRECT {raws[-1]['gbps']:.2f} GB/s ({raws[-1]['buffers']['layout']})", flush=True)
    lock_record = lock.as_dict()          # after the helper has gone: its own record included
    drop_model_caches(model)
    print("[4/4] report", flush=True)
    import accelerate
    import transformers
    doc = {"command": command, "new_tokens": args.new_tokens, "rounds": args.rounds, "ram_fraction": args.ram_fraction,
           "prompt_tokens": len(PROMPT),
           "model": {"dir": str(model), "reused": reused, "accelerate_folder_reused": accelerate_reused,
                     "build_s": build_s, "weight_bytes": weight_bytes, **shape.__dict__},
           "plan": plan, "lock": lock_record, "max_segments": max_segments(str(weights[0])),
           "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "accelerate": accelerate.__version__, "python": platform.python_version(),
                           "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "kernel": platform.release(),
                           "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()},
           "loadavg_start": load_start, "loadavg_end": loadavg(), "targets": {"tierflow_over_raw": TARGET_OF_RAW},
           "summary": summarize(runs, raws), "raw": raws, "runs": runs}
    doc["total_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rs in runs.values():
        for r in rs:
            r.pop("stamps", None)
    out.write_text(json.dumps(doc, indent=1))
    chart(doc, out.with_suffix(".png"))
    report(doc)
    print(f"wrote {out} and {out.with_suffix('.png')} (total {doc['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
