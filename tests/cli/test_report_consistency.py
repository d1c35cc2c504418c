"""The report's tables agree with each other and with the plan: each byte counted once, the
bottleneck named for what it is, the hardware figures' source said as it is, nothing shown
that the device does not have, and every table within 80 columns."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
from dataclasses import replace

import pytest
from rich.console import Console

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.cli.args import build_parser
from tierflow.cli.formatting import format_bytes
from tierflow.cli.hardware_source import HardwareSource, describe_source
from tierflow.cli.plan import render_engine_plan
from tierflow.cli.report import placement_rows, render_plan, render_plan_vs_actual
from tierflow.engine.planning import index_costs
from tierflow.testing import SimulatedCuda, build_random_llama, oracle_greedy
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.advice import improvements
from tierflow.tiers.plan.costmodel import DEVICE, DISK, HOST, Workload, costs_from_spec
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides
from tierflow.tiers.plan.planner import plan
from tierflow.tiers.plan.timing import decode_times
from tierflow.adapters import adapter_for

import torch

MiB, GiB = 2**20, 2**30
CPU = HardwareProfile(device="cpu", device_memory_bytes=GiB, host_memory_bytes=GiB, disk_read_gbps=3.0,
                      decode_gbps=20.0, prefill_tflops=0.15, device_name="a test CPU (2 CPUs)")
CUDA = HardwareProfile(device="cuda", device_memory_bytes=8 * GiB, host_memory_bytes=32 * GiB, disk_read_gbps=3.0,
                       decode_gbps=448.0, prefill_tflops=30.0, h2d_gbps=24.0, d2h_gbps=24.0,
                       device_name="RTX 3060 Ti", pcie_link="Gen4 x16", pcie_link_gbps=31.5, kvikio_mode="compat",
                       device_overhead_bytes=96 * MiB)
WORK = Workload(context_tokens=512, concurrency=1, new_tokens=64)
PLACEMENTS = {                                  # name -> (hardware, overrides.tiers)
    "cpu resident": (CPU, {}),
    "cpu streamed": (CPU, {"layers.0-1": "disk"}),
    "cpu all on disk": (CPU, {"all": "disk"}),
    "cuda resident": (CUDA, {}),
    "cuda host and disk": (CUDA, {"embed": "host", "layers.0": "host", "layers.1": "disk"}),
    "cuda all on disk": (CUDA, {"all": "disk"}),
}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def costs(request, tmp_path_factory):
    path = build_random_llama(tmp_path_factory.mktemp("m") / "model", tie_word_embeddings=request.param,
                              vocab_size=4096)
    return index_costs(CheckpointIndex.open(path), torch.float32)


def rendered(render, width=80):
    console = Console(width=width, record=True, file=io.StringIO())
    render(console)
    return console.export_text()


# ----------------------------------------------------------------------------- each byte once
@pytest.mark.parametrize("case", list(PLACEMENTS))
def test_the_placement_counts_what_the_memory_table_and_the_plan_count(costs, case):
    hw, tiers = PLACEMENTS[case]
    p = plan(costs, hw, WORK, Overrides(tiers=tiers))
    rows = {row.tier: row for row in placement_rows(p, costs)}
    assert set(rows) == ({DEVICE, DISK} if hw.is_cpu else {DEVICE, HOST, DISK})
    for tier in set(rows) - {DISK}:
        assert rows[tier].weight_bytes == p.memory[tier].weights, tier
        assert rows[tier].kv_bytes == p.memory[tier].kv, tier
    assert sum(row.kv_bytes for row in rows.values()) == p.predicted.kv_bytes
    assert p.predicted.disk_bytes == costs.checkpoint_bytes + rows[DISK].kv_bytes
    # on disk: the units' reads, a tied embedding's tensor once; all of them are the checkpoint
    on_disk = [u for u, t in zip(costs.units, p.tiers) if t == DISK]
    tied_twice = costs.tied and p.tiers[0] == p.tiers[-1] == DISK
    assert rows[DISK].weight_bytes == sum(u.stream_bytes for u in on_disk) - tied_twice * costs.units[0].stream_bytes
    if case.endswith("all on disk"):
        assert rows[DISK].weight_bytes == costs.checkpoint_bytes
    if case.endswith("resident"):       # one copy of every weight (on CUDA the embedding may stay on the host)
        assert DISK not in p.tiers
        expected = sum(u.resident_bytes for u in costs.units) - costs.tied * costs.units[0].resident_bytes
        assert sum(row.weight_bytes for tier, row in rows.items() if tier != DISK) == expected
    # the tables print those numbers
    text = rendered(lambda c: render_plan(c, p, hw, costs, "from a test", []))
    placement = text[text.index("placement"):text.index("memory per tier")]
    memory = text[text.index("memory per tier"):text.index("predicted for")]
    for tier, row in rows.items():
        line = next(line for line in placement.splitlines() if line.strip().startswith(
            "device (RAM)" if tier == DEVICE and hw.is_cpu else tier))
        assert (format_bytes(row.weight_bytes) if row.weight_bytes else "—") in line
    weights = next(line for line in memory.splitlines() if line.strip().startswith("weights"))
    assert weights.split()[1:] == " ".join(format_bytes(p.memory[t].weights) for t in rows if t != DISK).split()


def test_a_tied_embedding_is_not_counted_twice_on_the_device():
    """The demo's case: SmolLM2-135M (tied embeddings) in float32 under a 256 MiB device budget."""
    costs = config_costs()
    p = plan(costs, CPU, Workload(1024, 1, 256), Overrides(device_memory_bytes=256 * MiB))
    assert p.tiers[0] == p.tiers[-1] == DEVICE and p.streamed
    device = placement_rows(p, costs)[0]
    assert device.weight_bytes == p.memory[DEVICE].weights < 256 * MiB
    text = rendered(lambda c: render_plan(c, p, CPU, costs, "from a test", []))
    assert text.count(format_bytes(p.memory[DEVICE].weights)) >= 2      # placement and memory tables


