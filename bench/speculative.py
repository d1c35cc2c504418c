"""Speculative decoding benchmark: tokens per weight sweep and tokens/s against plain decoding,
every decoder layer streamed from disk, greedy, with the output checked identical.

    python bench/speculative.py [--out DIR] [--results JSON] [--sections random,smollm2]
                                [--new-tokens N] [--k K] [--eps 0.05,0.1,0.2,1.0] [--tree-width W]

One run (both sections by default); in each row plain decoding and speculative decoding run on
the same model and prompt, one after the other in this process:

random rows (a >= 1 GB target with a small draft, acceptance set honestly by construction) —
  1. builds (or reuses) in DIR a random Llama draft (hidden 1024, 16 query / 4 KV heads, MLP
     4096, vocabulary 8192, 2 layers, float32) with transformers, and for each ε of --eps a target
     made of the draft's 2 layers plus 15 more whose attention and MLP output projections are
     scaled by ε (``tierflow.testing.layer_copy``): the target's residual stream is the draft's
     plus ε-sized contributions, so ε sets how often the draft's greedy token is the target's;
     about 1.1 GB each;
  2. decodes --new-tokens greedy tokens from a 32-token random prompt with every target layer
     pinned to disk (O_DIRECT reads; embedding and head resident), plainly, with
     ``SpeculativeConfig(method="draft", num_speculative_tokens=K)`` (a chain), the draft
     resident, and with ``tree_width=W`` as well (a candidate tree: the draft's next W - 1 best
     tokens beside each of its K proposals);
  3. prints per row: acceptance, tokens per weight sweep (decode tokens ÷ decode sweeps), bytes
     read per generated token, tokens/s of each and the speed-up, and whether the tokens are
     identical.

smollm2 row (real weights: the bundled SmolLM2-135M-Instruct) —
  a document-grounded request (a short technical document in the prompt, asked to quote its
  second paragraph word for word) decoded plainly and with ``method="ngram"`` (prompt lookup),
  every decoder layer on disk, chain and tree; the same figures.

Writes the JSON (--results, default DIR/speculative.json) and a PNG chart beside it. Speed-ups
are ratios within one run; the other CPU load during each decode is printed (the machine may be
shared).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import CpuMonitor, loadavg, streamed_profile, write_results  # noqa: E402

from tierflow import Engine, EngineConfig, SamplingParams, SpeculativeConfig  # noqa: E402
from tierflow.testing import build_random_checkpoint, layer_copy  # noqa: E402
from tierflow.tiers.checkpoint.index import CheckpointIndex  # noqa: E402

HARDWARE = {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34, "disk_read_gbps": 1.0,
            "decode_gbps": 10.0, "prefill_tflops": 0.05}
DRAFT_LAYERS, EXTRA_LAYERS = 2, 15
DOCUMENT = """Release notes for the storage service, version 4.2.

The write path now batches small appends into one log record per flush, which cuts the number of
disk writes by about a third under heavy load. Readers see no change: a record is visible as soon
as its flush returns.

Compaction runs in the background at a lower priority than foreground reads and writes. It never
holds a lock on a segment that a reader has open, and it stops when free space drops below five
percent, so that it cannot itself fill the disk.

