"""Staging buffers under memory pressure: physical pieces per O_DIRECT read and read bandwidth,
for each way of making the buffers, with memory free and with most of RAM locked away.

    python bench/staging_buffers.py [--model DIR] [--leave-gb G] [--repeats N] [--out FILE]

An O_DIRECT read DMAs into the buffer's pages; the block layer makes one segment of each
physically contiguous run and splits a request with more segments than the device's
max_segments. This measures, per buffer strategy, a ring of the engine's staging slots (the
plan's slot size, slot count, reader threads and block size for --model):

- pieces: physically contiguous runs per read block (/proc/self/pagemap frame numbers; the
  huge-page share from /proc/self/smaps where frame numbers are hidden);
- GB/s: O_DIRECT reads of the checkpoint file through the engine's DiskReader into the ring.

Every ring of a round is held at once (about 0.5 GB each for the default model) and read in
turn, pass by pass, so the disk's drift falls on each alike. Scenarios, each strategy in each,
in alternating order over --repeats rounds:
  free          nothing locked;
  locked        a helper process mlocks RAM until --leave-gb stay available;
  locked+cache  as locked, and the page cache then filled by a buffered read of the checkpoint
                (what a peer that reads through the page cache leaves behind), right before
                each ring is made: the free memory left is what reclaim of that cache yields;
  cache+locked+cache  the same, with the page cache also full when the helper locks, so its
                pages come partly from reclaimed cache, spread over all of RAM.
Writes --out (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (GB, MemoryLock, engine_plan_figures, loadavg, max_segments, mem_available_bytes,  # noqa: E402
                     print_table)

from tierflow.tiers.checkpoint.index import ALIGN_BYTES, ByteRange, UnitLayout  # noqa: E402
from tierflow.tiers.io.reader import DiskReader  # noqa: E402
from tierflow.tiers.io.staging import (HUGE_PAGE_BYTES, StagingPolicy, buffer_layout, hugetlb_free_bytes,  # noqa: E402
                                       staging_empty)
from tierflow.tiers.probe.measure import read_pass  # noqa: E402


def heap_lazy_thp(nbytes: int) -> torch.Tensor:
    """How tierflow made staging buffers before: torch's heap, 2 MiB aligned, MADV_HUGEPAGE
    before first touch, pages faulted in lazily (here by the fill below; in the engine by the
    first O_DIRECT read, which faults the same way)."""
    raw = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % HUGE_PAGE_BYTES
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(raw.data_ptr() + skip), ctypes.c_size_t(nbytes - nbytes % HUGE_PAGE_BYTES), 14)
    return raw[skip:skip + nbytes]


STRATEGIES: dict[str, Callable[[int], torch.Tensor]] = {
    "heap, lazy THP (before)": heap_lazy_thp,
    "4 KiB pages, populated": lambda n: staging_empty(n, StagingPolicy(thp=False, collapse=False)),
    "THP, populated": lambda n: staging_empty(n, StagingPolicy(collapse=False)),
    "THP, populated + collapse (chosen)": lambda n: staging_empty(n),
}


def fill_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * 2**20)
        while f.readinto(buf):
            pass


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_ring(make: Callable[[int], torch.Tensor], plan: dict[str, int]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """A ring of the plan's staging slots, every page touched, and what backs it."""
    started = time.perf_counter()
    ring = [make(plan["slot_bytes"]) for _ in range(plan["num_slots"])]
    for b in ring:
        b.fill_(1)
    alloc_s = time.perf_counter() - started
    shapes = [buffer_layout(b, plan["block_bytes"]) for b in ring]
    pieces = [s.pieces_per_block for s in shapes]
    return ring, {"alloc_s": alloc_s,
                  "pieces_per_block": None if None in pieces else statistics.mean(pieces),
                  "max_pieces_per_block": None if None in pieces else max(s.max_pieces_per_block for s in shapes),
                  "huge_fraction": None if None in [s.huge_fraction for s in shapes]
                  else statistics.mean(s.huge_fraction for s in shapes),
                  "source": shapes[0].source, "layouts": [s.describe() for s in shapes]}


