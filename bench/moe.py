"""Mixture-of-experts benchmark: decode reads only the experts the router picks, and MXFP4
experts cost a quarter of the bytes of bf16 ones.

    python bench/moe.py [--out DIR] [--results JSON] [--sections mixtral,gpt-oss,qwen3-next,qwen3-next-long]
                        [--new-tokens N] [--cache-share 0.25] [--gpt-oss-tokens N] [--rounds R]
                        [--long-contexts 2048,16384]

One run (every section by default):

Mixtral rows —
  1. builds (or reuses) a random Mixtral-shape checkpoint in DIR/model (hidden 1024, 4 layers,
     8 experts of width 2816, top-2; about 1.2 GB in float32) with transformers;
  2. decodes --new-tokens greedy tokens in float32, each configuration in the same process, one
     after another, with the dense part resident and the routed experts read from disk (O_DIRECT):
       routed, no expert cache        — every routed expert read when picked;
       routed, expert cache           — --cache-share of all experts' bytes kept (LRU), with prefetch;
       all experts, no cache          — every expert of every MoE layer read on every sweep,
                                         as offloaders that ignore the router do;
  3. prints per decode token: bytes read, the bytes expected from the router's picks (dense
     streamed part + experts picked and missed by the cache ÷ all experts × all experts'
     bytes + experts read ahead of the router), experts picked and read per layer, experts read
     ahead (and of those unused) per token, time, the expert-cache hit rate, and the ratios
     against reading every expert; checks the tokens agree.

gpt-oss rows —
  1. builds (or reuses) in DIR/gpt-oss a random gpt-oss-shape checkpoint (gpt-oss-20b's layer:
     hidden 2880, 64 query / 8 KV heads, 32 experts of width 2880, top-4, sliding window 128 on
     alternate layers, YaRN; 3 layers and a vocabulary of 8192) with its experts in MXFP4 (1.27
     GB), and its bf16 twin: the same model with the experts dequantized (bench/_gpt_oss.py);
  2. in --rounds interleaved rounds (MXFP4 first in odd rounds, bf16 first in even ones), decodes
     --gpt-oss-tokens greedy tokens from a 2-token prompt on each, in bfloat16 compute for both
     (the twin's weights are the dequantized MXFP4 ones, so the tokens must be identical), dense
     part resident, routed experts read with O_DIRECT: with no expert cache, then with
     --cache-share of that checkpoint's expert bytes cached. The prompt is short because a
     prefill routes its tokens to nearly every expert, and on a CPU each MXFP4 expert is
     dequantized at every use;
  3. prints per decode token: bytes read; the bytes expected from the expert stage's counts (dense
     streamed part + experts read on a miss or ahead × one expert's read, its aligned byte ranges:
     checked between the smallest and the largest expert's read, which differ by the 4 KiB
     alignment of its ranges); routed experts × an expert's own bytes (``mxfp4.packed_bytes`` + biases); time; the
     MXFP4 ÷ bf16 ratios of bytes and time; whether the tokens are identical; and the other CPU
     load during each run (the machine is shared).

Qwen3-Next rows (``bench/_qwen3_next.py``) — a random Qwen3-Next-shape checkpoint (Gated DeltaNet
and gated full attention, 128 small experts, 10 routed per token, a shared expert; 1.7 GB):
bytes read per decode token against the router's statistics, with and without the expert
cache; and (qwen3-next-long) the peak RSS of an all-linear-attention model and of a hybrid one
at each of --long-contexts, each in a fresh process.

Writes the JSON (--results, default DIR/moe.json) and a PNG chart of the headline ratios beside it.
The engines get a hardware profile (PROFILE): it only sizes the placement (the dense part fits
resident either way; the expert cache is set explicitly), and it spares the probe, whose compute
measurement runs a MoE checkpoint's layer as a dense one.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuMonitor, loadavg, write_results  # noqa: E402
from _gpt_oss import GptOssShape, build_pair, report_gpt_oss, summarize  # noqa: E402
import _qwen3_next  # noqa: E402

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.testing import build_random_checkpoint  # noqa: E402
from tierflow.tiers.checkpoint.index import CheckpointIndex  # noqa: E402

PROMPT = [1, 415, 2936, 1060, 1354, 839, 2351, 975, 278, 1736, 1103, 2988]
GPT_OSS_PROMPT = [415, 2936]
PROFILE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 16 * 2**30,
                                      "host_memory_bytes": 16 * 2**30, "disk_read_gbps": 1.0,
                                      "decode_gbps": 20.0, "prefill_tflops": 0.1}}
FORMATS = ("mxfp4", "bf16")
SECTIONS = ("mixtral", "gpt-oss", "qwen3-next", "qwen3-next-long")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/moe"))
    p.add_argument("--results", type=Path, help="where to write the JSON (default DIR/moe.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--long-contexts", default="2048,16384", help="qwen3-next-long: prompt lengths")
    p.add_argument("--new-tokens", type=int, default=24, help="Mixtral rows: greedy tokens per run")
    p.add_argument("--cache-share", type=float, default=0.25, help="expert cache as a share of all experts' bytes")
    p.add_argument("--gpt-oss-tokens", type=int, default=8, help="gpt-oss rows: greedy tokens per run")
    p.add_argument("--rounds", type=int, default=2, help="gpt-oss rows: interleaved rounds")
    return p.parse_args()


def mixtral_model(directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    print(f"building a random Mixtral-shape checkpoint in {directory} ...", file=sys.stderr)
    return build_random_checkpoint(directory, "mixtral", hidden_size=1024, num_layers=4, num_heads=16,
                                   num_kv_heads=4, intermediate_size=2816, vocab_size=8192, num_local_experts=8,
                                   num_experts_per_tok=2, initializer_range=0.02)


async def decode(path: Path, config: EngineConfig, new_tokens: int, prompt: list[int] = PROMPT) -> dict[str, Any]:
    """Greedy decode after a warm-up; engine and expert-stage deltas per decode token (first token excluded)."""
    async with await Engine.open(path, config) as engine:
        await engine.generate(prompt[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm-up
        cpu = CpuMonitor()
        stamps, tokens, first = [], [], None
        async for chunk in engine.stream(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            stamps += [time.perf_counter()] * len(chunk.token_ids)
            tokens += chunk.token_ids
            if first is None:
                first, stage_first = engine.stats(), engine.pipeline_statistics().experts
        last, stage_last = engine.stats(), engine.pipeline_statistics().experts
        n = len(tokens) - 1
        experts = engine.index.experts
        layers = len(engine.spec.moe_layers)
        sizes = [e.buffer_bytes for e in experts.values()]
        expert_read_bytes = max(sizes)
        return {
            "tokens": tokens, "s_per_token": (stamps[-1] - stamps[0]) / n,
            "bytes_per_token": (last.bytes_read_from_disk - first.bytes_read_from_disk) / n,
            "dense_streamed_per_token": (last.bytes_streamed - first.bytes_streamed) / n,
            "expert_bytes_per_token": (last.expert_bytes_read - first.expert_bytes_read) / n,
            "experts_read_per_layer": (last.expert_bytes_read - first.expert_bytes_read) / n / expert_read_bytes / layers,
            "experts_routed_per_layer": (last.expert_requests - first.expert_requests) / n / layers,
            "experts_missed_per_token": (stage_last.misses - stage_first.misses) / n,
            "hit_rate": (last.expert_hits - first.expert_hits) / max(1, last.expert_requests - first.expert_requests),
            "read_ahead_per_token": (stage_last.prefetched - stage_first.prefetched) / n,
            "read_ahead_unused_per_token": ((stage_last.prefetched - stage_first.prefetched)
                                            - (stage_last.prefetch_used - stage_first.prefetch_used)) / n,
            "expert_read_bytes": expert_read_bytes, "expert_read_bytes_min": min(sizes),
            "expert_read_bytes_mean": sum(sizes) / len(sizes),
            "expert_payload_bytes": max(e.payload_bytes for e in experts.values()),
            "all_expert_bytes": sum(e.buffer_bytes for e in experts.values()),
            "expert_cache_bytes": stage_last.capacity_bytes,
            "units_resident": last.units_resident, "units_streamed": last.units_streamed,
            "foreign_cpu_load": cpu.foreign_load(),
        }


# --------------------------------------------------------------------------- Mixtral rows
def mixtral_section(args: argparse.Namespace) -> dict[str, Any]:
    path = mixtral_model(args.out / "model")
    index = CheckpointIndex.open(path)
    all_experts = sum(e.buffer_bytes for e in index.experts.values())
    base = dict(device="cpu", dtype="float32", kv_reserve_tokens=512)
    runs = {
        "routed, no expert cache": EngineConfig(**base, expert_cache_bytes=0),
        f"routed, cache {args.cache_share:.0%} of experts": EngineConfig(
            **base, expert_cache_bytes=int(all_experts * args.cache_share)),
        "all experts, no cache": EngineConfig(**base, expert_cache_bytes=0, expert_reads="all"),
    }
    results = {}
    for name, config in runs.items():
        print(f"mixtral: {name} ...", file=sys.stderr)
        results[name] = asyncio.run(decode(path, config, args.new_tokens))
    every, spec = results["all experts, no cache"], index.spec
    for r in results.values():
        # from the router's picks, not the reads: dense part streamed + (experts picked and not
        # found in the cache ÷ all experts) × all experts' bytes, + the experts read ahead (a
        # read-ahead expert the router then picks counts as a hit, but it was read)
        r["expected_bytes_per_token"] = r["dense_streamed_per_token"] + (
            r["experts_routed_per_layer"] * (1 - r["hit_rate"]) / spec.num_experts) * r["all_expert_bytes"] + (
            r["read_ahead_per_token"] * r["expert_read_bytes"])
        r["bytes_vs_all"] = r["bytes_per_token"] / every["bytes_per_token"]
        r["time_vs_all"] = r["s_per_token"] / every["s_per_token"]
        r["tokens_equal_all"] = r["tokens"] == every["tokens"]
    return {"model": str(path), "checkpoint_bytes": index.total_bytes, "all_expert_bytes": all_experts,
            "num_experts": spec.num_experts, "experts_per_token": spec.experts_per_token,
            "moe_layers": len(spec.moe_layers), "new_tokens": args.new_tokens, "dtype": "float32", "runs": results}


def report_mixtral(m: dict[str, Any]) -> None:
    print(f"\nMixtral: {m['model']}: {m['checkpoint_bytes'] / 1e9:.2f} GB, {m['num_experts']} experts per layer, top-"
          f"{m['experts_per_token']}, {m['moe_layers']} MoE layers; all experts {m['all_expert_bytes'] / 1e9:.2f} GB; "
          f"{m['new_tokens']} greedy tokens, {m['dtype']}")
    head = (f"{'run':<34}{'read/token':>12}{'expected':>11}{'picked/layer':>13}{'read/layer':>12}"
            f"{'ahead/unused':>14}{'time/token':>12}{'hit rate':>10}{'bytes vs all':>14}{'time vs all':>13}")
    print(head + "\n" + "-" * len(head))
    for name, r in m["runs"].items():
        print(f"{name:<34}{r['bytes_per_token'] / 1e6:>9.1f} MB{r['expected_bytes_per_token'] / 1e6:>8.1f} MB"
              f"{r['experts_routed_per_layer']:>13.2f}{r['experts_read_per_layer']:>7.2f} of {m['num_experts']}"
              f"{r['read_ahead_per_token']:>8.2f}/{r['read_ahead_unused_per_token']:<5.2f}"
              f"{r['s_per_token'] * 1e3:>9.1f} ms{r['hit_rate']:>10.2f}{r['bytes_vs_all']:>14.3f}{r['time_vs_all']:>13.3f}")
    same = all(r["tokens_equal_all"] for r in m["runs"].values())
    print(f"tokens identical across runs: {'yes' if same else 'NO'}")


# --------------------------------------------------------------------------- gpt-oss rows
def gpt_oss_section(args: argparse.Namespace) -> dict[str, Any]:
    shape = GptOssShape()
    paths = dict(zip(FORMATS, build_pair(args.out / "gpt-oss", shape, log=lambda s: print(s, file=sys.stderr))[:2]))
    expert_bytes = {f: sum(e.buffer_bytes for e in CheckpointIndex.open(p).experts.values()) for f, p in paths.items()}
    caches = {"no expert cache": 0.0, f"cache {args.cache_share:.0%} of experts": args.cache_share}
    rounds: list[dict[str, dict[str, Any]]] = []
    for k in range(args.rounds):
        row: dict[str, dict[str, Any]] = {}
        for cache, share in caches.items():
            for fmt in FORMATS if k % 2 == 0 else FORMATS[::-1]:
                print(f"gpt-oss round {k + 1}: {fmt}, {cache} ...", file=sys.stderr)
                config = EngineConfig(device="cpu", dtype="bfloat16", kv_reserve_tokens=512, profile=PROFILE,
                                      expert_cache_bytes=int(expert_bytes[fmt] * share))
                r = asyncio.run(decode(paths[fmt], config, args.gpt_oss_tokens, GPT_OSS_PROMPT))
                # the experts read (on a miss or ahead) × one expert's read; its aligned ranges make
                # that 4 KiB or so more or less from expert to expert, so the check takes the bounds
                reads = r["experts_missed_per_token"] + r["read_ahead_per_token"]
                r["expected_bytes_per_token"] = r["dense_streamed_per_token"] + reads * r["expert_read_bytes_mean"]
                r["bytes_within_expected"] = (r["dense_streamed_per_token"] + reads * r["expert_read_bytes_min"]
                                              <= r["bytes_per_token"] <= r["dense_streamed_per_token"]
                                              + reads * r["expert_read_bytes"])
                r["bytes_all_experts_and_dense"] = r["bytes_per_token"] == (r["dense_streamed_per_token"]
                                                                            + r["expert_bytes_per_token"])
                r["nominal_expert_bytes"] = shape.expert_packed_bytes() if fmt == "mxfp4" else shape.expert_bf16_bytes()
                r["routed_nominal_bytes_per_token"] = (r["experts_routed_per_layer"] * shape.layers
                                                       * r["nominal_expert_bytes"])
                row[f"{fmt}, {cache}"] = r
        rounds.append(row)
    summary = summarize(rounds, list(caches))
    return {"models": {f: str(p) for f, p in paths.items()}, "shape": asdict(shape),
            "all_expert_bytes": expert_bytes, "dtype": "bfloat16", "prompt": GPT_OSS_PROMPT,
            "new_tokens": args.gpt_oss_tokens, "cache_share": args.cache_share,
            "nominal_expert_bytes": {"mxfp4": shape.expert_packed_bytes(), "bf16": shape.expert_bf16_bytes()},
            "nominal_bytes_ratio": shape.expert_packed_bytes() / shape.expert_bf16_bytes(),
            "rounds": rounds, "summary": summary}


# --------------------------------------------------------------------------- chart, main
def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["mixtral"] if "mixtral" in result else []) + (["bytes", "time"] if "gpt_oss" in result else []) + \
        (["qwen3-next"] if "routed" in result.get("qwen3_next", {}) else []) + \
        (["qwen3-next-long"] if "long_context" in result.get("qwen3_next", {}) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), dpi=90, squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "mixtral":
            _paired_bars(ax, result["mixtral"]["runs"], (("bytes", lambda r: r["bytes_vs_all"]),
                                                         ("time", lambda r: r["time_vs_all"])),
                         "÷ reading every expert", "Mixtral shape: routed reads")
            continue
        if key == "qwen3-next":
            _paired_bars(ax, result["qwen3_next"]["routed"]["runs"],
                         (("read", lambda r: r["bytes_per_token"] / 1e6),
                          ("expected from the router", lambda r: r["expected_bytes_per_token"] / 1e6)),
                         "MB per decode token", "Qwen3-Next shape: routed reads")
            continue
        if key == "qwen3-next-long":
            lc = result["qwen3_next"]["long_context"]
            for offset, (name, row) in zip((-0.2, 0.2), lc["models"].items()):
                ax.bar([i + offset for i in range(len(lc["contexts"]))],
                       [row["contexts"][str(t)]["peak_rss_bytes"] / 2**20 for t in lc["contexts"]], 0.4,
                       label=f"{name} (x{row['peak_rss_ratio']:.2f})")
            ax.set_xticks(range(len(lc["contexts"])), [f"{t} tokens" for t in lc["contexts"]], fontsize=7)
            ax.set_ylabel("peak RSS, MiB")
            ax.set_title("Qwen3-Next: memory vs context", fontsize=9)
            ax.legend(fontsize=7)
            continue
        summary = result["gpt_oss"]["summary"]
        names = list(summary)
        scale, unit, ratio = (1e-6, "MB read", "bytes_ratio") if key == "bytes" else (1.0, "s", "time_ratio")
        figure = "bytes_per_token" if key == "bytes" else "s_per_token"
        for offset, fmt, color in ((-0.2, "mxfp4", "C2"), (0.2, "bf16", "C7")):
            bars = ax.bar([i + offset for i in range(len(names))],
                          [summary[n][f"{fmt}_{figure}"] * scale for n in names], 0.4, color=color,
                          label="MXFP4" if fmt == "mxfp4" else "bf16")
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(names)), [f"{n}\nMXFP4 ÷ bf16 = {summary[n][ratio]:.3g}" for n in names], fontsize=7)
        ax.set_ylabel(f"{unit} per decode token")
        ax.set_title(f"gpt-oss shape, CPU: {'bytes' if key == 'bytes' else 'time'} per token", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _paired_bars(ax: Any, runs: dict[str, Any], series: Any, ylabel: str, title: str) -> None:
    """Two bars per run: ``series`` is ((label, value of a run), (label, value of a run))."""
    names = list(runs)
    x = range(len(names))
    for offset, (label, value) in zip((-0.2, 0.2), series):
        ax.bar([i + offset for i in x], [value(runs[n]) for n in names], 0.4, label=label)
    ax.set_xticks(list(x), [n.replace(", ", "\n") for n in names], fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def report(result: dict[str, Any]) -> None:
    print(f"command: {result['command']}; load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    if "mixtral" in result:
        report_mixtral(result["mixtral"])
    if "gpt_oss" in result:
        report_gpt_oss(result["gpt_oss"])
    if "qwen3_next" in result:
        _qwen3_next.report(result["qwen3_next"])


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        raise SystemExit(f"--sections takes some of {', '.join(SECTIONS)}, got {args.sections!r}")
    result: dict[str, Any] = {"command": "python bench/moe.py " + shlex.join(sys.argv[1:]), "loadavg_before": loadavg()}
    if "mixtral" in sections:
        result["mixtral"] = mixtral_section(args)
    if "gpt-oss" in sections:
        result["gpt_oss"] = gpt_oss_section(args)
    if "qwen3-next" in sections:
        result.setdefault("qwen3_next", {})["routed"] = _qwen3_next.routed_section(
            args.out, decode, asyncio.run, args.new_tokens, args.cache_share)
    if "qwen3-next-long" in sections:
        result.setdefault("qwen3_next", {})["long_context"] = _qwen3_next.long_context_section(
            args.out, [int(t) for t in args.long_contexts.split(",")], PROFILE)
    result["loadavg_after"] = loadavg()
    write_results(result, args.results or args.out / "moe.json", chart, report)


if __name__ == "__main__":
    main()