The configuration file gains one key, compaction_threads, which defaults to two. Setting it to zero
turns compaction off, which is only advisable for read-only replicas."""
QUESTION = "Quote the second paragraph of the document above exactly, word for word, and nothing else."


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-speculative"))
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--sections", default="random,smollm2")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    p.add_argument("--eps", default="0.05,0.1,0.2,1.0", help="the targets' perturbation scales")
    p.add_argument("--tree-width", type=int, default=3, help="the candidate trees' tree_width")
    return p.parse_args()


def profile(path: Path) -> dict[str, Any]:
    return {**streamed_profile(path), "hardware": HARDWARE}


async def decode(path: Path, config: EngineConfig, prompt: Any, new_tokens: int) -> dict[str, Any]:
    """Greedy decode after a warm-up; figures over the decode tokens (the first token, which
    the prefill sweep gives, excluded)."""
    async with await Engine.open(path, config) as engine:
        await engine.generate([1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True))     # warm-up
        cpu = CpuMonitor()
        before = engine.stats()
        tokens, first, since = [], None, 0.0
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        async for chunk in engine.stream(prompt, params):
            tokens += chunk.token_ids
            if first is None:       # after the prefill's token: what follows is decoding
                first, since = engine.stats(), time.perf_counter()
        decode_s = time.perf_counter() - since
        last = engine.stats()
        # the request's decode sweeps: all its sweeps but its prefill chunks' (``sweeps`` counts
        # a sweep when it is scheduled, so a snapshot after the first token may include the next)
        prompt = last.prompt_tokens - before.prompt_tokens
        n = last.tokens_generated - before.tokens_generated - 1
        sweeps = last.sweeps - before.sweeps - -(-prompt // engine.plan.prefill_chunk_tokens)
        spec, before = last.speculative, first.speculative
        proposed = spec.proposed_tokens - before.proposed_tokens if spec else 0
        accepted = spec.accepted_tokens - before.accepted_tokens if spec else 0
        alternatives = spec.alternatives_accepted - before.alternatives_accepted if spec else 0
        offered = spec.alternatives_proposed - before.alternatives_proposed if spec else 0
        return {
            "tokens": tokens, "decode_tokens": n, "decode_sweeps": sweeps, "decode_s": decode_s,
            "tokens_per_s": n / decode_s, "tokens_per_sweep": n / sweeps,
            "bytes_per_token": (last.bytes_read_from_disk - first.bytes_read_from_disk) / n,
            "prompt_tokens": prompt,
            "proposed": proposed, "accepted": accepted,
            # the chain's acceptance (a tree's alternatives left out), as stats() reports it
            "acceptance": (accepted - alternatives) / (proposed - offered) if proposed > offered else None,
            "alternatives_proposed": offered, "alternatives_accepted": alternatives,
            "units_streamed": last.units_streamed, "foreign_cpu_load": cpu.foreign_load(),
        }


def compare(plain: dict[str, Any], spec: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    """A row: the chain's figures against plain decoding (``speculative``), the tree's beside them."""
    def against(run: dict[str, Any]) -> dict[str, Any]:
        return {"identical": plain["tokens"] == run["tokens"], "speedup": run["tokens_per_s"] / plain["tokens_per_s"],
                "bytes_per_token_ratio": run["bytes_per_token"] / plain["bytes_per_token"]}
    return {"plain": plain, "speculative": spec, **against(spec), "tree": {"speculative": tree, **against(tree)}}


def _tree(config: EngineConfig, width: int) -> EngineConfig:
    assert config.speculative is not None
    return dataclasses.replace(config, speculative=dataclasses.replace(config.speculative, tree_width=width))


def random_section(args: argparse.Namespace) -> dict[str, Any]:
    draft = args.out / "draft"
    if not (draft / "config.json").exists():
        print(f"building the draft in {draft} ...", file=sys.stderr)
        build_random_checkpoint(draft, "llama", hidden_size=1024, num_layers=DRAFT_LAYERS, num_heads=16,
                                num_kv_heads=4, intermediate_size=4096, vocab_size=8192, initializer_range=0.02,
                                seed=7)
    prompt = random.Random(3).sample(range(10, 8000), 32)
    rows = {}
    for eps in [float(e) for e in args.eps.split(",")]:
        target = args.out / f"target-eps{eps:g}"
        if not (target / "config.json").exists():
            print(f"building the target for eps={eps:g} in {target} ...", file=sys.stderr)
            layer_copy(draft, target, extra_layers=EXTRA_LAYERS, scale=eps, seed=11)
        base = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, profile=profile(target))
        spec = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, profile=profile(target),
                            speculative=SpeculativeConfig(method="draft", model=str(draft),
                                                          num_speculative_tokens=args.k))
        print(f"random target eps={eps:g}: plain ...", file=sys.stderr)
        plain = asyncio.run(decode(target, base, prompt, args.new_tokens))
        print(f"random target eps={eps:g}: speculative ...", file=sys.stderr)
        chain = asyncio.run(decode(target, spec, prompt, args.new_tokens))
        print(f"random target eps={eps:g}: speculative, tree width {args.tree_width} ...", file=sys.stderr)
        row = compare(plain, chain, asyncio.run(decode(target, _tree(spec, args.tree_width), prompt, args.new_tokens)))
        row["target_bytes"] = CheckpointIndex.open(target).total_bytes
        rows[f"{eps:g}"] = row
    return {"draft": str(draft), "draft_bytes": CheckpointIndex.open(draft).total_bytes, "k": args.k,
            "tree_width": args.tree_width,
            "draft_layers": DRAFT_LAYERS, "target_layers": DRAFT_LAYERS + EXTRA_LAYERS, "rows": rows}


def smollm2_section(args: argparse.Namespace) -> dict[str, Any]:
    from tierflow.convert.demo import demo_model_dir

    path = demo_model_dir(args.out / "smollm2")
    messages = [{"role": "user", "content": f"{DOCUMENT}\n\n{QUESTION}"}]
    base = EngineConfig(device="cpu", dtype="float32", profile=profile(path))
    spec = EngineConfig(device="cpu", dtype="float32", profile=profile(path),
                        speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=args.k,
                                                      prompt_lookup_max=4, prompt_lookup_min=2))
    new_tokens = max(args.new_tokens, 96)
    print("smollm2 document task: plain ...", file=sys.stderr)
    plain = asyncio.run(decode(path, base, messages, new_tokens))
    print("smollm2 document task: ngram ...", file=sys.stderr)
    chain = asyncio.run(decode(path, spec, messages, new_tokens))
    print(f"smollm2 document task: ngram, tree width {args.tree_width} ...", file=sys.stderr)
    row = compare(plain, chain, asyncio.run(decode(path, _tree(spec, args.tree_width), messages, new_tokens)))
    async def text() -> str:
        async with await Engine.open(path, base) as engine:
            return engine.tokenizer.decode(row["plain"]["tokens"])
    row["text"] = asyncio.run(text())
    return {"model": str(path), "checkpoint_bytes": CheckpointIndex.open(path).total_bytes, "k": args.k,
            "tree_width": args.tree_width,
            "new_tokens": new_tokens, "row": row}


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {f"random\nε={k}": v for k, v in result.get("random", {}).get("rows", {}).items()}
    if "smollm2" in result:
        rows["SmolLM2\nngram"] = result["smollm2"]["row"]
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2), dpi=90)
    for ax, (key, label) in zip(axes, (("tokens_per_sweep", "tokens per weight sweep"), ("speedup", "tokens/s ÷ plain"))):
        for shift, (kind, color) in zip((-0.2, 0.2), (("chain", "C0"), ("tree", "C1"))):
            runs = [rows[n] if kind == "chain" else rows[n]["tree"] for n in names]
            values = [r["speculative"][key] if key == "tokens_per_sweep" else r[key] for r in runs]
            bars = ax.bar([i + shift for i in range(len(names))], values, width=0.4, color=color, label=kind)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("speculative decoding, every layer streamed from disk (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _lines(name: str, row: dict[str, Any], width: int) -> str:
    tree = row["tree"]
    tree_row = {"plain": row["plain"], **tree}
    return (_line(f"{name} chain", row) + "\n" + _line(f"{name} tree {width}", tree_row)
            + f"  (alternatives accepted {tree['speculative']['alternatives_accepted']} of "
              f"{tree['speculative']['alternatives_proposed']})")


def _line(name: str, row: dict[str, Any]) -> str:
    p, s = row["plain"], row["speculative"]
    acc = f"{s['acceptance']:.2f}" if s["acceptance"] is not None else "-"
    return (f"  {name:<22} acceptance {acc:>5}  tokens/sweep {s['tokens_per_sweep']:5.2f} (plain "
            f"{p['tokens_per_sweep']:.2f})  MB read/token {s['bytes_per_token'] / 1e6:8.1f} (plain "
            f"{p['bytes_per_token'] / 1e6:.1f})  tok/s {s['tokens_per_s']:6.2f} vs {p['tokens_per_s']:6.2f}  "
            f"speed-up {row['speedup']:.2f}x  identical {row['identical']}  other CPU load "
            f"{p['foreign_cpu_load']:.2f}/{s['foreign_cpu_load']:.2f}")


def report(result: dict[str, Any]) -> None:
    print(f"command: {result['command']}; load average before {result['loadavg_before']}, after "
          f"{result['loadavg_after']}")
    if "random" in result:
        r = result["random"]
        print(f"\nrandom target ({r['target_layers']} layers, draft {r['draft_layers']} layers, "
              f"{r['draft_bytes'] / 1e9:.2f} GB), k = {r['k']}:")
        for eps, row in r["rows"].items():
            print(_lines(f"eps {eps} ({row['target_bytes'] / 1e9:.2f} GB)", row, r["tree_width"]))
    if "smollm2" in result:
        m = result["smollm2"]
        print(f"\nSmolLM2-135M-Instruct ({m['checkpoint_bytes'] / 1e9:.2f} GB), ngram, k = {m['k']}, document task:")
        print(_lines("ngram", m["row"], m["tree_width"]))
        print(f"  answer: {m['row']['text'][:200]!r}")


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - {"random", "smollm2"}:
        raise SystemExit(f"--sections takes random and/or smollm2, got {args.sections!r}")
    result: dict[str, Any] = {"command": "python bench/speculative.py " + shlex.join(sys.argv[1:]),
                              "loadavg_before": loadavg()}
    if "random" in sections:
        result["random"] = random_section(args)
    if "smollm2" in sections:
        result["smollm2"] = smollm2_section(args)
    result["loadavg_after"] = loadavg()
    write_results(result, args.results or args.out / "speculative.json", chart, report)


if __name__ == "__main__":
    main()
