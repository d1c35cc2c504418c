"""`tierflow plan` and `tierflow probe`: the hardware report, and measuring a machine."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
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
from tierflow.cli.formatting import format_bytes, format_seconds
from tierflow.cli.hardware_source import HardwareSource, describe_source
from tierflow.cli.report import plan_document, render_plan
from tierflow.tiers.plan.advice import improvements
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import ModelCosts, Workload, costs_from_spec
from tierflow.tiers.plan.planner import plan
from tierflow.tiers.plan.speculation import predict_speculation
from tierflow.tiers.probe.cache import default_cache
from tierflow.tiers.probe.probe import probe
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides, Profile
from tierflow.tiers.probe.profile import load_profile, load_routing, save_profile

# Layer shapes the probe times when no model is given (a Llama-3.2-1B-sized layer).
DEVICE_CHOICES = ["auto", "cpu", "cuda"]
DTYPE_CHOICES = ["float32", "bfloat16", "float16"]
GENERIC_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 16,
                  "vocab_size": 128256, "torch_dtype": "bfloat16", "tie_word_embeddings": True}


def add_plan_commands(sub: Any, parse_size: Callable[[str], int]) -> None:
    """The ``plan`` and ``probe`` subcommands. Every flag's help says its choices and default;
    a bad value is a ConfigError, which ``tierflow`` prints as a usage error (exit 2)."""
    p = sub.add_parser("plan", help="plan where a model's layers and KV live, and predict its speed")
    p.add_argument("model", help="model directory (config.json alone is enough) or a config.json file")
    p.add_argument("--context", type=int, default=4096, metavar="TOKENS",
                   help="tokens of context per sequence, prompt and generated, >= 1 (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="sequences decoded together, >= 1 (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=256, metavar="TOKENS",
                   help="tokens generated per sequence, >= 0, at most --context - 1 (default %(default)s)")
    p.add_argument("--device-memory", type=parse_size, metavar="SIZE",
                   help="cap on device memory, e.g. 8GiB (default: the free memory less a safety margin)")
    p.add_argument("--host-memory", type=parse_size, metavar="SIZE",
                   help="cap on host (pinned) memory, e.g. 32GiB (default: the available RAM less a safety margin)")
    p.add_argument("--profile", metavar="FILE",
                   help="profile JSON: plan for its hardware, with its overrides (default: measure this machine)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="device to plan for: auto (cuda when one is visible, else cpu), cpu or cuda "
                        "(default %(default)s; a profile's hardware decides instead)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                   help="compute dtype: auto (as the engine chooses), float32, bfloat16 or float16 "
                        "(default %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="measure this machine again instead of using the probe's cache (default: use the cache)")
    p.add_argument("--acceptance", type=float, metavar="RATE",
                   help="also predict speculative decoding at this per-token acceptance rate, 0..1: the best "
                        "number of proposed tokens, tokens per sweep and the speed-up for one sequence "
                        "(prompt lookup: no draft cost) (default: not shown)")
    p.add_argument("--alternative-hits", metavar="RATES",
                   help="with --acceptance, also weigh candidate trees: comma-separated rates, 0..1 and not "
                        "decreasing, at which the first 1, 2, ... alternatives beside a rejected proposal hold "
                        "the model's token (e.g. 0.3,0.4); the best tree width is then predicted too "
                        "(default: chains only)")
    p.add_argument("--routing", metavar="FILE",
                   help="a MoE model's measured routing (the JSON save_routing(engine.pipeline_statistics()"
                        ".experts.routing, FILE) writes): the expert cache's hit rate "
                        "from it instead of uniform routing's (default: uniform)")
    p.add_argument("--json", action="store_true", help="print the plan as a JSON document (default: tables)")
    q = sub.add_parser("probe", help="measure this machine (memory, disk, PCIe, compute) and write a profile JSON")
    q.add_argument("--model", metavar="PATH", help="time this model's layer shapes and its directory's disk "
                                                   "(default: a generic 1B-sized layer and the current directory)")
    q.add_argument("--dir", metavar="DIR", help="an existing directory whose disk to measure (default: the "
                                                "model's, else the current one)")
    q.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="device to measure: auto (cuda when one is visible, else cpu), cpu or cuda "
                        "(default %(default)s)")
    q.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES,
                   help="dtype the compute is timed in: float32, bfloat16 or float16 (default %(default)s)")
    q.add_argument("--fresh", action="store_true",
                   help="measure again instead of using the probe's cache (default: use the cache)")
    q.add_argument("--out", metavar="FILE",
                   help="write the profile JSON here, in an existing directory (default: print the figures only)")


def _check_values(args: argparse.Namespace) -> None:
    """Flag values argparse's types cannot check: ConfigErrors naming the flag and the value."""
    for flag, low in (("context", 1), ("concurrency", 1), ("new_tokens", 0)):
        value = getattr(args, flag)
        if value < low:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    for flag in ("device_memory", "host_memory"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a size above 0, e.g. 8GiB; got {value} bytes")
    acceptance = getattr(args, "acceptance", None)
    if acceptance is not None and not 0.0 <= acceptance <= 1.0:
        raise ConfigError(f"--acceptance must be a rate within 0..1, e.g. 0.7; got {acceptance}")
    if getattr(args, "alternative_hits", None) is not None:
        args.alternative_hits = _rates(args.alternative_hits, acceptance)


def _existing_dir(flag: str, text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing there"
        raise ConfigError(f"{flag} {text!r}: expected an existing directory, found {found}; give the directory "
                          "whose disk to measure (it is not created)")
    return path


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
                    directory: Path, bench: Callable[..., Any], console: Console
                    ) -> tuple[HardwareProfile, HardwareSource]:
    if profile is not None and profile.hardware is not None:
        return profile.hardware, describe_source({"source": "profile", **dict(profile.measured)},
                                                 profile_file=args.profile)
    device = _device(args.device)
    cache = default_cache()
    hw, provenance = await probe(device, dtype, costs, directory, cache=cache, fresh=args.fresh,
                                 layer=bench(device, dtype), progress=_progress(console))
    return hw, describe_source(provenance, cache_file=cache.path)


async def run_plan_command(args: argparse.Namespace, console: Console) -> None:
    if args.command == "probe":
        return await _probe_command(args, console)
    _check_values(args)
    profile = load_profile(args.profile) if args.profile else None
    device_type = profile.hardware.device if profile and profile.hardware else _device(args.device).type
    costs, dtype, directory, bench = _model_costs(args.model, args.dtype, device_type)
    if getattr(args, "routing", None) is not None:
        costs = _with_routing(costs, args.routing)
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
    speculation = None
    if args.acceptance is not None:
        speculation = predict_speculation(costs, hw, result.tiers, context=args.context, acceptance=args.acceptance,
                                          alternative_hits=args.alternative_hits or ())
    if args.json:
        document = plan_document(result, hw, costs, source, helps)
        if speculation is not None:
            document["speculation"] = {**asdict(speculation), "speedup": speculation.speedup}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        render_plan(Console(), result, hw, costs, source, helps)
        if speculation is not None:
            s = speculation
            tree = f" in a tree of width {s.tree_width}" if s.tree_width > 1 else ""
            Console().print(f"speculative decoding at acceptance {s.acceptance:.2f}: {s.num_speculative_tokens} "
                            f"proposed tokens per sweep{tree}, {s.tokens_per_sweep:.2f} tokens per sweep, a sweep "
                            f"{format_seconds(s.sweep_s)} vs {format_seconds(s.plain_sweep_s)} plain "
                            f"({s.bottleneck}-bound): {s.speedup:.2f}x the tokens/s of one sequence")


def _with_routing(costs: ModelCosts, path: str) -> ModelCosts:
    """``--routing``: the hit rates of measured routing in place of uniform routing's."""
    if costs.experts is None:
        raise ConfigError(f"--routing {path}: {costs.name} has no routed experts")
    try:
        stats = load_routing(path)
    except ValueError as exc:
        raise ConfigError(f"--routing: {exc}") from None
    if stats.num_experts != costs.experts.num_experts:
        raise ConfigError(f"--routing {path}: measured over {stats.num_experts} experts per layer, but "
                          f"{costs.name} has {costs.experts.num_experts}; measure a run of this model")
    if stats.requests <= stats.cold:
        raise ConfigError(f"--routing {path}: no expert was asked for twice in that run ({stats.requests} requests, "
                          "all first uses), so it says nothing about reuse; measure a longer run")
    return replace(costs, experts=replace(costs.experts, hit_curve=stats.curve()))


def _rates(text: str, acceptance: float | None) -> tuple[float, ...]:
    """``--alternative-hits``: rates within 0..1, not decreasing (more alternatives hold more)."""
    if acceptance is None:
        raise ConfigError("--alternative-hits needs --acceptance (the chain's acceptance rate), e.g. "
                          "--acceptance 0.6 --alternative-hits 0.3,0.4")
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--alternative-hits must be comma-separated rates, e.g. 0.3,0.4; got {text!r}") from None
    if any(not 0.0 <= r <= 1.0 for r in rates) or any(b < a for a, b in zip(rates, rates[1:])):
        raise ConfigError(f"--alternative-hits must be rates within 0..1 that do not decrease, e.g. 0.3,0.4; "
                          f"got {text!r}")
    return rates


async def _probe_command(args: argparse.Namespace, console: Console) -> None:
    device = _device(args.device)
    if args.out is not None:
        _existing_dir("--out's directory", str(Path(args.out).expanduser().absolute().parent))
    if args.model:
        costs, _, directory, bench = _model_costs(args.model, args.dtype, device.type)
    else:
        adapter = adapter_for(GENERIC_CONFIG)
        spec = adapter.spec_from_config(GENERIC_CONFIG)
        costs = costs_from_spec(spec, adapter, args.dtype, name="generic")
        directory, bench = Path.cwd(), partial(layer_benchmark, spec, adapter)
    directory = _existing_dir("--dir", args.dir) if args.dir else directory
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
    """The plan an open engine runs, as `tierflow plan` shows it, saying where its hardware
    figures came from (``engine.hardware_source``: the probe's provenance, or the profile's)."""
    overrides, work = engine.overrides, engine_workload(engine.config)
    provenance = engine.hardware_source
    source = describe_source(provenance, cache_file=provenance.get("cache_file"),
                             profile_file=provenance.get("profile_file"))
    render_plan(console, engine.plan, engine.hardware, engine.costs, source,
                improvements(engine.costs, engine.hardware, work, overrides, engine.plan))
