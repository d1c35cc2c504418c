"""Planning from a profile: ``tierflow plan`` / ``tierflow probe`` / ``tierflow run --profile``,
and ``Engine.open`` with ``EngineConfig(profile=...)``."""

from __future__ import annotations

import asyncio
import io
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from tierflow import Engine, EngineConfig, SamplingParams
from tests.cli.clitools import cli
from tierflow.cli.plan import render_engine_plan
from tierflow.errors import ConfigError, ProfileError, TierCapacityError
from tierflow.cli.report import render_plan_vs_actual
from tierflow.tiers.probe.profile import load_profile

GiB = 2**30

# An RTX 3060 Ti (8 GB, 448 GB/s) on PCIe 4.0 x16, with 32 GB of RAM and a 3 GB/s NVMe drive.
RTX_3060_TI = {"device": "cuda", "device_name": "RTX 3060 Ti", "device_memory_bytes": 8 * GiB,
               "host_memory_bytes": 32 * GiB, "disk_read_gbps": 3.0, "decode_gbps": 448.0, "prefill_tflops": 30.0,
               "h2d_gbps": 24.0, "d2h_gbps": 24.0}
CPU_MACHINE = {"device": "cpu", "device_memory_bytes": GiB, "host_memory_bytes": GiB, "disk_read_gbps": 3.0,
               "decode_gbps": 20.0, "prefill_tflops": 0.15}

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}}

PROMPT = [1, 2, 3, 4]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at the terminal width; keep messages on one line so paths stay whole."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture
def llama_8b(tmp_path):
    """A directory holding only a Llama-3.1-8B config.json."""
    (tmp_path / "llama-3.1-8b").mkdir()
    (tmp_path / "llama-3.1-8b" / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return tmp_path / "llama-3.1-8b"


def write_profile(path, hardware=None, **overrides):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "hardware": hardware, "overrides": overrides}))
    return path


@pytest.fixture
def rtx_profile(tmp_path):
    return write_profile(tmp_path / "rtx-3060-ti.json", RTX_3060_TI)


# ----------------------------------------------------------------------------- tierflow plan
def test_plan_json_for_llama_8b_on_an_rtx_3060_ti(capsys, llama_8b, rtx_profile):
    status, out, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--context", 100000, "--json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["version"] == 1
    assert len(doc["placement"]) == len(doc["units"]) == 34      # embed, 32 layers, head
    assert set(doc["placement"]) <= {"device", "host", "disk"}

    predicted = doc["predicted"]
    assert predicted["decode_s_per_token"] > 0 and predicted["prefill_s"] > 0
    assert predicted["bottleneck"] in ("disk", "pcie", "compute")
    assert predicted["peak_device_bytes"] <= 8 * GiB and predicted["peak_host_bytes"] <= 32 * GiB
    # 100,000 tokens x 32 layers x (K and V) x 8 KV heads x 128 x 2 bytes, in whole 256-token blocks
    assert predicted["kv_bytes"] == math.ceil(100_000 / 256) * 256 * 32 * 2 * 8 * 128 * 2 > 13.1e9
    assert predicted["disk_bytes"] >= doc["model_bytes"] > 15e9     # 8.03e9 parameters in bfloat16

    assert isinstance(doc["improvements"], list)
    for item in doc["improvements"]:
        assert isinstance(item["change"], str) and item["speedup"] > 1
        assert item["decode_s_per_token"] < predicted["decode_s_per_token"]


