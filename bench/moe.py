"""Mixture-of-experts benchmark: decode reads only the experts the router picks.

    python bench/moe.py [--out DIR] [--new-tokens N] [--cache-share 0.25]

One run:
  1. builds (or reuses) a random Mixtral-shape checkpoint in DIR (hidden 1024, 4 layers,
     8 experts of width 2816, top-2; about 1.2 GB in float32) with transformers;
  2. decodes --new-tokens greedy tokens, each configuration in the same process, one after
     another, with the dense part resident and the routed experts read from disk (O_DIRECT):
       routed, no expert cache        — every routed expert read when picked;
       routed, expert cache           — --cache-share of all experts' bytes kept (LRU), with prefetch;
       all experts, no cache          — every expert of every MoE layer read on every sweep,
                                         as offloaders that ignore the router do;
  3. prints per decode token: bytes read, the bytes expected from the router's picks (dense
     streamed part + experts picked and missed by the cache ÷ all experts × all experts'
     bytes + experts read ahead of the router), experts picked and read per
     layer, experts read ahead (and of those unused) per token, time, the expert-cache hit
     rate, and the ratios against reading every expert; checks the tokens agree; writes
     DIR/moe.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.testing import build_random_checkpoint

PROMPT = [1, 415, 2936, 1060, 1354, 839, 2351, 975, 278, 1736, 1103, 2988]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/moe"))
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--cache-share", type=float, default=0.25, help="expert cache as a share of all experts' bytes")
    return p.parse_args()


def model(directory: Path) -> Path:
    if (directory / "config.json").exists():
        return directory
    print(f"building a random Mixtral-shape checkpoint in {directory} ...", file=sys.stderr)
    return build_random_checkpoint(directory, "mixtral", hidden_size=1024, num_layers=4, num_heads=16,
                                   num_kv_heads=4, intermediate_size=2816, vocab_size=8192, num_local_experts=8,
                                   num_experts_per_tok=2, initializer_range=0.02)


async def decode(path: Path, config: EngineConfig, new_tokens: int) -> dict:
    async with await Engine.open(path, config) as engine:
        await engine.generate(PROMPT[:4], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm-up
        stamps, tokens, first = [], [], None
        async for chunk in engine.stream(PROMPT, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            stamps += [time.perf_counter()] * len(chunk.token_ids)
            tokens += chunk.token_ids
            if first is None:
                first, stage_first = engine.stats(), engine.pipeline_statistics().experts
        last, stage_last = engine.stats(), engine.pipeline_statistics().experts
        n = len(tokens) - 1
        experts = engine.index.experts
        spec = engine.spec
        return {
            "tokens": tokens, "s_per_token": (stamps[-1] - stamps[0]) / n,
            "bytes_per_token": (last.bytes_read_from_disk - first.bytes_read_from_disk) / n,
            "dense_streamed_per_token": (last.bytes_streamed - first.bytes_streamed) / n,
            "expert_bytes_per_token": (last.expert_bytes_read - first.expert_bytes_read) / n,
            "experts_read_per_layer": (last.expert_bytes_read - first.expert_bytes_read) / n
            / max(e.buffer_bytes for e in experts.values()) / len(spec.moe_layers),
            "experts_routed_per_layer": (last.expert_requests - first.expert_requests) / n / len(spec.moe_layers),
            "hit_rate": (last.expert_hits - first.expert_hits) / max(1, last.expert_requests - first.expert_requests),
            "read_ahead_per_token": (stage_last.prefetched - stage_first.prefetched) / n,
            "read_ahead_unused_per_token": ((stage_last.prefetched - stage_first.prefetched)
                                            - (stage_last.prefetch_used - stage_first.prefetch_used)) / n,
            "all_expert_bytes": sum(e.buffer_bytes for e in experts.values()),
            "expert_cache_bytes": engine.pipeline_statistics().experts.capacity_bytes,
            "units_resident": last.units_resident, "units_streamed": last.units_streamed,
        }


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = model(args.out / "model")
    from tierflow.tiers.checkpoint.index import CheckpointIndex
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
        print(f"{name} ...", file=sys.stderr)
        results[name] = asyncio.run(decode(path, config, args.new_tokens))
    every = results["all experts, no cache"]
    spec = index.spec
    print(f"model {path}: {index.total_bytes / 1e9:.2f} GB, {spec.num_experts} experts per layer, top-"
          f"{spec.experts_per_token}, {len(spec.moe_layers)} MoE layers; all experts {all_experts / 1e9:.2f} GB; "
          f"{args.new_tokens} greedy tokens")
    head = (f"{'run':<34}{'read/token':>12}{'expected':>11}{'picked/layer':>13}{'read/layer':>12}"
            f"{'ahead/unused':>14}{'time/token':>12}{'hit rate':>10}{'bytes vs all':>14}{'time vs all':>13}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        # from the router's picks, not the reads: dense part streamed + (experts picked and not
        # found in the cache ÷ all experts) × all experts' bytes, + the experts read ahead (a
        # read-ahead expert the router then picks counts as a hit, but it was read)
        expert = r["all_expert_bytes"] / (spec.num_experts * len(spec.moe_layers))
        r["expected_bytes_per_token"] = r["dense_streamed_per_token"] + (
            r["experts_routed_per_layer"] * (1 - r["hit_rate"]) / spec.num_experts) * r["all_expert_bytes"] + (
            r["read_ahead_per_token"] * expert)
        r["bytes_vs_all"] = r["bytes_per_token"] / every["bytes_per_token"]
        r["time_vs_all"] = r["s_per_token"] / every["s_per_token"]
        r["tokens_equal_all"] = r["tokens"] == every["tokens"]
        print(f"{name:<34}{r['bytes_per_token'] / 1e6:>9.1f} MB{r['expected_bytes_per_token'] / 1e6:>8.1f} MB"
              f"{r['experts_routed_per_layer']:>13.2f}{r['experts_read_per_layer']:>7.2f} of {spec.num_experts}"
              f"{r['read_ahead_per_token']:>8.2f}/{r['read_ahead_unused_per_token']:<5.2f}"
              f"{r['s_per_token'] * 1e3:>9.1f} ms"
              f"{r['hit_rate']:>10.2f}{r['bytes_vs_all']:>14.3f}{r['time_vs_all']:>13.3f}")
    same = all(r["tokens_equal_all"] for r in results.values())
    print(f"tokens identical across runs: {'yes' if same else 'NO'}")
    out = {"command": "python bench/moe.py " + shlex.join(sys.argv[1:]), "model": str(path),
           "checkpoint_bytes": index.total_bytes, "all_expert_bytes": all_experts, "runs": results}
    (args.out / "moe.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out / 'moe.json'}")


if __name__ == "__main__":
    main()
