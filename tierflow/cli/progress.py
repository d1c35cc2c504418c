"""What stderr shows while ``tierflow run`` waits: on a terminal, a transient status line while the
engine opens (the probe measuring this machine on first use, pinning host memory), taken from
the INFO records of the ``tierflow`` loggers while it is shown, and a prefill progress line
(tokens done, tokens/s, time left) while a long prompt is prefilled; on a pipe, at most one plain
line (the probe measuring)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.status import Status

from tierflow.cli.formatting import format_seconds
from tierflow.engine.api import Engine
from tierflow.tiers.plan.plan import TierPlan


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


async def prefill_progress(engine: Engine, console: Console, total: int) -> None:
    """Poll the engine's prompt-token count until cancelled (by the first token)."""
    stats = engine.stats()
    count = PrefillCount(stats.prompt_tokens + stats.prompt_tokens_cached, time.perf_counter())
    with console.status(prefill_line(0, total, None)) as status:
        while True:
            await asyncio.sleep(0.2)
            stats = engine.stats()
            count.observe(stats.prompt_tokens + stats.prompt_tokens_cached, time.perf_counter())
            status.update(prefill_line(count.done, total, count.tokens_per_s()))