def test_plan_json_keeps_its_stable_keys(capsys, llama_8b, rtx_profile):
    status, out, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--json")
    assert status == 0, err
    doc = json.loads(out)
    assert {"version", "model", "device", "workload", "units", "placement", "kv_blocks", "kv_block_tokens",
            "memory", "predicted", "hardware", "model_bytes", "kv_bytes_per_token", "improvements"} <= set(doc)
    assert doc["device"] == "cuda" and doc["workload"]["context_tokens"] == 4096
    for tier in ("device", "host"):
        memory = doc["memory"][tier]
        assert {"budget", "weights", "staging", "kv", "workspace", "total"} <= set(memory)
        assert memory["total"] <= memory["budget"]
    assert {"decode_s_per_token", "tokens_per_s", "prefill_s", "peak_device_bytes", "peak_host_bytes",
            "disk_bytes", "kv_bytes", "bottleneck", "disk_s", "pcie_s", "compute_s"} <= set(doc["predicted"])
    hardware = doc["hardware"]
    assert {k: hardware[k] for k in RTX_3060_TI} == RTX_3060_TI
    assert str(rtx_profile) in hardware["source"]


def test_python_m_tierflow_cli_prints_the_same_document(capsys, llama_8b, rtx_profile):
    args = ["plan", str(llama_8b), "--profile", str(rtx_profile), "--context", "100000", "--json"]
    out = subprocess.run([sys.executable, "-m", "tierflow.cli", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    status, in_process, _ = cli(capsys, *args)
    assert status == 0 and json.loads(out.stdout) == json.loads(in_process)


def test_plan_report(capsys, llama_8b, rtx_profile):
    status, out, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--context", 100000)
    assert status == 0, err
    for text in ("llama-3.1-8b", "32 layers", "RTX 3060 Ti", "placement", "memory per tier",
                 "predicted for 1 x 100000 tokens of context", "bottleneck", "what would help most"):
        assert text in out, text


BAD_PROFILES = {
    "invalid JSON": ('{"version": 1,\n "hardware": {', r"is not valid JSON"),
    "unknown key": (json.dumps({"version": 1, "hardware": {**RTX_3060_TI, "gpu_name": "x"}}), "hardware.gpu_name"),
    "wrong type": (json.dumps({"version": 1, "hardware": {**RTX_3060_TI, "disk_read_gbps": "fast"}}),
                   "hardware.disk_read_gbps must be a number"),
}


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_a_bad_profile_exits_2_naming_the_file_and_key(capsys, tmp_path, llama_8b, tiny_model, case, command):
    text, message = BAD_PROFILES[case]
    path = tmp_path / "machine.json"
    path.write_text(text)
    args = ["plan", llama_8b] if command == "plan" else ["run", "--model", tiny_model, "--raw", "hi"]
    status, out, err = cli(capsys, *args, "--profile", path)
    assert status == 2 and out == ""
    assert "ProfileError" in err and str(path) in err and message in err


def test_the_error_names_a_profile_path_with_brackets(capsys, tmp_path, llama_8b):
    """Square brackets in a path are printed as they are, not taken as console markup."""
    path = write_profile(tmp_path / "[rtx]" / "machine.json", RTX_3060_TI, prefetch=2)
    status, _, err = cli(capsys, "plan", llama_8b, "--profile", path)
    assert status == 2 and "overrides.prefetch" in err
    assert str(path) in err


def test_device_cuda_without_a_gpu_or_a_profile_exits_2(capsys, monkeypatch, llama_8b):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, out, err = cli(capsys, "plan", llama_8b, "--device", "cuda")
    assert status == 2 and out == ""
    assert "ConfigError" in err and "no CUDA device" in err and "--profile" in err


def test_plan_without_a_profile_measures_this_machine(capsys, tmp_path, tiny_model, small_disk_probe):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    status, out, err = cli(capsys, "plan", model, "--json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["hardware"]["device"] == "cpu" and doc["hardware"]["source"] == "measured on this machine just now"
    cache = tmp_path / "cache" / "probe.json"
    assert cache.exists()
    status, out, _ = cli(capsys, "plan", model, "--json")
    source = json.loads(out)["hardware"]["source"]
    assert source.startswith("cached, measured on this machine ") and source.endswith(f"({cache})")
    assert "cached: disk, compute; measured now: memory" in source
    status, out, _ = cli(capsys, "plan", model)
    assert "cached, measured on this machine" in out and "just now" not in out and str(cache) in out


# ----------------------------------------------------------------------------- tierflow probe
def test_probe_writes_a_profile_that_loads(capsys, tmp_path, tiny_model, small_disk_probe):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    status, _, err = cli(capsys, "probe", "--model", tiny_model, "--dir", tmp_path, "--out", first)
    assert status == 0, err
    assert str(first) in err
    doc = json.loads(first.read_text())
    assert doc["version"] == 1 and doc["hardware"]["device"] == "cpu"
    profile = load_profile(first)
    assert profile.hardware.disk_read_gbps > 0 and profile.hardware.decode_gbps > 0
    assert profile.measured["disk"]["source"] == "measured"
    assert (tmp_path / "cache" / "probe.json").exists()

    status, _, err = cli(capsys, "probe", "--model", tiny_model, "--dir", tmp_path, "--out", second)
    assert status == 0, err
    assert load_profile(second).measured["disk"]["source"] == "cache"
    assert not list(tmp_path.glob(".tierflow-probe*"))


# ----------------------------------------------------------------------------- the engine
def engine_profile(hardware=CPU_MACHINE, **overrides):
    return {"version": 1, "hardware": hardware, "overrides": overrides}


def generate(model, profile, new_tokens=6):
    """(plan, greedy token ids, stats) of an engine opened with ``profile``."""
    async def main():
        config = EngineConfig(device="cpu", kv_reserve_tokens=64, profile=profile)
        async with await Engine.open(model, config) as engine:
            out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            return engine.plan, out.token_ids, engine.stats()
    return asyncio.run(main())


def test_engine_streams_the_layers_the_profile_pins_to_disk(tiny_model):
    plan, tokens, stats = generate(tiny_model, engine_profile(tiers={"layers.0-1": "disk"}))
    assert plan.tiers == ("device", "disk", "disk", "device", "device")
    assert stats.units_streamed == 2 and stats.bytes_streamed > 0

    resident_plan, resident_tokens, _ = generate(tiny_model, engine_profile())
    assert resident_plan.streamed == ()
    assert tokens == resident_tokens and len(tokens) == 6

    assert stats.decode_sweeps >= 3
    assert stats.predicted_decode.total_s > 0 and stats.predicted_decode.disk_s > 0
    assert stats.measured_decode.total_s > 0 and stats.measured_decode.compute_s > 0


def test_a_profile_path_works_like_a_dict(tiny_model, tmp_path):
    doc = engine_profile(tiers={"layers.0-1": "disk"})
    path = write_profile(tmp_path / "machine.json", doc["hardware"], **doc["overrides"])
    from_dict = generate(tiny_model, doc)
    for source in (path, str(path)):
        plan, tokens, _ = generate(tiny_model, source)
        assert plan.tiers == from_dict[0].tiers and tokens == from_dict[1]


FAILED_OPENS = {
    "unknown key": (engine_profile(prefetch=2), ProfileError, r"overrides\.prefetch"),
    "pinned units do not fit": (engine_profile(tiers={"all": "device"}, device_memory_bytes=4096), TierCapacityError,
                                r"device memory is short by \d+ bytes.*budget is 4096"),
    "host tier on a CPU": (engine_profile(tiers={"layers.0": "host"}), ProfileError,
                           r"overrides\.tiers\.layers\.0.*no separate host tier"),
}


@pytest.mark.parametrize("case", list(FAILED_OPENS))
def test_a_failed_open_leaves_nothing_broken(tiny_model, case):
    profile, error, message = FAILED_OPENS[case]
    with pytest.raises(error, match=message):
        generate(tiny_model, profile)
    _, tokens, _ = generate(tiny_model, engine_profile(), new_tokens=2)
    assert len(tokens) == 2


def test_a_cuda_profile_on_the_cpu_engine_is_refused(tiny_model):
    """The engine runs on the CPU. A CUDA machine's profile plans tiers (host RAM, PCIe copies)
    the CPU engine does not have: Engine.open refuses it, naming both devices, rather than
    accepting the plan and failing every request; the engine still opens with a CPU profile."""
    with pytest.raises(ConfigError, match=r"describes a 'cuda' machine but the engine runs on 'cpu'"):
        generate(tiny_model, engine_profile(RTX_3060_TI, tiers={"layers.0": "host"}))
    _, tokens, _ = generate(tiny_model, engine_profile())
    assert len(tokens) > 0


# ----------------------------------------------------------------------------- --report
def test_run_with_a_profile_prints_its_plan_and_needs_a_tokenizer_for_text(capsys, tmp_path, tiny_model):
    """The tiny checkpoints have no tokenizer: `tierflow run` prints the plan of --profile,
    then exits 2 because a text prompt cannot be encoded."""
    path = write_profile(tmp_path / "machine.json", CPU_MACHINE, tiers={"layers.0-1": "disk"})
    status, _, err = cli(capsys, "run", "--model", tiny_model, "--profile", path, "--report",
                         "--max-new-tokens", 4, "--raw", "hello")
    assert status == 2
    assert "placement" in err and "layers 0-1" in err and "from the profile" in err
    assert "PromptError" in err and "no tokenizer" in err


def test_report_of_plan_vs_actual(tiny_model):
    async def main():
        config = EngineConfig(device="cpu", kv_reserve_tokens=64, profile=engine_profile(tiers={"layers.0-1": "disk"}))
        async with await Engine.open(tiny_model, config) as engine:
            await engine.generate(PROMPT, SamplingParams(max_new_tokens=5, ignore_eos=True))
            console = Console(file=io.StringIO(), width=200)
            render_engine_plan(console, engine)
            render_plan_vs_actual(console, engine.stats())
            return console.file.getvalue(), engine.stats()

    text, stats = asyncio.run(main())
    assert "from the profile" in text and "layers 0-1" in text and "what would help most" in text
    assert f"plan vs actual, per decode sweep ({stats.decode_sweeps} sweeps)" in text
    for stage in ("disk reads", "compute", "sweep (wall)", "largest stage"):
        assert stage in text, stage
    assert "PCIe" not in text                       # a CPU engine copies nothing over PCIe


def test_plan_predicts_speculative_decoding_at_a_stated_acceptance(capsys, llama_8b, rtx_profile):
    """An 8B model streamed over a 3060 Ti's PCIe and disk: a sweep is read-bound, so extra
    verified tokens are nearly free and the predicted speed-up approaches the tokens per sweep."""
    status, out, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 0.8, "--json")
    assert status == 0, err
    s = json.loads(out)["speculation"]
    assert s["acceptance"] == 0.8 and s["num_speculative_tokens"] >= 4 and s["bottleneck"] in ("disk", "pcie")
    assert s["tokens_per_sweep"] == pytest.approx((1 - 0.8 ** (s["num_speculative_tokens"] + 1)) / 0.2)
    assert 0.8 * s["tokens_per_sweep"] < s["speedup"] <= s["tokens_per_sweep"]
    status, out, _ = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 0.8)
    assert status == 0 and "speculative decoding at acceptance 0.80" in out and "x the tokens/s" in out
    status, _, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 1.5)
    assert status == 2 and "--acceptance must be a rate within 0..1" in err


