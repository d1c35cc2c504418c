"""HTTP serving benchmark: N concurrent streaming clients of `tierflow serve` against the
in-process API on the same engine (the same model and plan: every decoder layer streamed from
disk every sweep).

    python bench/serve.py [--model DIR] [--levels 1,4,16] [--new-tokens 32] [--rounds 2] [--out DIR]

One run:
  1. opens one engine on the model (default: the demo SmolLM2-135M-Instruct, converted once into
     the user cache) with the profile that pins every decoder layer to disk, behind the HTTP
     server (uvicorn on loopback, in a background thread, which owns the engine's loop);
  2. for each N and each round, interleaved (in-process first in odd rounds, HTTP first in even
     ones, so that drift on this shared machine hits both alike): N requests at once, each a chat
     with its own question and --new-tokens greedy tokens (EOS ignored, so every request makes the
     same number of tokens), once as N ``engine.stream`` calls in the engine's own loop and once as
     N streaming ``openai.AsyncOpenAI`` clients over HTTP (SSE), in a separate client process;
  3. measures, per mode: tokens/s (tokens over the wall time from the first submission to the last
     token), time to first token p50 / p99 (from the submission, as each client sees it), and the
     HTTP overhead as the ratio of HTTP to in-process tokens/s (median of the rounds);
  4. checks that both modes gave the same text for every request;
  5. prints the table, writes DIR/serve.json and a PNG chart beside it.
Target: at N = 16, HTTP tokens/s >= 0.95 x in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, streamed_profile, write_results  # noqa: E402

TARGET_RATIO = 0.95
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write one sentence about the sea.",
             "What is two plus two?", "Say hello in French.", "Name a large animal.", "What colour is the sky?",
             "Name a planet.", "What is rain made of?", "Name a fruit.", "What do bees make?", "Name an ocean.",
             "What is ice?", "Name a musical instrument.", "What do cows eat?", "Name a country in Asia."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory (default: the demo model)")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients N, comma-separated (default 1,4,16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per N (default 2)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--results", type=Path, help="write the JSON here instead of DIR/serve.json")
    return p.parse_args()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Server:
    """The HTTP server in a background thread; ``call`` runs a coroutine in its loop."""

    def __init__(self, model: Path, config: Any) -> None:
        from tierflow import Engine
        from tierflow.server import ServerConfig, make_server

        self.server = make_server(lambda: Engine.open(model, config), ServerConfig("bench", max_queue=1024),
                                  port=0, log_level="warning")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self.engine = self.server.state.engine

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)


async def in_process(engine: Any, n: int, new_tokens: int) -> dict[str, Any]:
    from tierflow import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()

    async def one(i: int) -> tuple[str, float, int]:
        first, text, tokens = None, [], 0
        async for chunk in engine.stream([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], params):
            first = first or time.perf_counter()
            text.append(chunk.text)
            tokens += len(chunk.token_ids)
        return "".join(text), (first or start) - start, tokens

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return summarise(results, time.perf_counter() - start)


async def over_http(url: str, n: int, new_tokens: int) -> dict[str, Any]:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600) as client:
        start = time.perf_counter()

        async def one(i: int) -> tuple[str, float, int]:
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                max_tokens=new_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            first, text, tokens = None, [], 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return "".join(text), (first or start) - start, tokens

        results = await asyncio.gather(*(one(i) for i in range(n)))
        return summarise(results, time.perf_counter() - start)


def http_in_subprocess(url: str, n: int, new_tokens: int) -> dict[str, Any]:
    """``over_http`` in another Python process, as real clients are: the client library's own CPU
    time (SSE parsing, response models) does not compete with the engine for this process's GIL."""
    import subprocess
    done = subprocess.run([sys.executable, __file__, "--client", url, str(n), str(new_tokens)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(results: list[tuple[str, float, int]], wall_s: float) -> dict[str, Any]:
    firsts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s,
            "ttft_p50_s": percentile(firsts, 0.5), "ttft_p99_s": percentile(firsts, 0.99),
            "texts": [r[0] for r in results]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tierflow import EngineConfig

    model = args.model
    if model is None:
        from tierflow.convert.demo import demo_model_dir
        model = demo_model_dir()
    levels = [int(x) for x in args.levels.split(",")]
    config = EngineConfig(device="cpu", profile=streamed_profile(Path(model)), max_num_seqs=max(levels),
                          kv_reserve_tokens=max(levels) * (args.new_tokens + 128))
    server = Server(Path(model), config)
    try:
        engine = server.engine
        streamed = len(engine.plan.streamed)
        server.call(in_process(engine, 1, 4))                # warm up both paths
        http_in_subprocess(server.url, 1, 4)
        load_before = loadavg()
        rows = []
        for n in levels:
            rounds = []
            for r in range(args.rounds):
                order = ("inproc", "http") if r % 2 == 0 else ("http", "inproc")
                got = {}
                for mode in order:
                    if mode == "inproc":
                        got[mode] = server.call(in_process(engine, n, args.new_tokens))
                    else:
                        got[mode] = http_in_subprocess(server.url, n, args.new_tokens)
                rounds.append(got)
            ratio = statistics.median(g["http"]["tokens_per_s"] / g["inproc"]["tokens_per_s"] for g in rounds)
            same = all(g["http"]["texts"] == g["inproc"]["texts"] for g in rounds)
            row = {"n": n, "ratio": ratio, "same_text": same}
            for mode in ("inproc", "http"):
                row[mode] = {k: statistics.median(g[mode][k] for g in rounds)
                             for k in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "wall_s")}
            rows.append(row)
            print(f"N={n}: in-process {row['inproc']['tokens_per_s']:.1f} tok/s, HTTP {row['http']['tokens_per_s']:.1f} "
                  f"tok/s, ratio {ratio:.3f}", flush=True)
        return {"model": str(model), "units_streamed": streamed, "units": len(engine.plan.unit_names),
                "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows,
                "loadavg_before": load_before, "loadavg_after": loadavg(), "cpus": os.cpu_count(),
                "command": "python bench/serve.py " + " ".join(sys.argv[1:]), "target_ratio": TARGET_RATIO}
    finally:
        server.close()


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['model']}: {result['units_streamed']} of {result['units']} units streamed every sweep; "
          f"{result['new_tokens']} tokens per request; medians of {result['rounds']} interleaved rounds")
    print(f"{'N':>4}{'in-proc tok/s':>15}{'HTTP tok/s':>12}{'ratio':>8}{'TTFT p50 in/HTTP':>20}"
          f"{'TTFT p99 in/HTTP':>20}{'same':>6}")
    for r in result["rows"]:
        i, h = r["inproc"], r["http"]
        print(f"{r['n']:>4}{i['tokens_per_s']:>15.1f}{h['tokens_per_s']:>12.1f}{r['ratio']:>8.3f}"
              f"{i['ttft_p50_s']:>10.2f}/{h['ttft_p50_s']:<9.2f}{i['ttft_p99_s']:>10.2f}/{h['ttft_p99_s']:<9.2f}"
              f"{str(r['same_text']):>6}")
    last = result["rows"][-1]
    ok = last["ratio"] >= TARGET_RATIO and all(r["same_text"] for r in result["rows"])
    print(f"N={last['n']}: HTTP gives {last['ratio']:.3f} x the in-process tokens/s (target >= {TARGET_RATIO}); "
          f"same text in both: {all(r['same_text'] for r in result['rows'])} ({'OK' if ok else 'MISSED'})")
    print(f"load average before/after: {result['loadavg_before'][0]:.2f} / {result['loadavg_after'][0]:.2f} "
          f"on {result['cpus']} CPUs")


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ns = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    width = 0.38
    xs = range(len(ns))
    left.bar([x - width / 2 for x in xs], [r["inproc"]["tokens_per_s"] for r in rows], width, label="in-process")
    left.bar([x + width / 2 for x in xs], [r["http"]["tokens_per_s"] for r in rows], width, label="HTTP (SSE)")
    left.set_xticks(list(xs), [f"N={n}" for n in ns])
    left.set_ylabel("tokens/s")
    left.set_title("every layer streamed from disk", fontsize=9)
    left.legend(fontsize=7)
    right.plot(ns, [r["ratio"] for r in rows], "o-")
    right.axhline(TARGET_RATIO, color="grey", ls=":", lw=1, label=f"target {TARGET_RATIO}")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients N")
    right.set_ylabel("HTTP / in-process tokens/s")
    right.set_ylim(0.5, max(1.1, 1.1 * max(r["ratio"] for r in rows)))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--client":     # the HTTP clients' process
        url, n, new_tokens = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(over_http(url, n, new_tokens))))
        return
    args = parse_args()
    result = measure(args)
    out = args.results or args.out / "serve.json"
    write_results(result, out, chart, report)


if __name__ == "__main__":
    main()
