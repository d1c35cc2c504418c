"""Prefix-cache benchmark: a second question over the same long document.

    python bench/prefix_cache.py [--out DIR] [--document-tokens 16384] [--question-tokens 32]

One run, every engine in a fresh process:
  1. builds (or reuses) the long-context benchmark's random Llama checkpoint (hidden 512,
     4 layers, 64k positions) in DIR/model;
  2. cold reference: an engine without a prefix cache answers question 2 over the document;
  3. one process, ``prefix_cache_bytes``: question 1 over the document (its prefill fills the
     cache), then question 2 — which should prefill only its new suffix;
  4. two processes, ``prefix_cache_dir``: the first answers question 1 and exits, the second
     (a new process, memory cache empty) answers question 2 from the blocks on disk; then the
     same pair again with the KV cache itself paged to disk (``kv_cache_dir``,
     ``kv_device_bytes=0``, ``kv_host_bytes=0``);
  5. prints time to first token of each request, the ratio second ÷ first (target ≤ 0.10),
     whether each answer equals the cold reference's tokens, and writes DIR/prefix_cache.json.
"""

from __future__ import annotations

import argparse
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
    import asyncio, json, sys
    from tierflow import Engine, EngineConfig, SamplingParams

    path, options, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    prompts = json.loads(sys.stdin.read())
    hardware = {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}

    async def main():
        longest = max(len(p) for p in prompts) + new_tokens
        config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=longest, prefill_chunk_tokens=1024,
                              profile={"version": 1, "hardware": hardware}, **options)
        rows = []
        async with await Engine.open(path, config) as engine:
            await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm-up
            for prompt in prompts:
                out = await engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                rows.append({"first_token_s": out.first_token_s, "cached_tokens": out.cached_tokens,
                             "token_ids": list(out.token_ids), "prompt_tokens": len(prompt)})
            stats = engine.pipeline_statistics().prefix_cache
        print(json.dumps({"rows": rows, "prefix_cache": None if stats is None else stats.__repr__()}))

    asyncio.run(main())
""")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/prefix-cache"))
    p.add_argument("--model", type=Path, default=Path("bench/out/long-context/model"),
                   help="checkpoint to use (built there if missing)")
    p.add_argument("--document-tokens", type=int, default=16384)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    return p.parse_args()


def child(path: Path, options: dict, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(options), str(new_tokens)],
                         input=json.dumps(prompts), capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"run {options} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["rows"]


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = long_context_model(args.model)
    document = [(i * 7919) % 4000 + 1 for i in range(args.document_tokens)]
    q1 = document + [(i * 31) % 4000 + 1 for i in range(args.question_tokens)]
    q2 = document + [(i * 97 + 5) % 4000 + 1 for i in range(args.question_tokens)]
    n = args.new_tokens

    print("cold reference (no prefix cache): question 2", file=sys.stderr)
    (cold,) = child(path, {}, [q2], n)
    print("one process, prefix cache in memory: question 1, then question 2", file=sys.stderr)
    first, second = child(path, {"prefix_cache_bytes": 2**31}, [q1, q2], n)
    runs = {"one process (memory)": (first, second)}
    paged = {"kv_device_bytes": 0, "kv_host_bytes": 0}
    cache_bytes = 0
    for name, kv in (("two processes (prefix_cache_dir)", {}), ("two processes, KV paged to disk", paged)):
        with tempfile.TemporaryDirectory(dir=args.out) as cache_dir, tempfile.TemporaryDirectory(dir=args.out) as spill:
            options = {"prefix_cache_dir": cache_dir, **kv, **({"kv_cache_dir": spill} if kv else {})}
            print(f"{name}: process A, question 1", file=sys.stderr)
            (a,) = child(path, options, [q1], n)
            print(f"{name}: process B, question 2", file=sys.stderr)
            (b,) = child(path, options, [q2], n)
            cache_bytes = sum(p.stat().st_size for p in Path(cache_dir).rglob("*") if p.is_file())
        runs[name] = (a, b)

    result = {"command": "python bench/prefix_cache.py " + shlex.join(sys.argv[1:]), "model": str(path),
              "document_tokens": args.document_tokens, "question_tokens": args.question_tokens,
              "new_tokens": n, "cold_reference": cold, "prefix_cache_dir_bytes": cache_bytes, "runs": {}}
    print(f"model {path}; document {args.document_tokens} tokens, questions {args.question_tokens} tokens, "
          f"{n} new tokens; cold reference: first token after {cold['first_token_s']:.2f} s")
    head = f"{'run':<34}{'1st question':>13}{'2nd question':>13}{'cached':>8}{'ratio':>7}  answer = cold run"
    print(head)
    print("-" * len(head))
    for name, (one, two) in runs.items():
        ratio = two["first_token_s"] / one["first_token_s"]
        same = two["token_ids"] == cold["token_ids"]
        result["runs"][name] = {"first": one, "second": two, "second_over_first": ratio,
                                "answer_equals_cold": same}
        print(f"{name:<34}{one['first_token_s']:>12.2f}s{two['first_token_s']:>12.3f}s{two['cached_tokens']:>8}"
              f"{ratio:>7.3f}  {'yes' if same else 'NO'}")
    ok = all(r["second_over_first"] <= 0.10 and r["answer_equals_cold"] for r in result["runs"].values())
    print(f"prefix cache directory: {cache_bytes / 2**20:.1f} MiB; target second ÷ first <= 0.10 with the "
          f"cold run's answer: {'OK' if ok else 'MISSED'}")
    (args.out / "prefix_cache.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'prefix_cache.json'}")


if __name__ == "__main__":
    main()
