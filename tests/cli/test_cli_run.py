"""``tierflow run`` and the top-level command line: exit codes, --version, --help, the empty
prompt, the status line while the engine opens, the prefill progress, the run summary, --trace,
and Ctrl-C during the first-run conversion. Every run is in-process (``main([...])``) or
``python -m tierflow.cli`` with its own cache directory and HOME, on a tiny random checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.metadata
import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from rich.console import Console

import tierflow
from tierflow import Engine, EngineConfig, SamplingParams
from tests.cli.clitools import cli
from tierflow.cli.args import build_parser
from tierflow.cli.main import exit_status
from tierflow.cli.progress import (MEASURING, PrefillCount, opening_status, prefill_line, shows_live,
                                   shows_prefill_progress)
from tierflow.cli.summary import RunTimes, summary_rows, summary_table
from tierflow.errors import (CheckpointError, ConfigError, KVCapacityError, ProfileError, PromptError, RequestError,
                             SamplingError, TierCapacityError, TransferError)

cli_main = importlib.import_module("tierflow.cli.main")     # the module (tierflow.cli.main is also the function)
HARDWARE = {"device": "cpu", "device_memory_bytes": 2**30, "host_memory_bytes": 2**30, "disk_read_gbps": 3.0,
            "decode_gbps": 20.0, "prefill_tflops": 0.15}


@pytest.fixture(autouse=True)
def private_home(monkeypatch, tmp_path):
    """Nothing a run writes reaches the user's cache (the session's TIERFLOW_CACHE_DIR is private
    too); rich keeps messages on one line, so paths stay whole."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "1000")



@pytest.fixture
def streaming_profile(tmp_path):
    """This machine described (no probe), with layers 0-1 streamed from disk."""
    path = tmp_path / "machine.json"
    path.write_text(json.dumps({"version": 1, "hardware": HARDWARE, "overrides": {"tiers": {"layers.0-1": "disk"}}}))
    return path


def run_args(model, profile, *extra):
    return ["run", "--model", model, "--raw", "--profile", profile, "--max-new-tokens", 4, *extra]


def tty_console(monkeypatch, width=100):
    """`tierflow run`'s console, as on a terminal, writing into a buffer."""
    buffer = io.StringIO()
    monkeypatch.setattr(cli_main, "Console", lambda **_: Console(file=buffer, force_terminal=True, width=width))
    return buffer


# ----------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("error, status", [
    (ConfigError("x"), 2), (ProfileError("x"), 2), (SamplingError("x"), 2), (PromptError("x"), 2),
    (CheckpointError("x"), 1), (TierCapacityError("x"), 1), (KVCapacityError("x"), 1), (TransferError("x"), 1),
    (RequestError("x"), 1), (PermissionError(13, "Permission denied"), 1)])
def test_exit_status_of_each_error(error, status):
    assert exit_status(error) == status


@pytest.mark.parametrize("args, error", [
    (["--temperature", "-1"], "SamplingError"),
    (["--top-p", "0"], "SamplingError"),
    (["--kv-cache-dir", "/proc/no-such-dir"], "ConfigError")])
def test_errors_of_the_command_lines_values_exit_2(capsys, talking_model, streaming_profile, args, error):
    status, out, err = cli(capsys, *run_args(talking_model, streaming_profile, *args), "w1 w2")
    assert status == 2 and out == "" and err.startswith(f"error: {error}: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [["run"], ["run", "--device", "tpu", "hi"], ["run", "--top-k", "many", "hi"],
                                  ["run", "--device-memory", "lots", "hi"], ["fly"], []])
def test_argparse_errors_exit_2_without_raising(capsys, args):
    status, out, err = cli(capsys, *args)
    assert status == 2 and out == "" and "usage: tierflow" in err


def test_a_missing_checkpoint_exits_1(capsys, tmp_path, streaming_profile):
    status, out, err = cli(capsys, *run_args(tmp_path / "nothing-here", streaming_profile), "w1")
    assert status == 1 and out == "" and "CheckpointError" in err and "Traceback" not in err


