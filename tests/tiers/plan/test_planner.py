from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tierflow.adapters import adapter_for
from tierflow.errors import ProfileError, TierCapacityError
from tierflow.tiers.plan.costmodel import Workload, costs_from_spec
from tierflow.tiers.plan.planner import DEFAULT_MARGIN, KV_BLOCK_TOKENS, minimum_device_bytes, plan
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides

GiB, MiB = 2**30, 2**20
TIERS = {"device", "host", "disk"}

# An RTX 3060 Ti (8 GB GDDR6, 448 GB/s) on PCIe 4.0 x16, with 32 GB of RAM and a 3 GB/s NVMe drive.
RTX_3060_TI = HardwareProfile(
    device="cuda", device_memory_bytes=8 * GiB, host_memory_bytes=32 * GiB, disk_read_gbps=3.0,
    decode_gbps=448.0, prefill_tflops=30.0, h2d_gbps=24.0, d2h_gbps=24.0, device_name="RTX 3060 Ti",
    compute_dtype="bfloat16")

CPU = HardwareProfile(device="cpu", device_memory_bytes=GiB, host_memory_bytes=GiB, disk_read_gbps=2.0,
                      decode_gbps=50.0, prefill_tflops=1.0)


def llama_config(*, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied, dtype="bfloat16", **extra):
    """A config.json dict of the Llama family."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": dtype,
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": intermediate,
            "vocab_size": vocab, "tie_word_embeddings": tied, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, **extra}


def costs(config, dtype="bfloat16", name="model"):
    """ModelCosts from a config.json dict alone, computing in ``dtype``."""
    adapter = adapter_for(config)
    return costs_from_spec(adapter.spec_from_config(config), adapter, dtype, name=name)


LLAMA_31_8B = llama_config(
    hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, tied=False,
    max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192})

# name -> (config, total parameters). The two MoE models are dense approximations until MoE
# support lands: intermediate_size = experts x expert intermediate (+ the shared expert), so the
# bytes per layer match the total parameters. Every layer gets full attention.
MODELS = {
    "llama-3.1-8b": (LLAMA_31_8B, 8.03e9),
    "llama-3.2-1b": (llama_config(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                                  vocab=128256, tied=True), 1.24e9),
    "llama-3.2-3b": (llama_config(hidden=3072, layers=28, heads=24, kv_heads=8, head_dim=128, intermediate=8192,
                                  vocab=128256, tied=True), 3.21e9),
    "qwen3-next-80b-a3b": (llama_config(hidden=2048, layers=48, heads=16, kv_heads=2, head_dim=256,
                                        intermediate=512 * 512 + 512, vocab=151936, tied=False), 80e9),
    "gpt-oss-20b": (llama_config(hidden=2880, layers=24, heads=64, kv_heads=8, head_dim=64,
                                 intermediate=32 * 2880, vocab=201088, tied=False), 20.9e9),
}


def small_config(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256, tied=False,
                 dtype="bfloat16"):
    return llama_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
                        intermediate=intermediate, vocab=vocab, tied=tied, dtype=dtype)


SMALL = costs(small_config(layers=6), name="small")
SMALL_WORK = Workload(context_tokens=1024, new_tokens=64)


# ----------------------------------------------------------------------------- real models, one 8 GB card
@pytest.mark.parametrize("name", list(MODELS))
def test_plans_fit_an_8gb_card_at_100k_context(name):
    config, params = MODELS[name]
    model = costs(config, name=name)
    assert model.checkpoint_bytes == pytest.approx(2 * params, rel=0.03)
    p = plan(model, RTX_3060_TI, Workload(context_tokens=100_000))
    pred, memory = p.predicted, p.memory
    assert pred.peak_device_bytes <= 8 * GiB and pred.peak_device_bytes <= memory["device"].budget
    assert pred.peak_host_bytes <= memory["host"].budget <= 32 * GiB
    assert pred.disk_bytes >= model.checkpoint_bytes > 0
    assert len(p.tiers) == len(model.units) and set(p.tiers) <= TIERS
    assert 0 < pred.decode_s_per_token < math.inf
    assert pred.prefill_s > 0


def test_gqa_kv_bytes_count_the_kv_heads():
    model = costs(LLAMA_31_8B)
    # 100,000 tokens x 32 layers x (K and V) x 8 KV heads x 128 x 2 bytes; 32 heads would give 52.4 GB.
    assert model.kv_bytes_per_token * 100_000 == 100_000 * 32 * 2 * 8 * 128 * 2 == 13_107_200_000
    p = plan(model, RTX_3060_TI, Workload(context_tokens=100_000))
    # Whole blocks of 256 tokens: 391 blocks (100,096 tokens) per layer.
    assert KV_BLOCK_TOKENS == 256 and p.predicted.kv_bytes == 391 * 256 * model.kv_bytes_per_token == 13_119_782_912
    assert sum(p.kv_blocks.values()) == 391 * 32


# ----------------------------------------------------------------------------- CPU: the device tier is RAM
@pytest.mark.parametrize("cap", [None, 4 * MiB, 2 * MiB, "least"])
def test_cpu_has_no_host_tier(cap):
    if cap == "least":
        cap = minimum_device_bytes(SMALL, CPU, SMALL_WORK)
    p = plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=cap))
    assert "host" not in p.tiers
    assert p.kv_blocks["host"] == 0 and p.memory["host"].total == 0 and p.predicted.peak_host_bytes == 0


def test_cpu_roomy_budget_keeps_everything_resident():
    p = plan(SMALL, CPU, SMALL_WORK)
    assert set(p.tiers) == {"device"} and p.streamed == ()
    assert p.num_slots == 0 and p.device_slot_bytes == 0 and p.memory["device"].staging == 0
    assert p.kv_blocks["disk"] == 0 and p.predicted.decode.disk_s == 0


def test_cpu_tight_cap_streams_some_units():
    least = minimum_device_bytes(SMALL, CPU, SMALL_WORK)
    roomy = plan(SMALL, CPU, SMALL_WORK).memory["device"].total
    cap = least + 4 * SMALL.units[1].resident_bytes     # room for a few layers, not for all
    assert cap < roomy
    p = plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=cap))
    assert "disk" in p.tiers and "device" in p.tiers
    assert p.num_slots == p.prefetch_depth + 1 and p.predicted.decode.disk_s > 0
    assert p.memory["device"].total <= cap


def test_minimum_device_bytes_is_the_threshold():
    least = minimum_device_bytes(SMALL, CPU, SMALL_WORK)
    p = plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=least))
    assert p.memory["device"].total <= least
    with pytest.raises(TierCapacityError, match=r"device memory is short by \d+ bytes"):
        plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=least - 4096))
    # The smallest budget: one byte less is one byte short.
    with pytest.raises(TierCapacityError, match=r"device memory is short by 1 bytes"):
        plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=least - 1))


def test_capacity_error_names_the_shortfall_exactly():
    cap = minimum_device_bytes(SMALL, CPU, SMALL_WORK) - 10_000
    with pytest.raises(TierCapacityError) as info:
        plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=cap))
    m = re.search(r"device memory is short by (\d+) bytes.* its budget is (\d+)", str(info.value))
    assert m is not None and int(m.group(2)) == cap
    needed = cap + int(m.group(1))
    assert plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=needed)).memory["device"].total <= needed
    with pytest.raises(TierCapacityError):
        plan(SMALL, CPU, SMALL_WORK, Overrides(device_memory_bytes=needed - 1))


# ----------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("hw", [CPU, RTX_3060_TI], ids=["cpu", "cuda"])
def test_pinned_units_stay_on_disk_with_unlimited_memory(hw):
    unlimited = replace(hw, device_memory_bytes=2**50, host_memory_bytes=2**50)
    p = plan(SMALL, unlimited, SMALL_WORK, Overrides(tiers={"layers.0-3": "disk"}))
    assert p.tiers[1:5] == ("disk",) * 4
    assert set(p.tiers[:1] + p.tiers[5:]) == {"device"}


def test_pinning_host_on_cpu_is_a_profile_error():
    with pytest.raises(ProfileError, match=r"overrides\.tiers\.layers\.0"):
        plan(SMALL, CPU, SMALL_WORK, Overrides(tiers={"layers.0": "host"}))


def test_pinning_more_to_device_than_fits():
    least = minimum_device_bytes(SMALL, CPU, SMALL_WORK)    # runs, but only with layers streamed
    with pytest.raises(TierCapacityError, match=r"pinned.*device memory is short by"):
        plan(SMALL, CPU, SMALL_WORK, Overrides(tiers={"all": "device"}, device_memory_bytes=least))


@pytest.mark.parametrize("pin", [{"embed": "device"}, {"head": "device"}])
def test_pinning_one_of_tied_units_keeps_the_pair_together(pin):
    tied = costs(small_config(tied=True))
    p = plan(tied, CPU, SMALL_WORK, Overrides(tiers=pin))
    assert p.tiers[0] == p.tiers[-1] == "device"
    assert p.predicted.decode_s_per_token <= plan(tied, CPU, SMALL_WORK).predicted.decode_s_per_token


def test_prefetch_depth_and_prefill_chunk_overrides_appear_in_the_plan():
    overrides = Overrides(prefetch_depth=3, prefill_chunk_tokens=96)
    least = minimum_device_bytes(SMALL, CPU, SMALL_WORK, overrides)
    p = plan(SMALL, CPU, SMALL_WORK, replace(overrides, device_memory_bytes=least))
    assert p.prefetch_depth == 3 and p.prefill_chunk_tokens == 96
    assert p.streamed and p.num_slots == 4
    doc = p.to_json()
    assert doc["prefetch_depth"] == 3 and doc["prefill_chunk_tokens"] == 96 and doc["staging_slots"] == 4


@pytest.mark.parametrize("hw", [CPU, RTX_3060_TI], ids=["cpu", "cuda"])
def test_no_kv_block_on_the_device_when_its_kv_budget_is_zero(hw):
    p = plan(SMALL, hw, SMALL_WORK, Overrides(kv_budget_tokens={"device": 0}))
    assert p.kv_blocks["device"] == 0 and p.memory["device"].kv == 0
    assert sum(p.kv_blocks.values()) == 4 * SMALL.num_layers
    assert p.kv_blocks["host" if hw.device == "cuda" else "disk"] == 4 * SMALL.num_layers


# ----------------------------------------------------------------------------- properties
def footprint(model, work):
    """(about what the model needs with everything streamed, what keeping it all resident adds)"""
    workspace = (model.attention_bytes(min(64, work.prompt_tokens), work.context_tokens)
                 + model.activation_bytes(64, 64) + work.concurrency * model.vocab_size * 4)
    largest = max(max(u.stream_bytes, u.resident_bytes) for u in model.units)
    weights = sum(u.resident_bytes for u in model.units)
    return workspace + 3 * largest, weights + work.kv_tokens * model.kv_bytes_per_token


@st.composite
def small_models(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    config = small_config(layers=draw(st.integers(1, 6)), hidden=heads * draw(st.sampled_from([8, 16])),
                          heads=heads, kv_heads=draw(st.sampled_from([1, heads // 2, heads])),
                          intermediate=draw(st.sampled_from([64, 128, 384])), vocab=draw(st.integers(64, 2048)),
                          tied=draw(st.booleans()), dtype=draw(st.sampled_from(["bfloat16", "float32"])))
    return costs(config, dtype=draw(st.sampled_from(["bfloat16", "float16", "float32"])))


gbps = st.floats(0.5, 500.0)
margins = st.none() | st.floats(0.0, 0.5)
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def overhead_floor(model, hw, work):
    """About the device overhead of any plan of ``model`` on ``hw`` (the runtime's, the allocator's
    rounding): a roomy plan's, which keeps every tensor resident, and a little more for slots."""
    roomy = replace(hw, device_memory_bytes=2**50, host_memory_bytes=2**50)
    return plan(model, roomy, work).device_overhead.total_bytes + (4 * MiB if hw.device == "cuda" else 0)