# ----------------------------------------------------------------------------- 80 columns
@pytest.mark.parametrize("case", list(PLACEMENTS))
def test_every_table_fits_80_columns(costs, case):
    hw, tiers = PLACEMENTS[case]
    work = Workload(context_tokens=100_000, concurrency=4, new_tokens=256)
    p = plan(costs, hw, work, Overrides(tiers=tiers))
    helps = improvements(costs, hw, work, Overrides(tiers=tiers), p)
    source = describe_source({"disk": {"source": "cache", "measured_at": "2026-12-01T09:30:00+0000"},
                              "compute": {"source": "measured"}}, cache_file="/home/user/.cache/tierflow/probe.json")

    def render(console):
        render_plan(console, p, hw, costs, source, helps)

    narrow, wide = rendered(render), rendered(render, width=400)
    lines = narrow.splitlines()
    assert max(len(line) for line in lines) <= 80
    # nothing wrapped or cut short: the same lines as on a terminal with room to spare
    assert [line.rstrip() for line in lines] == [line.rstrip() for line in wide.splitlines()]
    assert "…" not in narrow


def config_costs(**config):
    config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "hidden_size": 576,
              "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
              "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, **config}
    adapter = adapter_for(config)
    return costs_from_spec(adapter.spec_from_config(config), adapter, "float32", name="smollm2")


def test_a_scattered_placement_still_fits():
    costs = config_costs(num_hidden_layers=40)
    p = plan(costs, CPU, WORK, Overrides(tiers={f"layers.{i}": "disk" for i in range(0, 40, 2)}))
    text = rendered(lambda c: render_plan(c, p, CPU, costs, "from a test", []))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "20 of 40 layers" in text


# ----------------------------------------------------------------------------- nothing that does not apply
def test_a_cpu_plan_shows_no_pcie_and_a_cuda_plan_does(costs):
    cpu = rendered(lambda c: render_plan(c, plan(costs, CPU, WORK), CPU, costs, "from a test", []))
    cuda = rendered(lambda c: render_plan(c, plan(costs, CUDA, WORK), CUDA, costs, "from a test", []))
    assert "PCIe" not in cpu and "pinned" not in cpu and "host memory" not in cpu and "runtime" not in cpu
    assert "staging slots" not in cpu and "none: every unit is resident" in cpu
    assert "PCIe" in cuda and "per token" in cuda and "runtime (assumed)" not in cuda and "96.0 MiB" in cuda


