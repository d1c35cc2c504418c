"""Concurrency benchmark: N concurrent generate() calls sharing one weight stream from disk.

    python bench/concurrency.py [--out DIR] [--new-tokens N] [--levels 1,2,4,8,16,32]

One run:
  1. builds (or reuses) the random Llama-shape checkpoint of >= 1 GiB that bench/decode.py uses;
  2. opens one engine with every decoder layer pinned to disk (embedding and head resident), so
     every sweep streams ~0.7 GB with O_DIRECT whatever the number of sequences in it;
  3. for each N: N asyncio tasks call ``engine.generate`` at once, each with its own prompt
     (16 to 64 token ids) and ``--new-tokens`` greedy tokens; measures the aggregate tokens/s
     (generated tokens / wall time from the first submission to the last completion), the time
     to first token of each request (p50, p99), the decode-phase tokens/s (tokens after each
     request's first, over the time from the last first token to the last completion), and the event loop's lag: a task that asks to
     wake every 5 ms records how late it wakes (p99, max);
  4. generous limits: GENEROUS_N requests whose max_new_tokens is 8 x the answers they give
     (each stops at a token it was seen to produce; the KV cache holds KV_CAPACITY_SEQS x
     (64 + --new-tokens) tokens), once on an engine that reserves KV for max_new_tokens at
     admission (kv_allocation="reserve") and once with KV on demand, interleaved: the most
     requests running at once, the tokens/s, and whether both gave the same tokens;
  5. prints the tables, writes DIR/concurrency.json (or --results) and a PNG chart beside it.
Targets: at N = 16, >= 10 x the tokens/s of N = 1; loop lag p99 <= 50 ms; with generous
limits, on-demand KV runs >= 3 x the requests at once that reserving does, same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CpuMonitor, ModelShape, build_checkpoint, quiesce, streamed_profile, write_results  # noqa: E402

from tierflow import Engine, EngineConfig, SamplingParams  # noqa: E402
from tierflow.engine.loop import run as run_loop  # noqa: E402

TARGET_SPEEDUP_AT_16 = 10.0
TARGET_LAG_P99_S = 0.050
TICK_S = 0.005
GENEROUS_N = 32
KV_CAPACITY_SEQS = 16            # the generous-limits engines' KV holds this many requests of 64 + new tokens
GENEROUS_FACTOR = 8              # max_new_tokens = this x the answer
TARGET_ADMITTED_RATIO = 3.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/decode-model"))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--levels", default="1,2,4,8,16,32")
    p.add_argument("--results", type=Path, help="where to write the JSON (default DIR/concurrency.json)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the generous-limits comparison")
    return p.parse_args()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class LoopLag:
    """How late a task that sleeps ``TICK_S`` at a time wakes up: the event loop's lag."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            self.lags.append(max(0.0, loop.time() - due))

    def __enter__(self) -> "LoopLag":
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def one_level(engine: Engine, n: int, new_tokens: int, rng: random.Random) -> dict[str, Any]:
    prompts = [[rng.randrange(1, 32000) for _ in range(rng.randint(16, 64))] for _ in range(n)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    await quiesce(engine)
    before = engine.stats()
    cpu = CpuMonitor()
    with LoopLag() as lag:
        started = time.perf_counter()
        outs = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
        wall = time.perf_counter() - started
    after = engine.stats()
    ttft = [o.first_token_s for o in outs]
    generated = sum(len(o.token_ids) for o in outs)
    # decode phase: from the last request's first token to the last completion, the tokens after it
    decode_start = max(ttft)
    decode_s = max(o.total_s for o in outs) - decode_start
    decode_tokens = sum(len(o.token_ids) - 1 for o in outs)
    return {"n": n, "tokens": generated, "wall_s": wall, "tokens_per_s": generated / wall,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "loop_lag_p99_s": percentile(lag.lags, 0.99), "loop_lag_max_s": max(lag.lags),
            "loop_ticks": len(lag.lags), "sweeps": after.sweeps - before.sweeps,
            "bytes_streamed": after.bytes_streamed - before.bytes_streamed,
            "prompt_tokens": sum(len(p) for p in prompts), "foreign_cpu_load": cpu.foreign_load()}


async def generous_round(engine: Engine, work: list[tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    """``work`` at once; the most requests the batcher ran together, polled every TICK_S."""
    await quiesce(engine)
    before = engine.stats()
    most = 0
    started = time.perf_counter()
    tasks = [asyncio.create_task(engine.generate(p, s)) for p, s in work]
    while not all(t.done() for t in tasks):
        most = max(most, engine.pipeline_statistics().batcher.num_running)
        await asyncio.sleep(TICK_S)
    outs = [t.result() for t in tasks]
    wall = time.perf_counter() - started
    after = engine.stats()
    generated = sum(len(o.token_ids) for o in outs)
    return {"most_running": most, "tokens": generated, "wall_s": wall, "tokens_per_s": generated / wall,
            "sweeps": after.sweeps - before.sweeps, "preemptions": after.preemptions - before.preemptions,
            "token_ids": [list(o.token_ids) for o in outs]}


async def generous_limits(path: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Requests that ask for GENEROUS_FACTOR x the tokens they produce: reserved against on-demand KV."""
    capacity = KV_CAPACITY_SEQS * (64 + args.new_tokens)
    common = dict(device="cpu", dtype="float32", profile=streamed_profile(path), max_num_seqs=GENEROUS_N,
                  kv_reserve_tokens=capacity)
    prompts = [[rng.randrange(1, 32000) for _ in range(rng.randint(16, 64))] for _ in range(GENEROUS_N)]
    # the answers: each request stops at the token it produces at position --new-tokens (or
    # earlier, where that token comes up before), and asks for GENEROUS_FACTOR x its answer
    async with await Engine.open(path, EngineConfig(**common)) as engine:
        seen = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=args.new_tokens,
                                                                        ignore_eos=True)) for p in prompts))
    work = []
    for prompt, out in zip(prompts, seen):
        stop = out.token_ids[-1]
        answer = list(out.token_ids).index(stop) + 1
        work.append((prompt, SamplingParams(max_new_tokens=GENEROUS_FACTOR * answer, stop_token_ids=(stop,),
                                            ignore_eos=True)))
    rounds: dict[str, list[dict[str, Any]]] = {"reserve": [], "on_demand": []}
    for r in range(args.rounds):            # one engine open at a time: each holds its resident weights
        for mode in (("reserve", "on_demand") if r % 2 == 0 else ("on_demand", "reserve")):
            async with await Engine.open(path, EngineConfig(**common, kv_allocation=mode)) as engine:
                await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm-up
                rounds[mode].append(await generous_round(engine, work))
    seen_tokens = [row.pop("token_ids") for rows in rounds.values() for row in rows]
    tokens = {"on_demand": seen_tokens[-1]}
    same = all(t == seen_tokens[0] for t in seen_tokens)     # every round of both schemes
    best = {mode: max(rows, key=lambda row: row["tokens_per_s"]) for mode, rows in rounds.items()}
    return {"requests": GENEROUS_N, "kv_capacity_tokens": capacity, "factor": GENEROUS_FACTOR,
            "answer_tokens": [len(t) for t in tokens["on_demand"]],
            "max_new_tokens": [s.max_new_tokens for _, s in work], "same_tokens": same,
            "rounds": rounds, "reserve": best["reserve"], "on_demand": best["on_demand"],
            "admitted_ratio": best["on_demand"]["most_running"] / max(1, best["reserve"]["most_running"]),
            "speedup": best["on_demand"]["tokens_per_s"] / best["reserve"]["tokens_per_s"]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(x) for x in args.levels.split(",")]
    path, reused = build_checkpoint(args.out, ModelShape().resolved())
    config = EngineConfig(device="cpu", dtype="float32", profile=streamed_profile(path), max_num_seqs=max(levels),
                          kv_reserve_tokens=max(levels) * (64 + args.new_tokens))
    rng = random.Random(0)
    async with await Engine.open(path, config) as engine:
        plan = engine.plan
        await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm-up
        rows = [await one_level(engine, n, args.new_tokens, rng) for n in levels]
    generous = await generous_limits(path, args, rng)
    base, decode_base = rows[0]["tokens_per_s"], rows[0]["decode_tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
        row["decode_speedup"] = row["decode_tokens_per_s"] / decode_base
    at16 = next((r for r in rows if r["n"] == 16), None)
    return {"command": "python bench/concurrency.py " + shlex.join(sys.argv[1:]),
            "model": {"dir": str(path), "reused": reused}, "loop": type(asyncio.get_running_loop()).__module__,
            "plan": {"tiers": list(plan.tiers), "prefill_chunk_tokens": plan.prefill_chunk_tokens,
                     "prefetch_depth": plan.prefetch_depth},
            "new_tokens": args.new_tokens, "rows": rows,
            "targets": {"speedup_at_16": TARGET_SPEEDUP_AT_16, "loop_lag_p99_s": TARGET_LAG_P99_S},
            "speedup_at_16": at16["speedup"] if at16 else None, "generous_limits": generous,
            "target_admitted_ratio": TARGET_ADMITTED_RATIO,
            "loop_lag_p99_s": max(r["loop_lag_p99_s"] for r in rows)}


def report(result: dict[str, Any]) -> None:
    print(f"model {result['model']['dir']}: every decoder layer streamed from disk on every sweep; "
          f"{result['new_tokens']} greedy tokens per request; event loop: {result['loop']}")
    head = f"{'N':>4}{'tokens/s':>10}{'x N=1':>8}{'decode tok/s':>14}{'x N=1':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'sweeps':>8}" \
           f"{'loop lag p99':>14}{'max':>9}{'other CPU':>11}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['n']:>4}{r['tokens_per_s']:>10.2f}{r['speedup']:>8.1f}{r['decode_tokens_per_s']:>14.2f}"
              f"{r['decode_speedup']:>8.1f}{r['ttft_p50_s']:>9.2f}s{r['ttft_p99_s']:>9.2f}s"
              f"{r['sweeps']:>8}{r['loop_lag_p99_s'] * 1e3:>12.1f}ms{r['loop_lag_max_s'] * 1e3:>7.1f}ms"
              f"{r['foreign_cpu_load']:>11.2f}")
    s16, lag = result["speedup_at_16"], result["loop_lag_p99_s"]
    if s16 is not None:
        print(f"N=16: {s16:.1f} x the tokens/s of N=1 (target >= {TARGET_SPEEDUP_AT_16:.0f}: "
              f"{'OK' if s16 >= TARGET_SPEEDUP_AT_16 else 'MISSED'}); loop lag p99 {lag * 1e3:.1f} ms "
              f"(target <= {TARGET_LAG_P99_S * 1e3:.0f} ms: {'OK' if lag <= TARGET_LAG_P99_S else 'MISSED'})")


    g = result["generous_limits"]
    print(f"\ngenerous limits: {g['requests']} requests, max_new_tokens {g['factor']} x their answers "
          f"({min(g['answer_tokens'])}-{max(g['answer_tokens'])} tokens), KV for {g['kv_capacity_tokens']} tokens; "
          f"fastest of {len(g['rounds']['reserve'])} interleaved rounds")
    head = f"{'KV allocation':>14}{'most running':>14}{'tokens/s':>10}{'sweeps':>8}{'preemptions':>13}"
    print(head)
    print("-" * len(head))
    for mode in ("reserve", "on_demand"):
        r = g[mode]
        print(f"{mode:>14}{r['most_running']:>14}{r['tokens_per_s']:>10.2f}{r['sweeps']:>8}{r['preemptions']:>13}")
    ok = g["admitted_ratio"] >= TARGET_ADMITTED_RATIO and g["same_tokens"]
    print(f"on demand runs {g['admitted_ratio']:.1f} x the requests at once (target >= {TARGET_ADMITTED_RATIO:.0f}), "
          f"{g['speedup']:.2f} x the tokens/s; same tokens: {g['same_tokens']} ({'OK' if ok else 'MISSED'})")


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, g = result["rows"], result["generous_limits"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90, gridspec_kw={"width_ratios": [3, 2]})
    left.plot([r["n"] for r in rows], [r["speedup"] for r in rows], "o-", label="tokens/s")
    left.plot([r["n"] for r in rows], [r["n"] for r in rows], ":", color="grey", lw=1, label="ideal (N x)")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent requests N")
    left.set_ylabel("x N = 1")
    left.set_title("one weight stream, N requests", fontsize=9)
    left.legend(fontsize=7)
    modes = ("reserve", "on_demand")
    right.bar(range(2), [g[m]["most_running"] for m in modes], color=["C7", "C2"])
    right.set_xticks(range(2), ["reserved KV", "KV on demand"])
    right.set_ylabel("most requests running")
    right.set_title(f"max_new_tokens {g['factor']} x the answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    result = run_loop(main_async(args))
    out = args.results or args.out / "concurrency.json"
    write_results(result, out, chart, report)


if __name__ == "__main__":
    main()
