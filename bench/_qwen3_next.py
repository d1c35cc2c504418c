"""The Qwen3-Next rows of bench/moe.py: many small routed experts, and a state that does not grow.

Routed rows — a random Qwen3-Next-shape checkpoint (hidden 1024; one Gated DeltaNet layer and one
gated full-attention layer; 128 experts of width 512, 10 routed per token, a shared expert; about
1.7 GB in float32) decoded greedily with the dense part resident and the routed experts read
from disk (O_DIRECT), with no expert cache and with a cache of --cache-share of the experts'
bytes: bytes read per decode token against the dense part plus the routed experts the router's
statistics say missed the cache (and any read ahead).

Long-context rows — a small model of four linear-attention layers (no full attention: all its
per-sequence memory is the state) and its 1 + 1 hybrid twin, each in a fresh process that
prefills a --long-contexts prompt and decodes 4 tokens: the process's peak RSS, and the KV
store's bytes for the sequence. The linear model's peak RSS at the longest context over the
shortest shows the state does not grow with the context; the hybrid's shows the full layer's
KV does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from tierflow import EngineConfig
from tierflow.testing import build_random_checkpoint
from tierflow.tiers.checkpoint.index import CheckpointIndex

LINEAR, FULL = "linear_attention", "full_attention"
ROUTED_SHAPE = dict(hidden_size=1024, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128, intermediate_size=512,
                    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=128,
                    num_experts_per_tok=10, norm_topk_prob=True, linear_num_key_heads=8, linear_num_value_heads=16,
                    linear_key_head_dim=64, linear_value_head_dim=64, vocab_size=8192, layer_types=[LINEAR, FULL],
                    initializer_range=0.02)
SMALL_SHAPE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=256,
                   moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                   linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
                   vocab_size=4096, max_position_embeddings=65536)
LONG_MODELS = {"linear": [LINEAR] * 4, "hybrid": [LINEAR, FULL]}


def model(directory: Path, shape: dict[str, Any]) -> Path:
    if not (directory / "config.json").exists():
        print(f"building a random Qwen3-Next-shape checkpoint in {directory} ...", file=sys.stderr)
        build_random_checkpoint(directory, "qwen3_next", **shape)
    return directory


def routed_section(out: Path, decode: Callable[..., Any], run: Callable[[Any], Any], new_tokens: int,
                   cache_share: float) -> dict[str, Any]:
    path = model(out / "qwen3-next", ROUTED_SHAPE)
    index = CheckpointIndex.open(path)
    all_experts = sum(e.buffer_bytes for e in index.experts.values())
    base = dict(device="cpu", dtype="float32", kv_reserve_tokens=512)
    runs = {"routed, no expert cache": EngineConfig(**base, expert_cache_bytes=0),
            f"routed, cache {cache_share:.0%} of experts": EngineConfig(**base,
                                                                        expert_cache_bytes=int(all_experts * cache_share))}
    results = {}
    for name, config in runs.items():
        print(f"qwen3-next: {name} ...", file=sys.stderr)
        r = results[name] = run(decode(path, config, new_tokens))
        # from the router's statistics: dense part streamed + experts picked and missed by the
        # cache (+ read ahead) × one expert's read
        reads = r["experts_missed_per_token"] + r["read_ahead_per_token"]
        r["expected_bytes_per_token"] = r["dense_streamed_per_token"] + reads * r["expert_read_bytes_mean"]
        r["bytes_vs_expected"] = r["bytes_per_token"] / r["expected_bytes_per_token"]
    spec = index.spec
    return {"model": str(path), "checkpoint_bytes": index.total_bytes, "all_expert_bytes": all_experts,
            "num_experts": spec.num_experts, "experts_per_token": spec.experts_per_token,
            "moe_layers": len(spec.moe_layers), "linear_layers": len(spec.linear_layers),
            "new_tokens": new_tokens, "runs": results,
            "tokens_equal": len({tuple(r["tokens"]) for r in results.values()}) == 1}


# the peak of this process's own memory: /proc's VmHWM (getrusage's ru_maxrss survives the exec,
# so it would report the benchmark's own peak)
CHILD = r"""
import asyncio, json, sys
from tierflow import Engine, EngineConfig, SamplingParams
path, tokens = sys.argv[1], int(sys.argv[2])
async def main():
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=tokens + 8, prefill_chunk_tokens=1024,
                          max_num_seqs=1, profile=json.loads(sys.argv[3]))
    async with await Engine.open(path, config) as engine:
        prompt = [(i * 7919) % 4000 + 10 for i in range(tokens)]
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
        pipeline = engine.pipeline_statistics()
        return len(out.token_ids), pipeline.kv_blocks
