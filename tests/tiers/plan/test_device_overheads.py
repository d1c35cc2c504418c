"""The device budget keeps room for what the runtime and PyTorch's caching allocator hold beside
the plan's buffers (``tiers.plan.overhead``): the runtime's overhead from the profile (or the
assumed default), the allocator's rounding, the contiguous KV's growth transient. A cap is a cap
on all of it; the plan shows each part; a profile may set the runtime's figure."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from rich.console import Console

from tierflow.errors import ProfileError, TierCapacityError
from tierflow.cli.report import plan_document, render_plan
from tierflow.tiers.plan import overhead as oh
from tierflow.tiers.plan.costmodel import Workload
from tierflow.tiers.plan.hardware import DEFAULT_DEVICE_OVERHEAD_BYTES, HardwareProfile, Overrides
from tierflow.tiers.plan.planner import minimum_device_bytes, plan
from tierflow.tiers.probe.profile import load_profile, save_profile
from tests.tiers.plan.test_planner import LLAMA_31_8B, RTX_3060_TI, SMALL, SMALL_WORK, costs, small_config

GiB, MiB = 2**30, 2**20
LLAMA_8B = costs(LLAMA_31_8B, name="llama-3.1-8b")
WORK = Workload(context_tokens=4096)
CPU = HardwareProfile(device="cpu", device_memory_bytes=GiB, host_memory_bytes=GiB, disk_read_gbps=2.0,
                      decode_gbps=50.0, prefill_tflops=1.0)
CONTIGUOUS = Overrides(kv_budget_tokens={"host": 0, "disk": 0})      # what engine_overrides gives without paging


def measured(hw: HardwareProfile, nbytes: int) -> HardwareProfile:
    return replace(hw, device_overhead_bytes=nbytes)


# ----------------------------------------------------------------------------- the allocator's arithmetic
@pytest.mark.parametrize("nbytes, reserved", [
    (0, 0), (1, 512), (512, 512), (513, 1024), (MiB, MiB),               # small: 512-byte blocks
    (8 * MiB, 10 * MiB), (6 * MiB, 20 * MiB // 3), (MiB + 1, 20 * MiB // 19),   # shares of 20 MiB segments
    (10 * MiB, 10 * MiB), (10 * MiB + 1, 12 * MiB), (32 * MiB, 32 * MiB),        # own segments, 2 MiB multiples
])
def test_reserved_bytes_follows_the_caching_allocator(nbytes, reserved):
    assert oh.reserved_bytes(nbytes) == reserved


# ----------------------------------------------------------------------------- the planner subtracts it
@pytest.mark.parametrize("cap", [None, 6 * GiB], ids=["free-memory", "cap"])
def test_the_runtime_overhead_comes_out_of_the_device_budget(cap):
    small, large = (plan(LLAMA_8B, measured(RTX_3060_TI, n), WORK, Overrides(device_memory_bytes=cap))
                    for n in (0, 1 * GiB))
    assert small.memory["device"].budget == large.memory["device"].budget     # the budget is the cap
    assert large.device_overhead.runtime_bytes == 1 * GiB and not large.device_overhead.runtime_assumed
    assert large.memory["device"].overhead == large.device_overhead.total_bytes
    assert large.memory["device"].overhead - small.memory["device"].overhead >= 1 * GiB - 64 * MiB
    for p in (small, large):
        m = p.memory["device"]
        assert m.total == m.weights + m.staging + m.kv + m.workspace + m.overhead <= m.budget
        assert p.predicted.peak_device_bytes == m.total
    # the gigabyte went to the runtime: less of the model stays on the device
    assert large.memory["device"].weights + large.memory["device"].kv < \
        small.memory["device"].weights + small.memory["device"].kv


def test_an_unmeasured_profile_assumes_the_default_on_cuda_and_nothing_on_cpu():
    cuda = plan(LLAMA_8B, RTX_3060_TI, WORK)
    assert cuda.device_overhead.runtime_bytes == DEFAULT_DEVICE_OVERHEAD_BYTES
    assert cuda.device_overhead.runtime_assumed
    cpu = plan(SMALL, CPU, SMALL_WORK)
    assert cpu.device_overhead == oh.DeviceOverhead(runtime_assumed=True)      # nothing to count on CPU
    assert cpu.memory["device"].overhead == 0


def test_the_allocator_rounds_each_resident_tensor():
    """Llama 3.1 8B: a layer's k_proj and v_proj (8 MiB each) share a 20 MiB segment, 2 MiB of
    tail each; every other matrix is a whole number of 2 MiB; the norms are 512-byte multiples."""
    p = plan(LLAMA_8B, measured(RTX_3060_TI, 0), WORK, Overrides(device_memory_bytes=6 * GiB))
    resident_layers = sum(1 for name, tier in zip(p.unit_names, p.tiers) if name.startswith("layer.") and
                          tier == "device")
    assert resident_layers > 0
    rounding = p.device_overhead.rounding_bytes
    fixed = oh.POOL_SLACK_BYTES + oh.ACTIVATION_ROUNDING_BYTES
    assert rounding >= fixed + resident_layers * 4 * MiB
    assert oh.rounding_bytes(LLAMA_8B.units[1].tensor_bytes) == 4 * MiB
    # on CPU there is no caching allocator: nothing rounds
    assert plan(SMALL, CPU, SMALL_WORK).device_overhead.rounding_bytes == 0


@pytest.mark.parametrize("hw", [CPU, RTX_3060_TI], ids=["cpu", "cuda"])
def test_the_contiguous_kv_keeps_room_to_grow(hw):
    """Without a paged cache KV may not leave the device, and the contiguous store copies a
    layer's keys into a larger tensor while the old one lives: one layer's keys at the full
    context are kept free; a paged store (one pool allocated once) needs none."""
    model, work = (SMALL, SMALL_WORK) if hw.is_cpu else (LLAMA_8B, WORK)
    contiguous = plan(model, hw, work, CONTIGUOUS)
    keys = work.context_tokens * model.kv_bytes_per_token_layer // 2
    assert contiguous.kv_blocks["device"] > 0
    assert contiguous.device_overhead.kv_growth_bytes == oh.reserved_bytes(keys) >= keys
    assert plan(model, hw, work).device_overhead.kv_growth_bytes == 0


def test_a_cap_just_below_the_overhead_of_the_least_plan_fails_naming_it():
    least = minimum_device_bytes(SMALL, RTX_3060_TI, SMALL_WORK)
    p = plan(SMALL, RTX_3060_TI, SMALL_WORK, Overrides(device_memory_bytes=least))
    assert p.memory["device"].total <= least and p.device_overhead.total_bytes > DEFAULT_DEVICE_OVERHEAD_BYTES
    with pytest.raises(TierCapacityError, match=r"device memory is short by 1 bytes.*overhead \d+: runtime "
                                                rf"{DEFAULT_DEVICE_OVERHEAD_BYTES} \(assumed\)"):
        plan(SMALL, RTX_3060_TI, SMALL_WORK, Overrides(device_memory_bytes=least - 1))


def test_minimum_device_bytes_on_cuda_covers_the_overhead_of_a_tiny_model():
    tiny = costs(small_config(layers=2), name="tiny")
    least = minimum_device_bytes(tiny, RTX_3060_TI, SMALL_WORK)
    assert least > DEFAULT_DEVICE_OVERHEAD_BYTES + oh.POOL_SLACK_BYTES
    plan(tiny, RTX_3060_TI, SMALL_WORK, Overrides(device_memory_bytes=least))


# ----------------------------------------------------------------------------- what the plan shows
def test_the_report_and_the_plan_document_show_the_overhead():
    hw = measured(RTX_3060_TI, 96 * MiB)
    p = plan(LLAMA_8B, hw, WORK, Overrides(device_memory_bytes=6 * GiB))
    out = io.StringIO()
    render_plan(Console(file=out, width=200), p, hw, LLAMA_8B, "from a test", [])
    text = out.getvalue()
    assert "overhead" in text and "96.0 MiB" in text
    assert "device overhead" in text and "allocator rounding" in text and "KV growth" in text
    assert "runtime overhead" in text                          # the hardware table's line
    doc = plan_document(p, hw, LLAMA_8B, "from a test", [])
    assert json.loads(json.dumps(doc)) == doc
    device = doc["memory"]["device"]
    assert device["overhead"] == p.device_overhead.total_bytes and device["total"] <= device["budget"] == 6 * GiB
    assert doc["device_overhead"] == {"runtime_bytes": 96 * MiB, "rounding_bytes": p.device_overhead.rounding_bytes,
                                      "kv_growth_bytes": 0, "runtime_assumed": False}
    assert doc["hardware"]["device_overhead_bytes"] == 96 * MiB


def test_the_report_says_how_weights_reach_the_gpu():
    for mode, words in (("gds", "GPUDirect Storage through kvikio"), ("compat", "compatibility mode"),
                        ("absent", "not installed")):
        hw = replace(RTX_3060_TI, kvikio_mode=mode)
        out = io.StringIO()
        render_plan(Console(file=out, width=200), plan(SMALL, hw, SMALL_WORK), hw, SMALL, "test", [])
        assert words in out.getvalue()


# ----------------------------------------------------------------------------- the profile may say it
HARDWARE = {"device": "cuda", "device_memory_bytes": 8 * GiB, "host_memory_bytes": 32 * GiB,
            "disk_read_gbps": 3.0, "decode_gbps": 448.0, "prefill_tflops": 30.0, "h2d_gbps": 24.0, "d2h_gbps": 24.0}


@pytest.mark.parametrize("value", [0, 1, 96 * MiB])
def test_a_profile_overrides_the_runtime_overhead(value, tmp_path):
    profile = load_profile({"version": 1, "hardware": {**HARDWARE, "device_overhead_bytes": value,
                                                        "kvikio_mode": "compat"}})
    assert profile.hardware.device_overhead_bytes == value and profile.hardware.kvikio_mode == "compat"
    assert load_profile(save_profile(profile, tmp_path / "p.json")) == profile
    p = plan(LLAMA_8B, profile.hardware, WORK)
    assert p.device_overhead.runtime_bytes == value and not p.device_overhead.runtime_assumed


def test_without_the_key_nothing_is_written_as_measured():
    hw = load_profile({"version": 1, "hardware": HARDWARE}).hardware
    assert hw.device_overhead_bytes is None and hw.kvikio_mode == ""
    assert hw.runtime_overhead_bytes == DEFAULT_DEVICE_OVERHEAD_BYTES


@pytest.mark.parametrize("key, value, message", [
    ("device_overhead_bytes", -1, r"hardware\.device_overhead_bytes must be >= 0, got -1"),
    ("device_overhead_bytes", "64MiB", r"hardware\.device_overhead_bytes must be a int, got '64MiB'"),
    ("device_overhead_bytes", 1.5, r"hardware\.device_overhead_bytes must be a int"),
    ("device_overhead_bytes", True, r"hardware\.device_overhead_bytes must be a int"),
    ("kvikio_mode", "posix", r"hardware\.kvikio_mode must be one of \('', 'gds', 'compat', 'absent'\), got 'posix'"),
    ("kvikio_mode", 1, r"hardware\.kvikio_mode must be a string"),
])
def test_bad_overhead_values_are_profile_errors_naming_the_key(key, value, message):
    with pytest.raises(ProfileError, match=message):
        load_profile({"version": 1, "hardware": {**HARDWARE, key: value}})
