"""What the planner makes of gpt-oss: MXFP4 experts read and cached packed, their matmuls over the
unpacked weights, the dense part in bf16, and KV whose sliding layers hold a 128-token window.

gpt-oss-20b is planned from its published config.json alone and checked against figures worked
out here by hand from that config; a tiny MXFP4 checkpoint checks that the cost model from the
config agrees with the one from the checkpoint's index, and that an engine's expert cache holds
what the model says an expert holds."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from tierflow import Engine, EngineConfig
from tierflow.cli.main import main
from tierflow.engine.planning import config_spec, index_costs
from tierflow.testing import build_random_checkpoint, pack_mxfp4_experts
from tierflow.tiers.checkpoint.index import MAX_GAP_BYTES, CheckpointIndex
from tierflow.tiers.plan.costmodel import DEVICE, HOST, Workload, costs_from_spec
from tierflow.tiers.plan.planner import KV_BLOCK_TOKENS, plan
from tierflow.tiers.plan.reads import ALIGN
from tierflow.tiers.plan.timing import expert_times
from tierflow.tiers.probe.profile import load_profile

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "examples/configs/gpt-oss-20b"
PROFILE = ROOT / "examples/profiles/rtx3060ti-8gb-published.json"
GiB = 2**30

# gpt-oss-20b by hand, from its config.json: hidden 2880, 24 layers, 64 query heads and 8 KV heads
# of 64, 32 experts of intermediate 2880 (top-4), vocabulary 201088, untied head; bf16 dense tensors
H, I, LAYERS, EXPERTS, VOCAB = 2880, 2880, 24, 32, 201088
Q, KV = 64 * 64, 8 * 64
BF16 = 2
EXPERT_PACKED = {                       # bytes of one expert as stored: uint8 blocks / scales, bf16 biases
    "gate_up_proj_blocks": 2 * I * H // 2, "gate_up_proj_scales": 2 * I * H // 32,
    "down_proj_blocks": H * I // 2, "down_proj_scales": H * I // 32,
    "gate_up_proj_bias": 2 * I * BF16, "down_proj_bias": H * BF16}
EXPERT_WEIGHTS = 2 * I * H + H * I      # what its matmuls multiply, unpacked
LAYER_PARAMS = (H * Q + Q) + 2 * (H * KV + KV) + (Q * H + H) + 64 + 2 * H + (EXPERTS * H + EXPERTS)
EMBEDDING = VOCAB * H * BF16


@pytest.fixture(scope="module")
def costs():
    spec, adapter, _ = config_spec(CONFIG)
    return costs_from_spec(spec, adapter, "bfloat16", name="gpt-oss-20b")


def test_the_published_config_is_mxfp4_experts_and_bf16_dense_tensors(costs):
    spec, _, _ = config_spec(CONFIG)
    assert spec.expert_format == "mxfp4" and spec.checkpoint_dtype == "bfloat16"   # config.json names no dtype
    assert costs.windows == (128, None) * 12


def test_an_mxfp4_expert_is_read_and_cached_packed_and_multiplied_unpacked(costs):
    e = costs.experts
    packed = sum(EXPERT_PACKED.values())
    assert packed == 13_236_480                                  # 12.6 MiB, against 49.8 MB of bf16 weights
    assert packed <= e.stream_bytes <= packed + len(EXPERT_PACKED) * ALIGN
    assert e.resident_bytes == e.stream_bytes                    # bf16 biases need no cast: held as read
    assert e.matmul_params == EXPERT_WEIGHTS
    assert e.use_bytes == e.resident_bytes + 2 * EXPERT_WEIGHTS * BF16   # dequantized: written, then read
    assert (e.moe_layers, e.num_experts, e.per_token, e.expert_format) == (LAYERS, EXPERTS, 4, "mxfp4")
    # the same experts unpacked in bf16 would be 3.76 times the bytes
    assert EXPERT_WEIGHTS * BF16 / packed == pytest.approx(3.76, abs=0.01)


def test_the_checkpoint_is_13_8_gb_on_disk(costs):
    by_hand = 2 * EMBEDDING + LAYERS * LAYER_PARAMS * BF16 + H * BF16 + LAYERS * EXPERTS * sum(EXPERT_PACKED.values())
    assert by_hand / 1e9 == pytest.approx(13.76, abs=0.01)       # experts 10.17 GB, embedding and head 1.16 GB each
    tensors = 2 + LAYERS * (13 + 6 * EXPERTS) + 1                 # at most one 4 KiB page rounded up per tensor
    assert by_hand <= costs.checkpoint_bytes <= by_hand + tensors * ALIGN
    layer = costs.units[1]
    assert layer.resident_bytes == LAYER_PARAMS * BF16 and costs.units[0].resident_bytes == EMBEDDING


def test_sliding_layers_hold_their_window_at_100k_context(costs):
    hw = load_profile(PROFILE).hardware
    p = plan(costs, hw, Workload(context_tokens=100_000, new_tokens=256))
    full = math.ceil(100_000 / KV_BLOCK_TOKENS)                   # 391 blocks a full-attention layer
    ring = (p.prefill_chunk_tokens + 128 - 1) // KV_BLOCK_TOKENS + 1   # a window's ring at its peak (a chunk)
    assert sum(p.kv_blocks.values()) == 12 * full + 12 * ring
    block_bytes = KV_BLOCK_TOKENS * 2 * KV * BF16
    assert p.predicted.kv_bytes == (12 * full + 12 * ring) * block_bytes
    assert p.predicted.kv_bytes < 0.55 * LAYERS * full * block_bytes   # about half of 24 full layers' 4.6 GiB
    assert costs.kv_read_blocks(100_000, KV_BLOCK_TOKENS) == 12 * full + 12 * 2   # a decode reads 128 keys: 2 blocks
    assert costs.kv_read_tokens(100_000) == 12 * 100_000 + 12 * 128


def test_the_3060_ti_plan_at_10k_context(costs):
    hw = load_profile(PROFILE).hardware
    assert (hw.device_memory_bytes, hw.disk_read_gbps, hw.h2d_gbps, hw.decode_gbps, hw.prefill_tflops) == \
        (8 * GiB, 3.5, 25.0, 448.0, 16.0)
    p = plan(costs, hw, Workload(context_tokens=10_000, new_tokens=256))
    assert p.memory[DEVICE].total <= p.memory[DEVICE].budget <= 0.9 * 8 * GiB
    # every dense layer and the head on the device, the embedding looked up on the host, KV on the device
    assert p.tiers[1:] == (DEVICE,) * (LAYERS + 1) and p.tiers[0] == HOST and set(p.kv_blocks) >= {DEVICE}
    assert p.kv_blocks[DEVICE] == sum(p.kv_blocks.values()) == 12 * 40 + 12 * ((p.prefill_chunk_tokens + 127) // 256 + 1)
    # the device memory the dense part leaves goes to the expert cache, in packed experts
    e = costs.experts
    cached = p.expert_cache_bytes // e.resident_bytes
    assert 250 <= cached < LAYERS * EXPERTS
    # a decode token misses (1 - cached share) of its 4 experts a layer, each a packed read
    misses = LAYERS * 4 * (1 - p.expert_cache_bytes / e.all_resident_bytes)
    assert expert_times(costs, hw, 1, p.expert_cache_bytes)[0] == pytest.approx(misses * e.stream_bytes)
    assert p.predicted.decode.disk_s == pytest.approx(misses * e.stream_bytes / 3.5e9)
    assert p.predicted.bottleneck == "disk"


def test_tierflow_plan_prints_the_packed_experts(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["plan", str(CONFIG), "--profile", str(PROFILE), "--context", "10000", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "12.8 GiB on disk" in out and "reads 12.6 MiB, MXFP4 packed (47.5 MiB unpacked)" in out
    assert "none: the embedding is looked up on the host" in out and "staging slots of 0 B" not in out
    assert main(["plan", str(CONFIG), "--profile", str(PROFILE), "--context", "10000", "--dtype", "bfloat16",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_bytes"] / 1e9 == pytest.approx(13.76, abs=0.01) and doc["kv_bytes_per_token"] == 24 * 2 * KV * 2


# -- a tiny MXFP4 checkpoint: the config's costs, the index's costs, the engine's cache --------------------

HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpt_oss_plan")
    path = build_random_checkpoint(root / "float", "gpt_oss", hidden_size=64, intermediate_size=64, num_layers=3,
                                   head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8)
    return pack_mxfp4_experts(path, root / "mxfp4")


def _cached(path: Path, dtype: str):
    async def run():
        async with await Engine.open(path, EngineConfig(device="cpu", dtype=dtype, profile=HARDWARE,
                                                        kv_reserve_tokens=64)) as engine:
            return engine.pipeline_statistics().experts
    return asyncio.run(run())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_config_and_index_agree_and_the_engine_holds_what_the_model_says(tiny, dtype):
    index = CheckpointIndex.open(tiny)
    spec, adapter, _ = config_spec(tiny)
    from_config = costs_from_spec(spec, adapter, dtype).experts
    from_index = index_costs(index, getattr(torch, dtype)).experts
    h, i = 64, 64
    payload = (2 * i * h + h * i) * 17 // 32 + (2 * i + h) * 4      # 4.25 bits a weight, fp32 biases
    layouts = list(index.experts.values())
    assert {e.payload_bytes for e in layouts} == {payload}
    tensors = len(layouts[0].tensors)
    # the config's read: each tensor in whole pages; the index's: its ranges aligned, small gaps read through
    assert payload <= from_config.stream_bytes <= payload + tensors * ALIGN
    assert from_index.stream_bytes == max(e.buffer_bytes for e in layouts)
    assert from_index.stream_bytes <= payload + tensors * 2 * ALIGN + (tensors - 1) * MAX_GAP_BYTES
    assert from_config.matmul_params == from_index.matmul_params == 3 * h * i
    experts = _cached(tiny, dtype)
    assert experts.cached == len(layouts) == 24
    if dtype == "bfloat16":     # biases cast: an expert holds its packed bytes and its biases in bf16, exactly
        held = payload - (2 * i + h) * 2
        assert from_config.resident_bytes == from_index.resident_bytes == held
        assert experts.cached_bytes == experts.cached * held
    else:                       # held as read: the buffer, as the index's read of the largest says
        assert from_config.resident_bytes == from_config.stream_bytes
        assert experts.cached_bytes == sum(e.buffer_bytes for e in layouts)
        assert from_index.resident_bytes == max(e.buffer_bytes for e in layouts)