def test_plan_weighs_candidate_trees_at_stated_alternative_hit_rates(capsys, llama_8b, rtx_profile):
    """Alternatives that often hold the model's token beside a read-bound sweep: a wider tree
    yields more tokens per sweep than the chain at the same acceptance."""
    status, out, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 0.5, "--json")
    chain = json.loads(out)["speculation"]
    status, out, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 0.5,
                           "--alternative-hits", "0.4,0.55", "--json")
    assert status == 0, err
    tree = json.loads(out)["speculation"]
    assert chain["tree_width"] == 1 and tree["tree_width"] > 1
    assert tree["tokens_per_sweep"] > chain["tokens_per_sweep"] and tree["speedup"] > chain["speedup"]
    status, out, _ = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 0.5,
                         "--alternative-hits", "0.4,0.55")
    assert status == 0 and f"in a tree of width {tree['tree_width']}" in out
    for bad in ("0.5,0.2", "0.4,x", "1.5"):
        status, _, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--acceptance", 0.5,
                             "--alternative-hits", bad)
        assert status == 2 and "--alternative-hits must be" in err
    status, _, err = cli(capsys, "plan", llama_8b, "--profile", rtx_profile, "--alternative-hits", "0.4")
    assert status == 2 and "needs --acceptance" in err


def test_plan_prices_the_expert_cache_by_measured_routing(capsys, tmp_path):
    """A tiny MoE engine's run records its router's picks; ``tierflow plan --routing`` on that
    file prices the expert cache by them: the hit rate the plan assumes is the curve's at the
    experts per layer it caches, not the cache's share of all experts."""
    from tierflow.testing import build_random_checkpoint
    from tierflow.tiers.plan.routing import RoutingStats
    from tierflow.tiers.probe.profile import save_routing

    model = build_random_checkpoint(tmp_path / "mixtral", "mixtral", num_layers=2, num_local_experts=8,
                                    num_experts_per_tok=2)

    async def run():
        async with await Engine.open(model, EngineConfig(device="cpu", dtype="float32", expert_cache_bytes=0,
                                                         profile={"version": 1, "hardware": CPU_MACHINE})) as engine:
            await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=24, ignore_eos=True))
            return engine.pipeline_statistics().experts.routing

    routing = asyncio.run(run())
    assert routing.requests > 0 and routing.num_experts == 8
    path = tmp_path / "routing.json"
    save_routing(routing, path)
    profile = write_profile(tmp_path / "cpu.json", CPU_MACHINE)
    args = ("plan", model, "--profile", profile, "--json", "--device-memory", "5MiB")    # room for some experts
    status, out, err = cli(capsys, *args)
    assert status == 0, err
    uniform = json.loads(out)
    status, out, err = cli(capsys, *args, "--routing", path)
    assert status == 0, err
    measured = json.loads(out)
    assert uniform["routing"] == "uniform" and measured["routing"] == "measured"
    expert = CheckpointIndex_expert_bytes(model)
    assert 0 < uniform["expert_cache_bytes"] < 16 * expert        # a part of the 2 x 8 experts
    assert uniform["expert_hit_rate"] == pytest.approx(uniform["expert_cache_bytes"] / (16 * expert))
    per_layer = measured["expert_cache_bytes"] // expert // 2
    assert 0 < per_layer < 8
    assert measured["expert_hit_rate"] == pytest.approx(routing.hit_rate(per_layer))
    assert measured["expert_hit_rate"] != pytest.approx(uniform["expert_hit_rate"])
    status, out, _ = cli(capsys, "plan", model, "--profile", profile, "--device-memory", "5MiB", "--routing", path)
    assert status == 0 and "(measured routing)" in out
    other = RoutingStats(4, requests=1, cold=1)
    save_routing(other, tmp_path / "other.json")
    for bad, why in ((tmp_path / "other.json", "measured over 4 experts per layer"),
                     (tmp_path / "none.json", "could not read")):
        status, _, err = cli(capsys, *args, "--routing", bad)
        assert status == 2 and why in err


def CheckpointIndex_expert_bytes(model) -> int:
    """What one cached expert holds (float32 checkpoint, float32 compute: its read)."""
    from tierflow.tiers.checkpoint.index import CheckpointIndex
    return max(e.buffer_bytes for e in CheckpointIndex.open(model).experts.values())