@st.composite
def scenarios(draw):
    """(model, machine, workload, memory, device memory): a small model, a CPU or CUDA machine,
    and the strategies its memory figures (and caps) are drawn from: between nearly all streamed
    and all resident, device memory (and device caps) above the device overhead, which on CUDA
    is far larger than these models."""
    model = draw(small_models())
    work = draw(st.builds(Workload, context_tokens=st.integers(16, 4096), concurrency=st.integers(1, 3),
                          new_tokens=st.integers(1, 256)))
    least, spread = footprint(model, work)
    memory = st.integers(least * 9 // 10, least + spread * 3 // 2)
    device = draw(st.sampled_from(["cpu", "cuda"]))
    link = {} if device == "cpu" else {"h2d_gbps": draw(gbps), "d2h_gbps": draw(gbps)}
    hw = HardwareProfile(device=device, device_memory_bytes=1, host_memory_bytes=draw(memory),
                         disk_read_gbps=draw(gbps), decode_gbps=draw(gbps),
                         prefill_tflops=draw(st.floats(0.1, 100.0)), **link)
    floor = overhead_floor(model, hw, work)
    device_memory = memory.map(lambda n: n + floor)       # caps: no margin is taken off them
    free = draw(memory) + 2 * floor                       # a margin of up to half still leaves the floor
    return model, replace(hw, device_memory_bytes=free), work, memory, device_memory


def cap(memory, draw):
    return draw(st.none() | memory)


def plan_or_none(*args):
    try:
        return plan(*args)
    except TierCapacityError:
        return None


@PROPERTY
@given(scenario=scenarios(), margin=margins, data=st.data(),
       which=st.sampled_from(["device_memory_bytes", "host_memory_bytes", "device cap", "host cap"]))
def test_more_memory_never_predicts_slower(scenario, margin, data, which):
    """Slower by the planner's objective: seconds per generated token, prefill amortised."""
    model, hw, work, memory, device_memory = scenario
    extra = data.draw(memory, label="extra")
    if which.endswith("cap"):      # the same machine, a larger cap
        key = which.replace(" cap", "_memory_bytes")
        limit, small_hw, big_hw = data.draw(device_memory if key.startswith("device") else memory, label="cap"), hw, hw
        small_overrides = Overrides(safety_margin=margin, **{key: limit})
        big_overrides = Overrides(safety_margin=margin, **{key: limit + extra})
    else:                          # a machine with more memory
        small_hw, big_hw = hw, replace(hw, **{which: getattr(hw, which) + extra})
        small_overrides = big_overrides = Overrides(safety_margin=margin)
    small = plan_or_none(model, small_hw, work, small_overrides)
    assume(small is not None)
    big = plan(model, big_hw, work, big_overrides)
    assert big.predicted.s_per_token <= small.predicted.s_per_token


@PROPERTY
@given(scenario=scenarios(), data=st.data(), faster=st.floats(1.0, 100.0))
def test_faster_disk_never_predicts_slower(scenario, data, faster):
    model, hw, work, memory, device_memory = scenario
    overrides = Overrides(device_memory_bytes=cap(device_memory, data.draw))
    slow = plan_or_none(model, hw, work, overrides)
    assume(slow is not None)
    fast = plan(model, replace(hw, disk_read_gbps=hw.disk_read_gbps * faster), work, overrides)
    assert fast.predicted.s_per_token <= slow.predicted.s_per_token


@PROPERTY
@given(scenario=scenarios(), data=st.data(), margin=margins)
def test_no_plan_exceeds_a_budget(scenario, data, margin):
    model, hw, work, memory, device_memory = scenario
    device_cap, host_cap = cap(device_memory, data.draw), cap(memory, data.draw)
    overrides = Overrides(device_memory_bytes=device_cap, host_memory_bytes=host_cap, safety_margin=margin)
    p = plan_or_none(model, hw, work, overrides)
    if p is None:
        return
    kept = 1 - (DEFAULT_MARGIN if margin is None else margin)
    device_budget = int(hw.device_memory_bytes * kept)
    assert p.memory["device"].budget == (device_budget if device_cap is None else min(device_budget, device_cap))
    if hw.is_cpu:
        assert p.memory["host"].budget == 0 and "host" not in p.tiers and p.kv_blocks["host"] == 0
    else:
        host_budget = int(hw.host_memory_bytes * kept)
        assert p.memory["host"].budget == (host_budget if host_cap is None else min(host_budget, host_cap))
    for tier, use in p.memory.items():
        assert use.total <= use.budget, tier
    assert p.predicted.peak_device_bytes == p.memory["device"].total
    assert p.predicted.peak_host_bytes == p.memory["host"].total


# ----------------------------------------------------------------------------- the plan document
@pytest.mark.parametrize("hw, limit", [(CPU, 2 * MiB), (RTX_3060_TI, None)], ids=["cpu", "cuda"])
def test_plan_json_document(hw, limit):
    doc = plan(SMALL, hw, SMALL_WORK, Overrides(device_memory_bytes=limit)).to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert len(doc["placement"]) == len(doc["units"]) == len(SMALL.units) and set(doc["placement"]) <= TIERS
    assert {"decode_s_per_token", "prefill_s", "peak_device_bytes", "peak_host_bytes", "disk_bytes", "kv_bytes",
            "bottleneck"} <= set(doc["predicted"])
    assert doc["predicted"]["bottleneck"] in {"disk", "pcie", "compute"}
