"""Long-context GPU benchmark: a Llama-3.1-8B-shape model, 100k tokens of context, an 8 GiB GPU budget and a
paged KV cache over GPU, host RAM and disk; decode against its roofline from the same run, beside oLLM's
published figures for Llama-3.1-8B at 100k context.

Sections (each result, or error, goes into --out/gpu_long.json when it ends; --out is bench/gpu.py's, whose
checkpoint and hardware-probe cache are reused):
  build:     the random 8B-shape bf16 checkpoint (131072 positions) in --out/model, as bench/gpu.py builds it;
  bandwidth: disk (O_DIRECT, the engine's reader) and host->device rates, as gpu.py's disk and pcie sections;
  host:      device_memory_bytes = the budget, kv_reserve_tokens = context + new tokens, paged KV: --kv-device-gib
             (1 GiB, 8192 tokens) on the GPU, the rest in host RAM (kv_host_bytes 24 GiB). Pinned host memory is
             capped to that KV, the host embedding and the staging ring, so that the weights stream from disk as
             oLLM's do (with 128 GiB of RAM the planner would otherwise keep them in RAM);
  disk:      the same with kv_host_bytes = 0: the rest of the KV in a spill file in --out/kv-spill;
  resident:  no budget, all the KV on the GPU through the same paged attention (16 GB weights + 13 GB KV): the
             compute term of the rooflines, and the reference for the greedy tokens.
Each of the last three: a 2-token warm-up, a streamed greedy generate of --new-tokens after --context random token
ids (seed 0); time to first token (the prefill, in --prefill-chunk tokens a sweep; 0: the planner's choice), decode
time per token (first excluded), peak GPU memory (torch; nvidia-smi net of its reading before the engine opened),
peak RSS (VmHWM, reset before the engine opened), spill file size, engine.stats(), KV blocks per tier.

Decode roofline per token (attention reads every layer's whole context, so each KV block off the GPU crosses
once per token; checkpoint and spill file share the disk): max of disk_s = (weights streamed + KV on disk) /
disk GB/s, pcie_s = (weights streamed + host-tier weights + KV on host and on disk) / PCIe GB/s (CUDA only),
compute_s = resident's decode time per token (once that has run); ratio = roofline / measured.

oLLM's README (github.com/Mega4alik/ollm; quoted with commits in OLLM below), in a table headed "8GB Nvidia 3060
Ti Inference memory usage": llama3-8B-chat at 100k, ~6.6 GB VRAM, 69 GB SSD; its README of 0.1.3 (gone in 0.2.0):
"Example performance: ~20 min for the first token, ~17s per subsequent token", no GPU named for it. No SSD is
named. Printed beside ours: other GPU, disk and PCIe link, so not like for like.

Rough times, D = disk GB/s (~5 GB of layers stay on the GPU, ~10 GB stream per sweep; paged attention adds an
estimated 1-2 min to the prefill): bandwidth 64 GB / D; host 2 min + 320 GB / D; disk 2 min + 580 GB / D (the
prefill re-reads spilled KV, each decode token 12 GB of it); resident ~3 min. Commands there stop at 10 min:
    python bench/gpu_long.py --out /tmp/gpubench --sections build,bandwidth    # + ~3 min if it builds the model
    python bench/gpu_long.py --out /tmp/gpubench --resume --sections host
    python bench/gpu_long.py --out /tmp/gpubench --resume --sections disk      # add --new-tokens 8 if D < 2
    python bench/gpu_long.py --out /tmp/gpubench --resume --sections resident
--tiny: gpu.py's small model (hidden 256, 2 layers), 2048 tokens, chunks of 512, a 14 MiB budget (every unit
streams), 256 KiB of KV on the device; on the CPU without a GPU (PCIe and nvidia-smi recorded as skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))     # tierflow from this checkout when not installed
from _common import GB, PROMPT, peak_rss, per_token, print_table, quiesce  # noqa: E402
from gpu import (LLAMA31_8B, TINY, Bench, Skipped, config_record, ensure_model, environment, fmt_gb,  # noqa: E402
                 fmt_s, memory_record, ok, roofline, run_sections, say, seconds, section_disk,
                 section_pcie, start_memory_tracking, stats_record, warm_probe)

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.tiers.checkpoint.index import CheckpointIndex  # noqa: E402
from tierflow.tiers.plan.planner import KV_BLOCK_TOKENS  # noqa: E402

SECTIONS = ("build", "bandwidth", "host", "disk", "resident")
VARIANTS = ("host", "disk", "resident")
WARMUP_TOKENS, PROMPT_SEED, PROGRESS_S = 2, 0, 30.0
STAGING_SLOTS = 3                  # the planner's preferred prefetch depth (2) + 1 pinned read buffers
OLLM = {       # oLLM's README.md at two commits, quoted; GB as written there (decimal or binary not said)
    "source": "https://github.com/Mega4alik/ollm/blob/main/README.md", "model": "Llama-3.1-8B-Instruct",
    "hardware": "NVIDIA RTX 3060 Ti, 8 GB (the table's heading); SSD, CPU and PCIe link not named",
    "table": {"version": "1.0.3", "commit": "739ee8ddcfe43dc21b60f1c9f4bed5ce8b3550f1", "date": "2025-10-30",
              "heading": "8GB Nvidia 3060 Ti Inference memory usage", "row": "Model | Weights | Context length | "
              "KV cache | Baseline VRAM (no offload) | oLLM GPU VRAM | oLLM Disk (SSD): llama3-8B-chat | 16 GB (bf16) "
              "| 100k | 52.4 GB | ~71 GB | ~6.6 GB | 69 GB"},
    "speed": {"version": "0.1.3", "commit": "e07f7fd881ff8eb94bc6bd4ebd7e30f45969b386", "date": "2025-08-26",
              "quote": "It enables running models like Llama-3.1-8B-Instruct on 100k context using ~$200 consumer GPU "
                       "with 8GB VRAM.  Example performance: ~20 min for the first token, ~17s per subsequent token.",
              "note": "removed from the README in 0.2.0 (commit b380293e, 2025-09-02); no later speed figure for it"},
    "gpu_vram_bytes": 6.6e9, "disk_bytes": 69e9, "first_token_s": 20 * 60.0, "s_per_token": 17.0,
    "kv_note": "their KV cache (52.4 GB) is 4x this shape's bf16 KV at 100k: 32 x 8 x 128 x 2 x 2 x 1e5 = 13.1 GB"}


@dataclasses.dataclass
class LongBench(Bench):
    context: int = 100_000
    prefill_chunk_tokens: int | None = 8192
    kv_device_bytes: int = 2**30
    kv_host_bytes: int = 24 * 2**30

    @functools.cached_property
    def prompt(self) -> list[int]:     # type: ignore[override]
        gen = torch.Generator().manual_seed(PROMPT_SEED)
        return torch.randint(0, self.shape.vocab, (self.context,), generator=gen).tolist()

    def __post_init__(self) -> None:
        self.reserve_tokens, self.spill_dir = self.context + self.new_tokens, self.out / "kv-spill"

    def kv_bytes(self, tokens: int) -> int:
        """bf16 K and V of ``tokens`` tokens in every layer, in whole blocks."""
        s = self.shape
        return -(-tokens // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS * s.layers * s.kv_heads * s.head_dim * 2 * 2


# --------------------------------------------------------------------------- sections
def section_bandwidth(b: LongBench) -> dict[str, Any]:
    try:
        pcie = section_pcie(b)
    except Skipped as exc:
        pcie = {"skipped": str(exc)}
    return {"disk": section_disk(b), "pcie": pcie}


def variant_config(b: LongBench, variant: str) -> EngineConfig:
    common: dict[str, Any] = {"device": b.device, "dtype": "bfloat16", "kv_reserve_tokens": b.reserve_tokens,
                              "prefill_chunk_tokens": b.prefill_chunk_tokens, "kv_cache_dir": str(b.spill_dir)}
    if variant == "resident":
        return EngineConfig(**common, kv_device_bytes=b.kv_bytes(b.reserve_tokens), kv_host_bytes=0)
    host_kv = b.kv_host_bytes if variant == "host" else 0
    return EngineConfig(**common, device_memory_bytes=b.budget_bytes, kv_device_bytes=b.kv_device_bytes,
                        kv_host_bytes=host_kv, host_memory_bytes=host_cap(b, host_kv))


def host_cap(b: LongBench, host_kv: int) -> int | None:
    """Pinned host memory for the plan: the KV's host share, the embedding, the staging ring and 64 MiB
    (the disk KV read window, alignment), so that no more than a few units fit beside them."""
    if not b.cuda:
        return None      # on the CPU there is no separate host tier
    units = CheckpointIndex.open(b.model_dir).units
    kv = min(host_kv, max(0, b.kv_bytes(b.reserve_tokens) - b.kv_device_bytes))
    return kv + units[0].buffer_bytes + STAGING_SLOTS * max(u.buffer_bytes for u in units) + 64 * 2**20


def section_variant(b: LongBench, variant: str) -> dict[str, Any]:
    ensure_model(b)
    shutil.rmtree(b.spill_dir, ignore_errors=True)    # a spill file left by an interrupted run
    config = variant_config(b, variant)

    async def run() -> dict[str, Any]:
        probe_run = await warm_probe(b)
        monitor, rss_before = start_memory_tracking(b), peak_rss(reset=True)
        try:
            info = await timed_long(b, config)
        finally:
            memory = memory_record(b, monitor, budgeted=config.device_memory_bytes is not None)
        return info | {"memory": memory, "rss": {"before_open": rss_before, "after": peak_rss()},
                       "warm_probe": probe_run}

    return asyncio.run(run()) | {"context": b.context, "new_tokens": b.new_tokens}


async def timed_long(b: LongBench, config: EngineConfig) -> dict[str, Any]:
    started = time.perf_counter()
    engine = await Engine.open(b.model_dir, config)
    plan = engine.plan
    host_units = [u for u in plan.units_in("host") if u != 0]      # an embedding on the host uploads rows only
    info: dict[str, Any] = {
        "config": config_record(config), "open_s": time.perf_counter() - started, "plan": plan.to_json(),
        "tier_counts": dict(collections.Counter(plan.tiers)), "prefill_chunk_tokens": plan.prefill_chunk_tokens,
        "predicted_decode_s_per_token": plan.predicted.decode_s_per_token, "attention": engine.attention_backend,
        "host_bytes_per_sweep": sum(engine.index.units[u].buffer_bytes for u in host_units),
        "kv_block_bytes": plan.kv_block_tokens * engine.costs.kv_bytes_per_token_layer,
        "hardware": dataclasses.asdict(engine.hardware), "hardware_source": engine.hardware_source}
    say(f"engine open in {info['open_s']:.1f} s: tiers {info['tier_counts']}, prefill chunk "
        f"{plan.prefill_chunk_tokens}, predicted {plan.predicted.decode_s_per_token * 1e3:.1f} ms/token "
        f"({plan.predicted.bottleneck}-bound), attention {engine.attention_backend}")
    try:
        warm = [t % b.shape.vocab for t in PROMPT]
        await engine.generate(warm, SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        await quiesce(engine)
        say(f"warm-up ({WARMUP_TOKENS} tokens) done; prefill of {b.context} tokens ...")
        info |= await generate_long(engine, b)
        info["kv_read_bytes_per_token"] = {t: p["used"] * info["kv_block_bytes"]
                                           for t, p in info["kv_blocks_after_prefill"].items()}
        spill = [p for p in b.spill_dir.iterdir() if p.is_file()] if b.spill_dir.is_dir() else []   # close() removes it
        info |= {"spill": {"files": len(spill), "bytes": sum(p.stat().st_size for p in spill)},
                 "stats": stats_record(engine.stats())}
    finally:
        await engine.close()
    return info


async def generate_long(engine: Engine, b: LongBench) -> dict[str, Any]:
    """One streamed greedy generate after the long prompt; stats deltas of the prefill and of the decode."""
    before, first, kv_first, stamps, tokens = engine.stats(), None, None, [], []
    started = time.perf_counter()

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            s = engine.stats()
            say(f"{time.perf_counter() - started:.0f} s: prompt {s.prompt_tokens - before.prompt_tokens}/{b.context}, "
                f"{len(tokens)}/{b.new_tokens} generated, "
                f"{(s.bytes_read_from_disk - before.bytes_read_from_disk) / GB:.1f} GB of weights read")

    reporter = asyncio.create_task(progress())
    try:
        async for chunk in engine.stream(b.prompt, SamplingParams(max_new_tokens=b.new_tokens, ignore_eos=True)):
            now = time.perf_counter()
            if chunk.token_ids:
                stamps += [now] * len(chunk.token_ids)
                tokens += chunk.token_ids
                if first is None:
                    pools = engine.pipeline_statistics().kv_blocks
                    kv_first = {t: {"capacity": p.capacity, "used": p.used}
                                for t, p in (pools.by_tier() if pools else {}).items()}
                    first = engine.stats()
                    say(f"first token after {now - started:.1f} s; KV blocks {kv_first}")
    finally:
        reporter.cancel()
    last, n, timing = engine.stats(), len(tokens) - 1, per_token(stamps)
    keys = ("bytes_streamed", "bytes_read_from_disk", "read_s", "compute_s", "stall_s", "sweeps", "prompt_tokens")
    say(f"decode: {timing['mean_s'] * 1e3:.1f} ms/token over {n} tokens")
    return {"tokens": tokens, "prompt_seed": PROMPT_SEED, "prompt_head": b.prompt[:8], "prefill_s": stamps[0] - started,
            "timing": timing, "s_per_token": timing["mean_s"], "kv_blocks_after_prefill": kv_first,
            "prefill_deltas": {k: getattr(first, k) - getattr(before, k) for k in keys},
            "decode_deltas": {k: getattr(last, k) - getattr(first, k) for k in keys},
            "bytes_streamed_per_token": (last.bytes_streamed - first.bytes_streamed) / n}


# --------------------------------------------------------------------------- summary and report
def summarize(r: dict[str, Any]) -> dict[str, Any]:
    bw = r["bandwidth"] if ok(r.get("bandwidth")) else {}
    pcie = bw["pcie"].get("gbps") if bw else None
    compute = r["resident"]["s_per_token"] if ok(r.get("resident")) else None
    out: dict[str, Any] = {"pcie_gbps": pcie, "compute_s_per_token": compute,
                           "compute_note": None if compute is not None else "resident not run: no compute term"}
    for name in ("host", "disk"):
        s = r.get(name)
        if not ok(s):
            continue
        disk = bw["disk"]["gbps"] if bw else None
        kv, w_disk, w_host = s["kv_read_bytes_per_token"], s["bytes_streamed_per_token"], s["host_bytes_per_sweep"]
        terms = {"disk_s": seconds(w_disk + kv.get("disk", 0), disk)}
        if r["cuda"]:
            terms["pcie_s"] = seconds(w_disk + w_host + kv.get("host", 0) + kv.get("disk", 0), pcie)
        if compute is not None:
            terms["compute_s"] = compute
        out[name] = roofline(s["s_per_token"], terms) | {
            "disk_gbps": disk, "weights_disk_bytes_per_token": w_disk, "weights_host_bytes_per_token": w_host,
            "kv_host_bytes_per_token": kv.get("host", 0), "kv_disk_bytes_per_token": kv.get("disk", 0)}
    got = {n: r[n]["tokens"] for n in VARIANTS[::-1] if ok(r.get(n))}     # resident first: the reference
    ref = next(iter(got), None)
    out["tokens"] = {"reference": ref, "agree": {n: t == got[ref] for n, t in got.items() if n != ref},
                     "first_difference": {n: next((i for i, (x, y) in enumerate(zip(t, got[ref])) if x != y), None)
                                          for n, t in got.items() if n != ref}}
    out["ollm"] = {n: beside_ollm(r, r[n]) for n in ("host", "disk") if ok(r.get(n))}
    return out


def beside_ollm(r: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    smi = (s["memory"].get("nvidia_smi") or {}).get("net_peak_bytes")
    vram = smi if smi is not None else s["memory"].get("torch_max_reserved_bytes")
    disk = (r["build"]["weight_bytes"] if ok(r.get("build")) else 0) + s["spill"]["bytes"]
    return {"gpu_vram_bytes": vram, "disk_bytes": disk, "first_token_s": s["prefill_s"],
            "s_per_token": s["s_per_token"],
            "note": "oLLM's figures are from an RTX 3060 Ti and an unnamed SSD: other hardware, not like for like"}


def variant_row(name: str, s: dict[str, Any] | None, y: dict[str, Any]) -> list[str]:
    if not ok(s):
        return [name, "not run" if s is None else "skipped" if "skipped" in s else "FAILED"] + [""] * 7
    m, used = s["memory"], s["kv_blocks_after_prefill"] or {}
    smi = (m.get("nvidia_smi") or {}).get("net_peak_bytes")
    return [name, f"{s['prefill_s']:.1f} s", fmt_s(s["s_per_token"]),
            f"{fmt_s(y['roofline_s'])} ({y['bound'].removesuffix('_s')})" if y.get("bound") else "-",
            f"{y['roofline_over_measured']:.3f}" if y.get("roofline_over_measured") else "-",
            ",".join(f"{t} {p['used']}" for t, p in used.items()),
            f"{fmt_gb(m['torch_max_allocated_bytes'])} / {fmt_gb(m['torch_max_reserved_bytes'])} / {fmt_gb(smi)}"
            if "torch_max_reserved_bytes" in m else "-",
            fmt_gb(s["rss"]["after"]["peak_bytes"]), fmt_gb(s["spill"]["bytes"])]


def report(r: dict[str, Any]) -> None:
    e, x, bw = r["environment"], r["summary"], r.get("bandwidth")
    print(f"\ncommand: {r['command']}\n{e['gpu'] or 'no GPU'}; torch {e['torch']} (CUDA {e['cuda']}); {r['date']}")
    print(f"model {r['shape']}; context {r['context']} random token ids, {r['new_tokens']} new tokens greedy; "
          f"budget {fmt_gb(r['budget_bytes'])}, KV on the device {fmt_gb(r['kv_device_bytes'])}")
    if ok(bw):
        print(f"disk {bw['disk']['gbps']:.2f} GB/s ({bw['disk']['mode']}); PCIe "
              + (f"{bw['pcie']['gbps']:.2f} GB/s" if "gbps" in bw["pcie"] else bw["pcie"]["skipped"]))
    head = ["section", "first token", "s/token", "roofline", "ratio", "KV blocks used",
            "peak VRAM alloc / reserved / smi net", "peak RSS", "spill"]
    print_table([head] + [variant_row(n, r.get(n), x.get(n, {})) for n in VARIANTS])
    for name in SECTIONS:
        s = r.get(name) or {}
        if "skipped" in s or "error" in s:
            print(f"{name}: {s.get('skipped') or s['error']}")
    for name in ("host", "disk"):
        if name in x:
            y = x[name]
            print(f"{name} roofline terms: {', '.join(f'{k} {fmt_s(v)}' for k, v in y['terms'].items())} (weights "
                  f"{fmt_gb(y['weights_disk_bytes_per_token'])} from disk, KV {fmt_gb(y['kv_host_bytes_per_token'])} "
                  f"host + {fmt_gb(y['kv_disk_bytes_per_token'])} disk per token); tiers {r[name]['tier_counts']}")
    print(f"greedy tokens against {x['tokens']['reference']}: {x['tokens']['agree'] or 'nothing to compare'}")
    print(f"\noLLM as published ({OLLM['hardware']}; quotes in {r['json']}):")
    gb, sec = (lambda v: f"{v / GB:.2f} GB"), (lambda v: f"{v:.3g} s")      # noqa: E731
    rows = [["", "oLLM (3060 Ti)"] + [f"tierflow {n}" for n in x["ollm"]]]
    for key, label, fmt in (("gpu_vram_bytes", "GPU memory", gb), ("disk_bytes", "disk used", gb),
                            ("first_token_s", "first token", sec), ("s_per_token", "s per token", sec)):
        rows.append([label, fmt(OLLM[key])] + [fmt(o[key]) if o[key] is not None else "-" for o in x["ollm"].values()])
    print_table(rows)
    print(f"wrote {r['json']}")


# --------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out/gpu", help="bench/gpu.py's --out: the model, gpu_long.json, kv-spill/")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--resume", action="store_true", help="keep --out/gpu_long.json, skip sections that succeeded")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 100000; --tiny: 2048)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens (default 16; --tiny: 8)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill sweep, 0: the planner's "
                                                                   "choice (default 8192; --tiny: 512)")
    p.add_argument("--budget-gib", type=float, default=None, help="GPU memory budget (default 8; --tiny: 14 MiB)")
    p.add_argument("--kv-device-gib", type=float, default=None, help="KV on the GPU (default 1; --tiny: 256 KiB)")
    p.add_argument("--tiny", action="store_true", help="a small model, for checking the script end to end")
    args = p.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.sections) - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(set(args.sections) - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    defaults = {"context": (100_000, 2048), "new_tokens": (16, 8), "prefill_chunk": (8192, 512),
                "budget_gib": (8.0, 14 / 1024), "kv_device_gib": (1.0, 1 / 4096)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.new_tokens < 2 or args.context < 1 or args.prefill_chunk < 0:
        p.error("need --new-tokens >= 2 (the first token is not timed as decode), --context >= 1, --prefill-chunk >= 0")
    return args


def save(results: dict[str, Any], json_path: Path) -> None:
    results["summary"] = summarize(results)
    json_path.write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TIERFLOW_CACHE_DIR", str(out / "probe-cache"))    # bench/gpu.py's probe, reused
    json_path, cuda = out / "gpu_long.json", torch.cuda.is_available()
    b = LongBench(out=out, shape=TINY if args.tiny else LLAMA31_8B, device="cuda" if cuda else "cpu",
                  budget_bytes=int(args.budget_gib * 2**30), host_bytes=0, new_tokens=args.new_tokens, rounds=1,
                  command="python " + shlex.join(sys.argv), context=args.context,
                  prefill_chunk_tokens=args.prefill_chunk or None, kv_device_bytes=int(args.kv_device_gib * 2**30),
                  kv_host_bytes=24 * 2**(20 if args.tiny else 30))
    results: dict[str, Any] = json.loads(json_path.read_text()) if args.resume and json_path.exists() else {}
    if results and (results.get("shape"), results.get("context")) != (dataclasses.asdict(b.shape), b.context):
        print(f"note: {json_path} is for another model or context; starting afresh", flush=True)
        results = {}
    results |= dataclasses.asdict(b) | {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(),
                                        "cuda": cuda, "json": str(json_path), "ollm_published": OLLM}
    runners = {"build": ensure_model, "bandwidth": section_bandwidth,
               **{v: functools.partial(section_variant, variant=v) for v in VARIANTS}}
    run_sections(b, [s for s in SECTIONS if s in args.sections], runners, results, json_path, args.resume,
                 lambda r: save(r, json_path))
    save(results, json_path)
    report(results)


if __name__ == "__main__":
    main()
