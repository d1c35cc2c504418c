"""`tierflow plan` and `tierflow probe`: the hardware report, and measuring a machine."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from tierflow.adapters import adapter_for
from tierflow.engine.loading import resolve_dtype
from tierflow.errors import CheckpointError, ConfigError
from tierflow.engine.planning import DTYPE_NAMES, config_spec, engine_workload, index_costs, layer_benchmark
from tierflow.cli.report import format_bytes, plan_document, render_plan
from tierflow.tiers.plan.advice import improvements
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import ModelCosts, Workload, costs_from_spec
from tierflow.tiers.plan.planner import plan
from tierflow.tiers.probe.probe import default_cache, probe
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides, Profile
from tierflow.tiers.probe.profile import load_profile, save_profile

# Layer shapes the probe times when no model is given (a Llama-3.2-1B-sized layer).
GENERIC_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 16,
                  "vocab_size": 128256, "torch_dtype": "bfloat16", "tie_word_embeddings": True}


def add_plan_commands(sub: Any, parse_size: Callable[[str], int]) -> None:
    p = sub.add_parser("plan", help="plan where a model's layers and KV live on this machine (or a profile's), "
                                    "and predict its speed")
    p.add_argument("model", help="model directory (config.json alone is enough) or a config.json file")
    p.add_argument("--context", type=int, default=4096, help="tokens of context per sequence (default 4096)")
    p.add_argument("--concurrency", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence (default 256)")
    p.add_argument("--device-memory", type=parse_size, help="cap on device memory, e.g. 8GiB")
    p.add_argument("--host-memory", type=parse_size, help="cap on host (pinned) memory, e.g. 32GiB")
    p.add_argument("--profile", help="profile JSON: plan for its hardware, with its overrides")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--fresh", action="store_true", help="measure this machine again instead of using the cache")
    p.add_argument("--json", action="store_true", help="print the plan as a JSON document")
    q = sub.add_parser("probe", help="measure this machine (memory, disk, PCIe, compute) and write a profile JSON")
    q.add_argument("--model", help="time this model's layer shapes and its directory's disk (default: a generic "
                                   "1B-sized layer and the current directory)")
    q.add_argument("--dir", help="directory whose disk to measure (default: the model's, else the current one)")
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    q.add_argument("--fresh", action="store_true", help="measure again instead of using the cache")
    q.add_argument("--out", help="write the profile JSON here")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible on this machine; to plan for a GPU you do "
                          "not have, pass --profile with a 'hardware' section")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _model_costs(model: str, dtype_arg: str, device_type: str
                 ) -> tuple[ModelCosts, torch.dtype, Path, Callable[..., Any]]:
    """Costs from the checkpoint when its weights are there (real read sizes), else config.json;
    the compute dtype (chosen as the engine chooses it); and a maker of the layer benchmark
    the probe times."""
    spec, adapter, directory = config_spec(model)
    dtype = resolve_dtype(dtype_arg, spec.checkpoint_dtype, torch.device(device_type))
    bench = partial(layer_benchmark, spec, adapter)
    if any(directory.glob("*.safetensors")):
        try:
            index = CheckpointIndex.open(directory)
            return index_costs(index, dtype), dtype, directory, bench
        except CheckpointError:
            pass   # weights incomplete or odd: plan from the config
    return costs_from_spec(spec, adapter, DTYPE_NAMES[dtype], name=directory.name), dtype, directory, bench


def _progress(console: Console) -> Callable[[str], None]:
    return lambda text: console.print(f"[dim]{text}…[/dim]")


async def _hardware(args: argparse.Namespace, profile: Profile | None, costs: ModelCosts, dtype: torch.dtype,
                    directory: Path, bench: Callable[..., Any], console: Console) -> tuple[HardwareProfile, str]:
    if profile is not None and profile.hardware is not None:
        return profile.hardware, f"from {args.profile}"
    device = _device(args.device)
    hw, provenance = await probe(device, dtype, costs, directory, cache=default_cache(), fresh=args.fresh,
                                 layer=bench(device, dtype), progress=_progress(console))
    sources = {provenance[k]["source"] for k in ("disk", "compute") if k in provenance}
    return hw, "measured on this machine" + (" (cached figures)" if sources == {"cache"} else "")


async def run_plan_command(args: argparse.Namespace, console: Console) -> None:
    if args.command == "probe":
        return await _probe_command(args, console)
    for name in ("context", "concurrency"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    profile = load_profile(args.profile) if args.profile else None
    device_type = profile.hardware.device if profile and profile.hardware else _device(args.device).type
    costs, dtype, directory, bench = _model_costs(args.model, args.dtype, device_type)
    hw, source = await _hardware(args, profile, costs, dtype, directory, bench, console)
    overrides = profile.overrides if profile else Overrides()
    if args.device_memory is not None:
        overrides = replace(overrides, device_memory_bytes=args.device_memory)
    if args.host_memory is not None:
        overrides = replace(overrides, host_memory_bytes=args.host_memory)
    work = Workload(context_tokens=args.context, concurrency=args.concurrency,
                    new_tokens=min(args.new_tokens, args.context - 1))
    result = plan(costs, hw, work, overrides)
    helps = improvements(costs, hw, work, overrides, result)
    if args.json:
        sys.stdout.write(json.dumps(plan_document(result, hw, costs, source, helps), indent=2) + "\n")
    else:
        render_plan(Console(), result, hw, costs, source, helps)


async def _probe_command(args: argparse.Namespace, console: Console) -> None:
    device = _device(args.device)
    if args.model:
        costs, _, directory, bench = _model_costs(args.model, args.dtype, device.type)
    else:
        adapter = adapter_for(GENERIC_CONFIG)
        spec = adapter.spec_from_config(GENERIC_CONFIG)
        costs = costs_from_spec(spec, adapter, args.dtype, name="generic")
        directory, bench = Path.cwd(), partial(layer_benchmark, spec, adapter)
    directory = Path(args.dir) if args.dir else directory
    dtype = getattr(torch, args.dtype)
    hw, provenance = await probe(device, dtype, costs, directory, cache=default_cache(), fresh=args.fresh,
                                 layer=bench(device, dtype), progress=_progress(console))
    table = Table(title="tierflow probe", show_header=False, box=None)
    for key, value in hw.to_json().items():
        if value is not None:
            table.add_row(key, format_bytes(value) if key.endswith("_bytes") else
                          f"{value:.3g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if args.out:
        path = save_profile(Profile(hw, Overrides(), provenance), args.out)
        console.print(f"wrote {path}")


def render_engine_plan(console: Console, engine: Any) -> None:
    """The plan an open engine runs, as `tierflow plan` shows it."""
    overrides, work = engine.overrides, engine_workload(engine.config)
    source = engine.hardware_source.get("source", "measured")
    source = "from the profile" if source == "profile" else "measured on this machine"
    render_plan(console, engine.plan, engine.hardware, engine.costs, source,
                improvements(engine.costs, engine.hardware, work, overrides, engine.plan))