# ----------------------------------------------------------------------------- the bottleneck
GPU_HARDWARE = {"device": "cuda", "device_memory_bytes": GiB, "host_memory_bytes": GiB, "disk_read_gbps": 2.0,
                "decode_gbps": 100.0, "prefill_tflops": 10.0, "h2d_gbps": 0.05, "d2h_gbps": 0.05}
CPU_HARDWARE = {"device": "cpu", "device_memory_bytes": GiB, "host_memory_bytes": GiB, "disk_read_gbps": 0.05,
                "decode_gbps": 20.0, "prefill_tflops": 0.15}
ENGINES = {     # name -> (hardware, tiers, the bottleneck)
    "cpu, streamed from a slow disk": (CPU_HARDWARE, {"layers.0-1": "disk"}, "disk"),
    "cpu, resident": (CPU_HARDWARE, {}, "compute"),
    "cuda, layers on the host over a slow link": (GPU_HARDWARE, {"layers.0-2": "host"}, "pcie"),
}
PROMPT = [5, 17, 99, 3]
NEW_TOKENS = 6


def open_and_generate(model, case, kv_reserve_tokens=16):
    hardware, tiers, _ = ENGINES[case]
    cuda = hardware["device"] == "cuda"
    profile = {"version": 1, "hardware": hardware, "overrides": {"tiers": tiers}}

    async def main():
        config = EngineConfig(device="cuda" if cuda else "cpu", kv_reserve_tokens=kv_reserve_tokens, profile=profile)
        async with await Engine.open(model, config, device_ops=SimulatedCuda() if cuda else None) as engine:
            out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            console = Console(width=80, record=True, file=io.StringIO())
            render_engine_plan(console, engine)
            render_plan_vs_actual(console, engine.stats())
            return engine, out.token_ids, engine.stats(), console.export_text()
    return asyncio.run(main())


def largest(times):
    return max({"disk": times.disk_s, "pcie": times.pcie_s, "compute": times.compute_s}.items(), key=lambda i: i[1])[0]


@pytest.mark.parametrize("case", list(ENGINES))
def test_the_plans_bottleneck_is_the_largest_stage_of_the_engines_prediction(tiny_model, case):
    engine, tokens, stats, text = open_and_generate(tiny_model, case)
    assert list(tokens) == oracle_greedy(tiny_model, PROMPT, NEW_TOKENS)
    assert stats.decode_sweeps == NEW_TOKENS - 1
    assert engine.plan.predicted.bottleneck == largest(stats.predicted_decode) == ENGINES[case][2]
    # one computation: the sweeps that ran, priced by the plan's own function, inputs and hardware
    expected = [decode_times(engine.costs, engine.hardware, engine.plan.tiers,
                             {DEVICE: engine.costs.kv_read_bytes(n)}, [n]) for n in range(len(PROMPT) + 1,
                                                                                         len(PROMPT) + NEW_TOKENS)]
    for stage in ("disk_s", "pcie_s", "compute_s", "total_s"):
        assert getattr(stats.predicted_decode, stage) == pytest.approx(
            sum(getattr(t, stage) for t in expected) / len(expected), rel=1e-9), stage
    assert ("PCIe copies" in text) == (ENGINES[case][0]["device"] == "cuda")
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_plan_and_the_sweeps_that_ran_say_what_their_figures_are_for(tiny_model):
    """A plan for a long context is priced at the last token of it; the sweeps that ran at the
    start of a sequence are shorter. Each table says which it shows."""
    engine, _, stats, text = open_and_generate(tiny_model, "cpu, resident", kv_reserve_tokens=4096)
    assert engine.plan.predicted.decode.compute_s > stats.predicted_decode.compute_s
    assert "bottleneck      compute, at the last token of the full context" in text
    assert "predicted: the plan's cost model, at these sweeps' lengths" in text
    assert "largest stage" in text