def test_a_budget_too_small_exits_1_in_a_subprocess_without_a_traceback(talking_model, tmp_path):
    profile = tmp_path / "machine.json"
    profile.write_text(json.dumps({"version": 1, "hardware": HARDWARE}))
    env = {**os.environ, "HOME": str(tmp_path), "TIERFLOW_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "tierflow.cli", "run", "--model", str(talking_model), "--raw",
                           "--profile", str(profile), "--device-memory", "100KiB", "w1 w2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: TierCapacityError: ") and "Traceback" not in done.stderr, done.stderr
    assert "--device-memory" in done.stderr or "budget" in done.stderr


def _failing_open(*args, **kwargs):
    raise PermissionError(13, "Permission denied", "/models/locked/model.safetensors")


def test_an_os_error_is_one_line_and_exit_1_with_the_traceback_under_verbose(capsys, monkeypatch, talking_model,
                                                                              streaming_profile):
    monkeypatch.setattr(Engine, "open", _failing_open)
    status, out, err = cli(capsys, *run_args(talking_model, streaming_profile), "w1")
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: PermissionError: ") and "Traceback" not in err
    assert "/models/locked/model.safetensors" in err and "--verbose" in err
    status, _, err = cli(capsys, "-v", *run_args(talking_model, streaming_profile), "w1")
    assert status == 1 and "Traceback" in err and "_failing_open" in err


def test_exit_codes_are_documented(capsys):
    for args in (["--help"], ["run", "--help"]):
        status, out, _ = cli(capsys, *args)
        assert status == 0
        assert "exit status" in out and "2    a usage error" in out and "1    a failure while running" in out
    doc = " ".join(cli_main.__doc__.split())
    assert "0 success; 2 a usage error" in doc and "1 any other failure" in doc


# ----------------------------------------------------------------------------- --version and --help
def test_version(capsys):
    status, out, err = cli(capsys, "--version")
    assert status == 0 and out == f"tierflow {importlib.metadata.version('tierflow')}\n" and err == ""
    assert out == f"tierflow {tierflow.__version__}\n"                  # pyproject.toml and the package agree


def test_the_top_level_help_describes_tierflow_and_its_commands(capsys):
    status, out, _ = cli(capsys, "--help")
    assert status == 0 and "`tierflow` command line." not in out
    assert "larger than your GPU or RAM" in out
    for command in ("run", "plan", "probe"):
        assert f"  tierflow {command} " in out                      # an example of each
    assert max(len(line) for line in out.splitlines()) <= 100


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_every_run_option_has_help_with_its_default():
    parser = _run_parser()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert {"--device", "--temperature", "--top-p", "--top-k", "--seed", "--max-new-tokens", "--dtype",
            "--trace"} <= {s for a in options for s in a.option_strings}
    for action in options:
        assert action.help, action.option_strings
        text = action.help % {"default": action.default}
        assert "default" in text, action.option_strings
        if action.default not in (None, False, argparse.SUPPRESS):
            assert str(action.default) in text, (action.option_strings, action.default, text)
    rendered = parser.format_help()
    assert "{auto,cpu,cuda,cuda:N}" in rendered and "{auto,float32,bfloat16,float16}" in rendered
    assert "(default: 256MiB" in " ".join(rendered.split())
    prompt = next(a for a in parser._actions if a.dest == "prompt")
    assert prompt.help


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_run_takes_each_device_form(device):
    assert _run_parser().parse_args(["--device", device, "hi"]).device == device


# ----------------------------------------------------------------------------- the empty prompt
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_is_a_usage_error_before_anything_opens(capsys, prompt):
    """No --model: the check comes before the demo model is looked for or converted."""
    status, out, err = cli(capsys, "run", prompt)
    assert status == 2 and out == ""
    assert err.startswith("error: PromptError: the prompt is empty") and repr(prompt) in err, err


# ----------------------------------------------------------------------------- the status while opening
def test_on_a_pipe_the_first_probe_says_one_plain_line_and_a_cached_one_nothing(capsys, talking_model,
                                                                                 small_disk_probe):
    args = ["run", "--model", talking_model, "--raw", "--max-new-tokens", 2, "w1 w2"]
    status, out, err = cli(capsys, *args)
    assert status == 0 and out.strip(), err
    assert err.count(MEASURING) == 1 and err.startswith(MEASURING + "…\n")
    assert "INFO" not in err and "\x1b[" not in err                  # no log records, no terminal codes
    status, _, err = cli(capsys, *args)
    assert status == 0 and MEASURING not in err and "measuring" not in err


