"""`tierflow serve`: the OpenAI-compatible HTTP server (needs the ``serve`` extra).

    tierflow serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--served-model-name NAME] [--max-queue N] [engine options]

Loopback by default; binding another address without an API key prints a warning. The key may
also come from ``TIERFLOW_API_KEY``. With no ``--model``, the demo model (converted once into the
user cache). SIGTERM / Ctrl-C drain: new requests get 503, those in flight finish within
``--grace`` seconds, then the engine closes and removes its files.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from tierflow.config import EngineConfig
from tierflow.errors import ConfigError

API_KEY_ENV = "TIERFLOW_API_KEY"
DEMO_SERVED_NAME = "SmolLM2-135M-Instruct"


def add_serve_command(sub: Any, parse_size: Callable[[str], int]) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve the OpenAI HTTP API (chat and text completions) on the streaming engine",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  tierflow serve --port 8000 &\n  curl -s localhost:8000/v1/chat/completions "
                              "-H 'Content-Type: application/json' \\\n    -d '{\"model\": \"SmolLM2-135M-Instruct\", "
                              "\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'")
    s.add_argument("--model", help="model directory or hub id in the local HF cache (default: the demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    s.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV}, "
                                     "else none)")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send (default: the model directory's name)")
    s.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests that may wait beyond those the engine runs at once; more get HTTP 429 "
                        "(default: %(default)s)")
    s.add_argument("--max-tokens-default", type=int, default=512, metavar="N",
                   help="generation limit of a chat request that sets no max_tokens (default: %(default)s)")
    s.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    s.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                   help="the most requests one weight sweep serves (default: %(default)s)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default: %(default)s, the checkpoint's)")
    s.add_argument("--device-memory", type=parse_size, metavar="SIZE",
                   help="device memory budget, e.g. 8GiB (default: the measured free memory less a margin)")
    s.add_argument("--host-memory", type=parse_size, metavar="SIZE",
                   help="pinned host memory budget (CUDA), e.g. 32GiB (default: measured)")
    s.add_argument("--profile", help="profile JSON: hardware to plan for and overrides (see the README)")
    s.add_argument("--kv-reserve-tokens", type=int, default=8192, metavar="N",
                   help="tokens of in-memory KV cache, all requests together (default: %(default)s)")
    s.add_argument("--kv-cache-dir", metavar="DIR",
                   help="page the KV cache: blocks that fit neither the device nor the host budget spill to a "
                        "file here (removed on exit)")
    s.add_argument("--kv-device-memory", type=parse_size, metavar="SIZE", help="paged KV: device budget (0: none)")
    s.add_argument("--kv-host-memory", type=parse_size, metavar="SIZE", help="paged KV: host budget (0: none)")
    s.add_argument("--kv-disk", type=parse_size, metavar="SIZE",
                   help="paged KV: cap on the spill file (default: the directory's free space less a margin)")
    s.add_argument("--prefix-cache-memory", type=parse_size, metavar="SIZE", default=0,
                   help="host memory for the prefix cache, e.g. 1GiB (default: 0, none)")
    s.add_argument("--prefix-cache-dir", metavar="DIR", help="keep prefix-cache blocks in this directory across runs")
    s.add_argument("--trace", metavar="PATH", help="write a Perfetto JSON timeline of the stages at exit")
    s.add_argument("--access-log", action="store_true", help="log every HTTP request (uvicorn's access log)")
    return s


def serve_engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(device=args.device, dtype=args.dtype, device_memory_bytes=args.device_memory,
                        host_memory_bytes=args.host_memory, profile=args.profile,
                        kv_reserve_tokens=args.kv_reserve_tokens, max_num_seqs=args.max_num_seqs,
                        kv_cache_dir=args.kv_cache_dir, kv_device_bytes=args.kv_device_memory,
                        kv_host_bytes=args.kv_host_memory, kv_disk_bytes=args.kv_disk,
                        prefix_cache_bytes=args.prefix_cache_memory, prefix_cache_dir=args.prefix_cache_dir,
                        trace_path=args.trace)


async def run_serve_command(args: argparse.Namespace, console: Console,
                            on_daemon_thread: Callable[[Callable[[], Any]], Any]) -> int:
    """Serve until SIGTERM / Ctrl-C; the exit status (0, or 128 + the signal after a clean drain)."""
    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"tierflow serve needs {', '.join(missing)}: pip install 'tierflow[serve]'")
    from tierflow.engine.api import Engine
    from tierflow.server.run import is_loopback, make_server
    from tierflow.server.state import ServerConfig

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.grace < 0:
        raise ConfigError(f"--grace must be >= 0 seconds, got {args.grace}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and api_key is None:
        console.print(f"[yellow]warning:[/yellow] listening on {args.host} without an API key: anyone who can reach "
                      f"this port can use the model; pass --api-key or set ${API_KEY_ENV}")
    config = serve_engine_config(args)
    model = args.model
    if model is None:
        from tierflow.convert.demo import demo_model_dir
        model = await on_daemon_thread(demo_model_dir)
        name = args.served_model_name or DEMO_SERVED_NAME
    else:
        name = args.served_model_name or Path(str(model)).name
    server_config = ServerConfig(served_model_name=name, api_key=api_key, max_queue=args.max_queue,
                                 default_max_tokens=args.max_tokens_default)

    with console.status(f"opening {model}…"):
        engine = await Engine.open(model, config)     # before the port opens: errors are the CLI's own

    async def opened() -> Engine:
        return engine

    try:
        server = make_server(opened, server_config, host=args.host, port=args.port, grace_s=args.grace,
                             log_level="info" if args.verbose else "warning", access_log=args.access_log)
        console.print(f"serving [bold]{name}[/bold] at http://{args.host}:{args.port}/v1 "
                      f"({len(engine.plan.streamed)} of {len(engine.plan.unit_names)} units streamed from disk); "
                      "Ctrl-C or SIGTERM to stop")
        try:
            await server.serve()
        except SystemExit:           # uvicorn exits when it cannot bind; it has logged why
            raise ConfigError(f"could not listen on {args.host}:{args.port}: is the port in use, or the address "
                              "not this machine's? pass another --port / --host") from None
    finally:
        if not engine.closed:
            await engine.close()
    if server.signal is not None:
        console.print(f"stopped by signal {server.signal}: requests in flight finished, the engine closed "
                      "and its files removed")
        return 128 + server.signal
    return 0