# ----------------------------------------------------------------------------- where the figures came from
def test_describe_source(tmp_path):
    cache = tmp_path / "probe.json"
    cache.write_text("{}")
    os.utime(cache, (1764670000, 1764670000))
    stamp = "2026-11-30T08:05:00+0000"
    now = describe_source({"disk": {"source": "measured"}, "compute": {"source": "measured"}}, cache_file=cache)
    assert now == HardwareSource("measured on this machine just now")
    cached = describe_source({"disk": {"source": "cache", "measured_at": stamp},
                              "compute": {"source": "cache", "measured_at": "2026-12-01T08:05:00+0000"}},
                             cache_file=cache)
    assert cached.summary == "cached, measured on this machine 2026-11-30 08:05" and cached.file == str(cache)
    assert cached.details == ("cached: disk, compute", "measured now: memory")
    undated = describe_source({"disk": {"source": "cache"}, "compute": {"source": "measured"}}, cache_file=cache)
    assert "cache last written 2025-12-02" in undated.summary
    assert undated.details == ("cached: disk", "measured now: compute, memory")
    profile = describe_source({"source": "profile", "when": stamp}, profile_file="/etc/machine.json")
    assert str(profile) == "from the profile; probed 2026-11-30 08:05 (/etc/machine.json)"
    assert describe_source({"source": "profile", "profile_file": None}).details == ("given inline, not as a file",)


def test_an_engines_report_names_its_profile_file(tiny_model, tmp_path):
    path = tmp_path / "machine.json"
    path.write_text(json.dumps({"version": 1, "hardware": CPU_HARDWARE}))

    async def main(profile):
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", kv_reserve_tokens=16,
                                                              profile=profile)) as engine:
            console = Console(width=200, record=True, file=io.StringIO())
            render_engine_plan(console, engine)
            return console.export_text()

    named = asyncio.run(main(path))
    assert "from the profile" in named and any(line.split() == ["from", str(path)] for line in named.splitlines())
    assert "given inline, not as a file" in asyncio.run(main({"version": 1, "hardware": CPU_HARDWARE}))


# ----------------------------------------------------------------------------- the flags
def subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in ("plan", "probe")}


@pytest.mark.parametrize("command", ["plan", "probe"])
def test_every_flag_says_its_choices_and_default(command):
    parser = subcommands()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, name
        text = action.help % {"default": action.default}
        for choice in action.choices or ():
            assert choice in text, (name, choice)
        if action.default not in (None, False):
            assert f"default {action.default}" in text, name
        else:
            assert "default" in text or not action.option_strings, name


def cli(capsys, *args):
    from tierflow.cli.main import main
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.mark.parametrize("what", ["a file", "a missing tree"])
def test_probe_dir_must_be_an_existing_directory(capsys, tmp_path, wide, what):
    target = tmp_path / "file.txt" if what == "a file" else tmp_path / "typo" / "path"
    if what == "a file":
        target.write_text("x")
    status, out, err = cli(capsys, "probe", "--dir", target)
    assert status == 2 and out == ""
    assert "ConfigError" in err and "--dir" in err and str(target) in err and "existing directory" in err
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("flag, value", [("--context", 0), ("--concurrency", 0), ("--new-tokens", -1),
                                         ("--device-memory", "0")])
def test_plan_bad_values_are_clean_errors(capsys, tmp_path, tiny_model, wide, flag, value):
    profile = tmp_path / "machine.json"
    profile.write_text(json.dumps({"version": 1, "hardware": CPU_HARDWARE}))
    status, out, err = cli(capsys, "plan", tiny_model, "--profile", profile, flag, value)
    assert status == 2 and out == ""
    assert "ConfigError" in err and flag in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--context", "many"], ["--device", "tpu"], ["--device-memory", "lots"]])
def test_plan_unparsable_values_are_usage_errors(capsys, tiny_model, args):
    try:
        status, _, err = cli(capsys, "plan", tiny_model, *args)
    except SystemExit as exit_:     # argparse's own exit, where main does not catch it
        status, err = exit_.code, capsys.readouterr().err
    assert status == 2 and args[0] in err