def test_on_a_terminal_the_status_follows_the_probe(monkeypatch, capsys, talking_model, small_disk_probe):
    shown = tty_console(monkeypatch)
    status, out, err = cli(capsys, "run", "--model", talking_model, "--raw", "--max-new-tokens", 2, "w1 w2")
    assert status == 0 and out.strip() and err == ""
    text = shown.getvalue()
    assert "measuring this machine's disk (once; cached for next time)" in text
    assert "measuring this machine's compute (once; cached for next time)" in text
    assert MEASURING + "…\n" not in text                              # the plain line is for pipes


def test_the_status_passes_on_warnings_and_keeps_info_records_quiet(caplog):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    logger = logging.getLogger("tierflow.tiers.probe.probe")
    before = logging.getLogger("tierflow").level, logging.getLogger("tierflow").propagate
    with caplog.at_level(logging.WARNING):
        with opening_status(console, "model", verbose=False):
            logger.info("measuring %s", "pcie")
            logger.info("something else")
            logger.warning("the disk is slow")
        logger.info("after")
    assert "measuring this machine's PCIe (once; cached for next time)" in buffer.getvalue()
    assert [r.getMessage() for r in caplog.records] == ["the disk is slow"]
    assert (logging.getLogger("tierflow").level, logging.getLogger("tierflow").propagate) == before


def test_shows_live_only_on_a_terminal():
    assert shows_live(Console(file=io.StringIO(), force_terminal=True))
    assert not shows_live(Console(file=io.StringIO()))


# ----------------------------------------------------------------------------- the prefill progress
def test_prefill_line():
    assert prefill_line(0, 4096, None) == "prefill: 0 of 4,096 prompt tokens"
    line = prefill_line(1024, 4096, 512.0)
    assert line == "prefill: 1,024 of 4,096 prompt tokens · 512 tokens/s · about 6.00 s left"
    assert prefill_line(5000, 4096, 512.0).startswith("prefill: 4,096 of 4,096")


def test_prefill_count_takes_a_chunk_as_done_when_the_next_one_starts():
    count = PrefillCount(baseline=100, started_s=10.0)
    count.observe(100, 10.5)
    assert (count.done, count.tokens_per_s()) == (0, None)
    count.observe(100 + 512, 11.0)                 # the first chunk started
    assert (count.done, count.tokens_per_s()) == (0, None)
    count.observe(100 + 1024, 12.0)                # the second: the first has finished
    assert count.done == 512 and count.tokens_per_s() == 256.0
    count.observe(100 + 1024, 13.0)
    assert count.done == 512 and count.done_s == 12.0


@pytest.mark.parametrize("live, tokens, expected_s, shown", [
    (True, 3000, 0.1, True),       # more than two chunks of 1024
    (True, 2048, 0.1, False),      # two chunks, quick
    (True, 100, 2.5, True),        # one chunk, but slow by the plan
    (False, 100_000, 60.0, False)])  # a pipe: never
def test_when_the_prefill_progress_is_shown(live, tokens, expected_s, shown):
    assert shows_prefill_progress(live, tokens, 1024, expected_s) is shown


def test_a_long_prompt_on_a_terminal_shows_the_prefill_and_on_a_pipe_not(monkeypatch, capsys, tmp_path,
                                                                          talking_model):
    profile = _write(tmp_path / "chunks.json", {"version": 1, "hardware": HARDWARE, "overrides": {
        "tiers": {"layers.0-1": "disk"}, "prefill_chunk_tokens": 128}})
    prompt = " ".join(f"w{i % 500 + 1}" for i in range(1500))          # 12 chunks of 128
    args = run_args(talking_model, profile, "--kv-reserve-tokens", 2048)
    status, piped, err = cli(capsys, *args, prompt)
    assert status == 0 and "prefill" not in err, err
    shown = tty_console(monkeypatch)
    status, out, err = cli(capsys, *args, prompt)
    assert status == 0 and out == piped and err == "", shown.getvalue()
    assert " of 1,500 prompt tokens" in shown.getvalue()


