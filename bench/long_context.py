"""Long-context benchmark: prefill and decode against context length with every KV block on disk.

    python bench/long_context.py [--out DIR] [--contexts 1024,2048,4096,8192,16384,32768] [--new-tokens N]

One run:
  1. builds (or reuses) a small random Llama checkpoint with a 64k position range (hidden 512,
     4 layers, 8 query / 2 KV heads) in DIR;
  2. for each context length, in a fresh process (so peak memory is that context's alone):
     opens the engine with a paged KV cache that keeps no block on the device or the host
     (``kv_device_bytes=0, kv_host_bytes=0``: every full block goes to the O_DIRECT spill file),
     prefills a prompt of that length, decodes --new-tokens greedy tokens, and records the
     prefill time, the decode time per token, the process's peak RSS (sampled every 2 ms),
     the spill file's size, and the KV bytes read back per decode token;
  3. measures the spill directory's O_DIRECT read bandwidth and the resident decode time at the
     shortest context, and computes a decode roofline per context:
     max(KV bytes per token / disk bandwidth, compute at the shortest context);
  4. prints a table and writes DIR/long_context.json. Target: peak RSS at 32k within 10% of 4k.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import long_context_model  # noqa: E402

CHILD = textwrap.dedent("""
    import asyncio, json, sys, threading, time
    import psutil
    from tierflow import Engine, EngineConfig, SamplingParams

    path, context, new_tokens, spill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    proc = psutil.Process()
    peak, done = [proc.memory_info().rss], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    hardware = {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}

    async def main():
        config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=context + new_tokens,
                              prefill_chunk_tokens=1024, kv_cache_dir=spill, kv_device_bytes=0, kv_host_bytes=0,
                              profile={"version": 1, "hardware": hardware})
        async with await Engine.open(path, config) as engine:
            await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm-up
            baseline = proc.memory_info().rss
            peak[0] = baseline
            threading.Thread(target=sample, daemon=True).start()
            prompt = [(i * 7919) % 4000 + 1 for i in range(context)]
            stamps = []
            started = time.perf_counter()
            async for chunk in engine.stream(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
                stamps += [time.perf_counter()] * len(chunk.token_ids)
            done.set()
            spill_bytes = sum(p.stat().st_size for p in __import__("pathlib").Path(spill).iterdir())
            return {"context": context, "prefill_s": stamps[0] - started,
                    "decode_s_per_token": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
                    "baseline_rss": baseline, "peak_rss": peak[0], "spill_file_bytes": spill_bytes,
                    "kv_bytes_per_token": engine.costs.kv_bytes_per_token,
                    "kv_blocks": {k: [v.capacity, v.used] for k, v in engine.pipeline_statistics().kv_blocks.items()}}

    print(json.dumps(asyncio.run(main())))
""")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/long-context"))
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--new-tokens", type=int, default=8)
    return p.parse_args()


def disk_gbps(directory: Path) -> float:
    from tierflow.tiers.probe.probe import measure_disk
    return asyncio.run(measure_disk(directory, chunk_bytes=4 * 2**20, in_flight=1, file_bytes=64 * 2**20)).read_gbps


def main() -> None:
    args = parse_args()
    path = long_context_model(args.out / "model")
    rows = []
    for context in (int(x) for x in args.contexts.split(",")):
        with tempfile.TemporaryDirectory(dir=args.out) as spill:
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(context), str(args.new_tokens), spill],
                                 capture_output=True, text=True, timeout=3600)
            if out.returncode:
                raise SystemExit(f"context {context} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"context {context}: prefill {rows[-1]['prefill_s']:.1f} s", file=sys.stderr)
    gbps = disk_gbps(args.out)
    compute = rows[0]["decode_s_per_token"]
    for r in rows:
        r["kv_read_per_token_bytes"] = r["context"] * r["kv_bytes_per_token"]
        r["roofline_s"] = max(r["kv_read_per_token_bytes"] / (gbps * 1e9), compute)
        r["decode_over_roofline"] = r["decode_s_per_token"] / r["roofline_s"]
        r["rss_growth_bytes"] = r["peak_rss"] - r["baseline_rss"]
    by_context = {r["context"]: r for r in rows}
    ratio = (by_context[32768]["peak_rss"] / by_context[4096]["peak_rss"]
             if 32768 in by_context and 4096 in by_context else None)
    result = {"command": "python bench/long_context.py " + shlex.join(sys.argv[1:]), "model": str(path),
              "spill_disk_gbps": gbps, "rows": rows, "peak_rss_32k_over_4k": ratio}
    (args.out / "long_context.json").write_text(json.dumps(result, indent=2))
    print(f"model {path}: KV {rows[0]['kv_bytes_per_token']} bytes per token, every block on disk "
          f"(O_DIRECT spill, {gbps:.2f} GB/s); {args.new_tokens} new tokens")
    head = f"{'context':>8}{'prefill':>10}{'decode/token':>14}{'roofline':>10}{'ratio':>7}{'spill file':>12}" \
           f"{'peak RSS':>11}{'growth':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['context']:>8}{r['prefill_s']:>9.2f}s{r['decode_s_per_token'] * 1e3:>12.1f}ms"
              f"{r['roofline_s'] * 1e3:>8.1f}ms{r['decode_over_roofline']:>7.2f}{r['spill_file_bytes'] / 2**20:>9.1f}MiB"
              f"{r['peak_rss'] / 2**20:>8.0f}MiB{r['rss_growth_bytes'] / 2**20:>6.0f}MiB")
    if ratio is not None:
        print(f"peak RSS at 32k / at 4k = {ratio:.3f} (target <= 1.10: {'OK' if ratio <= 1.10 else 'MISSED'})")
    print(f"wrote {args.out / 'long_context.json'}")


if __name__ == "__main__":
    main()
