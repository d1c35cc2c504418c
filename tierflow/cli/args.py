"""The ``tierflow`` argument parser: the top-level help, ``tierflow run``'s flags and examples, and
the parsers of the values flags take (sizes, devices). ``plan``, ``probe`` and ``serve`` add their
own subcommands (plan.py, serve.py); what a command does once parsed is main.py's."""

from __future__ import annotations

import argparse
import re
from importlib import metadata

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}

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