def run_scenario(name: str, weights: Path, plan: dict[str, int], reader: DiskReader, layouts: list[UnitLayout],
                 repeats: int, passes: int) -> list[dict[str, Any]]:
    """Per round: a ring of each strategy, made one after the other (each right after the page
    cache was refilled, in the +cache scenarios), all held at once; then read passes into each
    ring in turn, so that the disk's drift falls on every strategy alike."""
    rows = []
    nbytes = sum(l.buffer_bytes for l in layouts)
    for r in range(repeats):
        order = list(STRATEGIES) if r % 2 == 0 else list(reversed(STRATEGIES))
        rings: dict[str, list[torch.Tensor]] = {}
        got: dict[str, dict[str, Any]] = {}
        for strategy in order:
            if name.endswith("+cache"):
                fill_page_cache(weights)
            before = mem_available_bytes()
            try:
                rings[strategy], got[strategy] = make_ring(STRATEGIES[strategy], plan)
                got[strategy] |= {"available_bytes": before, "gbps": []}
            except Exception as exc:       # e.g. mlock refused: report it, keep measuring the others
                got[strategy] = {"error": f"{type(exc).__name__}: {exc}", "available_bytes": before}
        for p in range(passes):
            for strategy in (order if p % 2 == 0 else list(reversed(order))):
                if strategy in rings:
                    got[strategy]["gbps"].append(nbytes / asyncio.run(read_pass(reader, layouts, rings[strategy])) / GB)
        del rings
        for strategy in STRATEGIES:
            g = got[strategy]
            rows.append({"scenario": name, "strategy": strategy, "round": r, **g})
            print(f"  {name:18s} {strategy:34s} " + (g.get("error") or
                  f"{statistics.median(g['gbps']):.2f} GB/s, {g['pieces_per_block']:.1f} pieces per block "
                  f"(worst {g['max_pieces_per_block']}), {g['huge_fraction']:.0%} huge, alloc {g['alloc_s']:.2f} s"),
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/out/offload-model", help="checkpoint (bench/offload.py builds it)")
    p.add_argument("--leave-gb", type=float, default=5.0, help="RAM left available while locked (GB)")
    p.add_argument("--read-gb", type=float, default=2.0, help="bytes read per pass (GB)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--passes", type=int, default=4, help="read passes per ring and round")
    p.add_argument("--scenarios", default="free,locked,locked+cache")
    p.add_argument("--out", default="bench/results/offload-buffers-cpu.json")
    p.add_argument("--verbose", action="store_true", help="log what the allocator did (MADV_COLLAPSE failures)")
    args = p.parse_args()
    if args.verbose:
        import logging
        logging.basicConfig(format="    %(name)s: %(message)s")
        logging.getLogger("tierflow.tiers.io.staging").setLevel(logging.DEBUG)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    model = Path(args.model)
    weights = sorted(model.glob("*.safetensors"))[0]
    plan = engine_plan_figures(model)
    chunk = plan["slot_bytes"] // ALIGN_BYTES * ALIGN_BYTES
    total = min(int(args.read_gb * GB), os.path.getsize(weights)) // chunk * chunk
    layouts = [UnitLayout(-1, f"chunk{i}", (ByteRange(str(weights), s, chunk, 0),), (), chunk, chunk)
               for i, s in enumerate(range(0, total, chunk))]
    reader = DiskReader([str(weights)], io_threads=plan["io_threads"], block_bytes=plan["block_bytes"])
    print(f"plan: {plan}; {len(layouts)} chunks per pass ({total / GB:.2f} GB); max_segments "
          f"{max_segments(str(weights))}; hugetlb free {hugetlb_free_bytes()} bytes; loadavg {loadavg()}", flush=True)
    rows: list[dict[str, Any]] = []
    locks: dict[str, Any] = {}
    started, load_start = time.perf_counter(), loadavg()
    try:
        for name in args.scenarios.split(","):
            drop_file_cache(weights)
            if name.startswith("cache+"):
                fill_page_cache(weights)
            if name == "free":
                rows += run_scenario(name, weights, plan, reader, layouts, args.repeats, args.passes)
                continue
            with MemoryLock(int(args.leave_gb * GB)) as lock:
                print(f"  locked {lock.locked_bytes / GB:.1f} GB, {lock.available_after / GB:.1f} GB available",
                      flush=True)
                rows += run_scenario(name, weights, plan, reader, layouts, args.repeats, args.passes)
            locks[name] = lock.as_dict()      # after the helper has gone: its own record included
            drop_file_cache(weights)
    finally:
        reader.close()
    summary = summarize(rows)
    doc = {"command": command, "plan": plan, "max_segments": max_segments(str(weights)),
           "hugetlb_free_bytes": hugetlb_free_bytes(),
           "hugetlb": "not measured: no free hugetlb pages (HugePages_Free 0) and tierflow never reserves any"
           if hugetlb_free_bytes() == 0 else "available",
           "thp_enabled": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
           "thp_defrag": Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text().strip(),
           "pfns_readable": rows[0].get("source") == "pagemap", "locks": locks, "loadavg_start": load_start,
           "loadavg_end": loadavg(),
           "read_bytes_per_pass": total, "total_s": time.perf_counter() - started, "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    table = [["scenario", "strategy", "GB/s (median)", "pieces / block", "worst", "huge share", "alloc s"]]
    for s in summary:
        table.append([s["scenario"], s["strategy"], f"{s['gbps']:.2f}" if s["gbps"] else "error",
                      f"{s['pieces_per_block']:.1f}" if s["pieces_per_block"] is not None else "n/a",
                      str(s["max_pieces_per_block"]), f"{s['huge_fraction']:.0%}" if s["huge_fraction"] is not None
                      else "n/a", f"{s['alloc_s']:.2f}" if s["alloc_s"] is not None else "n/a"])
    print_table(table)
    print(f"wrote {args.out}")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key in dict.fromkeys((r["scenario"], r["strategy"]) for r in rows):
        mine = [r for r in rows if (r["scenario"], r["strategy"]) == key and "error" not in r]
        pieces = [r["pieces_per_block"] for r in mine if r["pieces_per_block"] is not None]
        out.append({"scenario": key[0], "strategy": key[1],
                    "gbps": statistics.median(g for r in mine for g in r["gbps"]) if mine else None,
                    "pieces_per_block": statistics.mean(pieces) if pieces else None,
                    "max_pieces_per_block": max((r["max_pieces_per_block"] for r in mine
                                                 if r["max_pieces_per_block"] is not None), default=None),
                    "huge_fraction": statistics.mean(r["huge_fraction"] for r in mine) if mine else None,
                    "alloc_s": statistics.median(r["alloc_s"] for r in mine) if mine else None,
                    "errors": [r["error"] for r in rows if (r["scenario"], r["strategy"]) == key and "error" in r]})
    return out


if __name__ == "__main__":
    main()