# ----------------------------------------------------------------------------- the summary
@pytest.fixture
def finished_run(talking_model):
    async def run():
        config = EngineConfig(device="cpu", kv_reserve_tokens=64,
                              profile={"version": 1, "hardware": HARDWARE, "overrides": {"tiers": {"layers.0-1": "disk"}}})
        async with await Engine.open(talking_model, config) as engine:
            await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=5, ignore_eos=True))
            return engine.stats(), engine.plan, engine.attention_backend
    return asyncio.run(run())


def _rendered(rows):
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(summary_table(rows))
    return console.export_text().splitlines()


def test_the_summary_fits_80_columns_and_says_what_each_time_is(finished_run):
    stats, plan, attention = finished_run
    assert plan.streamed and stats.read_s > 0
    huge = dataclasses.replace(stats, read_s=12345.67, compute_s=9876.54, stall_s=4321.09, bytes_streamed=10**15)
    for s, times in ((stats, RunTimes(5, 1.73, 0.4)), (huge, RunTimes(123456, 99999.99, 9999.99))):
        rows = summary_rows(s, plan, times, attention)
        lines = _rendered(rows)
        assert len(lines) == 1 + len(rows), lines               # the title, then one line a row: nothing wraps
        assert max(len(line) for line in lines) <= 80
        text = dict(rows)
        assert "(wall)" in text["tokens"] and "(wall)" in text["first token"]
        assert text["time (wall)"].startswith(f"compute {s.compute_s:.2f} s, waiting for weights {s.stall_s:.2f} s")
        assert text["disk reads"] == (f"{s.read_s:.2f} s summed over overlapping reads "
                                      f"(up to {plan.num_slots} at once)")


def test_the_summary_of_a_run_with_nothing_streamed(talking_model, capsys):
    status, _, err = cli(capsys, "run", "--model", talking_model, "--raw", "--max-new-tokens", 2, "w1",
                         "--profile", _write(talking_model.parent / "all-resident.json", {"version": 1,
                                                                                          "hardware": HARDWARE}))
    assert status == 0 and "nothing: every unit is resident" in err and "disk reads" not in err


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------- --trace
def test_trace_written(capsys, tmp_path, talking_model, streaming_profile):
    path = tmp_path / "t.json"
    status, _, err = cli(capsys, *run_args(talking_model, streaming_profile, "--trace", path), "w1")
    assert status == 0 and f"timeline written to {path}" in err
    assert path.stat().st_size > 0


def test_a_trace_that_was_not_written_is_not_announced(capsys, monkeypatch, tmp_path, talking_model,
                                                       streaming_profile):
    from tierflow.pipeline import trace

    monkeypatch.setattr(trace.Tracer, "write", lambda self, path: None)      # the write leaves nothing
    path = tmp_path / "t.json"
    status, out, err = cli(capsys, *run_args(talking_model, streaming_profile, "--trace", path), "w1")
    assert status == 1 and out.strip()
    assert "timeline written" not in err and f"the timeline was not written to {path}" in err


def test_a_trace_path_that_is_a_directory_is_never_announced(capsys, tmp_path, talking_model, streaming_profile):
    status, _, err = cli(capsys, *run_args(talking_model, streaming_profile, "--trace", tmp_path), "w1")
    assert status != 0 and "timeline written" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------- Ctrl-C in the conversion
SLOW_CONVERSION = """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)     # as in a terminal
    import tierflow.convert.demo as demo

    def convert_for_ever(*args, **kwargs):
        print("CONVERTING", flush=True)
        while True:
            sum(range(200_000))                                  # Python work, as a conversion does
            time.sleep(0.01)

    demo.demo_model_dir = convert_for_ever
    from tierflow.cli.main import main
    sys.exit(main(["run", "--max-new-tokens", "1", "hi"]))
"""


def test_ctrl_c_during_the_first_run_conversion_exits_at_once(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "TIERFLOW_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_CONVERSION)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "the conversion never started"
        assert proc.stdout.readline() == b"CONVERTING\n"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        elapsed_s = time.monotonic() - started
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 130 and "Traceback" not in err, err
    assert elapsed_s < 3