async def run():
    n, pools = await main()
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"generated": n, "peak_rss_bytes": peak}))
asyncio.run(run())
"""


def long_context_section(out: Path, contexts: list[int], profile: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for name, layer_types in LONG_MODELS.items():
        path = model(out / f"qwen3-next-{name}", dict(SMALL_SHAPE, num_layers=len(layer_types), layer_types=layer_types))
        spec = CheckpointIndex.open(path).spec
        row: dict[str, Any] = {"layers": layer_types, "state_bytes_per_sequence":
                               len(spec.linear_layers) * spec.linear_state_bytes(4),
                               "kv_bytes_per_token": 2 * spec.num_kv_heads * spec.head_dim * 4
                               * (spec.num_layers - len(spec.linear_layers)), "contexts": {}}
        for tokens in contexts:
            print(f"qwen3-next long context: {name}, {tokens} tokens ...", file=sys.stderr)
            done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tokens), json.dumps(profile)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"the long-context child failed:\n{done.stderr[-3000:]}")
            row["contexts"][str(tokens)] = json.loads(done.stdout.strip().splitlines()[-1])
        low, high = row["contexts"][str(contexts[0])], row["contexts"][str(contexts[-1])]
        row["peak_rss_ratio"] = high["peak_rss_bytes"] / low["peak_rss_bytes"]
        row["kv_growth_bytes"] = row["kv_bytes_per_token"] * (contexts[-1] - contexts[0])
        rows[name] = row
    return {"contexts": contexts, "models": rows}


def report(q: dict[str, Any]) -> None:
    if "routed" in q:
        m = q["routed"]
        print(f"\nQwen3-Next shape: {m['model']}: {m['checkpoint_bytes'] / 1e9:.2f} GB, {m['num_experts']} experts, "
              f"top-{m['experts_per_token']}, {m['linear_layers']} linear + "
              f"{m['moe_layers'] - m['linear_layers']} full layers; {m['new_tokens']} greedy tokens, float32")
        for name, r in m["runs"].items():
            print(f"  {name:<30} read {r['bytes_per_token'] / 1e6:8.1f} MB/token, expected from the router "
                  f"{r['expected_bytes_per_token'] / 1e6:8.1f} MB ({r['bytes_vs_expected']:.3f}x), picked "
                  f"{r['experts_routed_per_layer']:.1f}/layer, hit rate {r['hit_rate']:.2f}, "
                  f"{r['s_per_token'] * 1e3:.0f} ms/token")
        print(f"  tokens identical across runs: {'yes' if m['tokens_equal'] else 'NO'}")
    if "long_context" in q:
        lc = q["long_context"]
        print(f"\nQwen3-Next long context (peak RSS of a fresh process; contexts {lc['contexts']}):")
        for name, row in lc["models"].items():
            rss = ", ".join(f"{t}: {c['peak_rss_bytes'] / 2**20:.0f} MiB" for t, c in row["contexts"].items())
            print(f"  {name:<7} ({'+'.join(x.split('_')[0] for x in row['layers'])}): {rss}; ratio "
                  f"{row['peak_rss_ratio']:.3f}; state {row['state_bytes_per_sequence'] / 2**10:.0f} KiB per "
                  f"sequence at any length, KV growth {row['kv_growth_bytes'] / 2**20:.1f} MiB")
