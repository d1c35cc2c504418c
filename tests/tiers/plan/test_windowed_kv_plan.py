"""The planner counts sliding-window KV as the paged store holds it: a windowed layer's ring (at
its peak, during a prefill chunk) instead of the whole context, and a decode sweep reads a
window's blocks of it, not all of them."""

from __future__ import annotations

import math

import pytest

from tierflow.adapters import adapter_for
from tierflow.tiers.plan.costmodel import Workload, costs_from_spec
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides
from tierflow.tiers.plan.planner import KV_BLOCK_TOKENS, plan

GiB = 2**30
RTX_3060_TI = HardwareProfile(
    device="cuda", device_memory_bytes=8 * GiB, host_memory_bytes=32 * GiB, disk_read_gbps=3.0,
    decode_gbps=448.0, prefill_tflops=30.0, h2d_gbps=24.0, d2h_gbps=24.0, compute_dtype="bfloat16")
CPU = HardwareProfile(device="cpu", device_memory_bytes=4 * GiB, host_memory_bytes=4 * GiB, disk_read_gbps=2.0,
                      decode_gbps=50.0, prefill_tflops=1.0)


def mistral_7b(sliding_window: int | None) -> dict:
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "torch_dtype": "bfloat16",
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 14336, "vocab_size": 32000, "tie_word_embeddings": False,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
            "sliding_window": sliding_window}


def gemma2_small(sliding_window: int) -> dict:
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "torch_dtype": "bfloat16",
            "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 128, "intermediate_size": 4096, "vocab_size": 32000, "query_pre_attn_scalar": 128,
            "sliding_window": sliding_window, "max_position_embeddings": 65536,
            "layer_types": ["sliding_attention", "full_attention"] * 4}


def costs(config: dict):
    adapter = adapter_for(config)
    return costs_from_spec(adapter.spec_from_config(config), adapter, "bfloat16")


def _ring(window: int, chunk: int, context: int) -> int:
    """A window's blocks at their peak: the chunk's queries and the window before the first."""
    return min(math.ceil(context / KV_BLOCK_TOKENS), (chunk + window - 1) // KV_BLOCK_TOKENS + 1)


def test_a_sliding_window_model_plans_its_rings_not_the_whole_context():
    work = Workload(context_tokens=32768, concurrency=2, new_tokens=256)
    windowed, full = costs(mistral_7b(4096)), costs(mistral_7b(None))
    assert windowed.windows == (4096,) * 32 and full.windows == ()
    p_windowed, p_full = plan(windowed, RTX_3060_TI, work), plan(full, RTX_3060_TI, work)

    block_bytes = KV_BLOCK_TOKENS * full.kv_bytes_per_token_layer
    full_blocks = 2 * 128 * 32                       # 32k tokens: 128 blocks a layer, 2 sequences
    ring_blocks = 2 * 32 * _ring(4096, p_windowed.prefill_chunk_tokens, 32768)
    assert sum(p_full.kv_blocks.values()) == full_blocks and p_full.predicted.kv_bytes == full_blocks * block_bytes
    assert sum(p_windowed.kv_blocks.values()) == ring_blocks
    assert p_windowed.predicted.kv_bytes == ring_blocks * block_bytes
    assert p_full.predicted.kv_bytes - p_windowed.predicted.kv_bytes == (full_blocks - ring_blocks) * block_bytes
    assert ring_blocks <= full_blocks * (4096 + 4096 + 256) // 32768      # a chunk of at most 4096 tokens


def test_a_model_mixing_window_and_full_layers_plans_each_kind():
    work = Workload(context_tokens=65536, concurrency=1, new_tokens=128)
    model = costs(gemma2_small(512))
    assert model.windows == (512, None) * 4
    p = plan(model, RTX_3060_TI, work)
    expected = 4 * 256 + 4 * _ring(512, p.prefill_chunk_tokens, 65536)
    assert sum(p.kv_blocks.values()) == expected
    assert p.predicted.kv_bytes == expected * KV_BLOCK_TOKENS * model.kv_bytes_per_token_layer


def test_decode_reads_a_windows_blocks_and_attends_over_a_windows_keys():
    windowed, full = costs(mistral_7b(4096)), costs(mistral_7b(None))
    per_token_layer = full.kv_bytes_per_token_layer
    assert windowed.kv_read_bytes(32768) == 32 * 4096 * per_token_layer
    assert full.kv_read_bytes(32768) == 32 * 32768 * per_token_layer
    assert windowed.kv_read_bytes(1000) == full.kv_read_bytes(1000)      # inside the window: the same
    assert windowed.kv_read_blocks(32768, 256) == 32 * (4095 // 256 + 1 + 1)
    assert full.kv_read_blocks(32768, 256) == 32 * 128
    assert windowed.kv_read_blocks(32768, 256, full_share=0.5) == 32 * 17        # a window is read whole
    assert full.kv_read_blocks(32768, 256, full_share=0.5) == 32 * 64


@pytest.mark.parametrize("window", [None, 4096])
def test_kv_on_disk_costs_a_decode_sweep_what_attention_reads(window):
    """With the weights resident and every KV block on disk, a decode sweep's disk time is the
    KV it reads: all blocks of full attention, a window's blocks of a sliding window."""
    model = costs(mistral_7b(window))
    hw = HardwareProfile(device="cpu", device_memory_bytes=64 * GiB, host_memory_bytes=64 * GiB,
                         disk_read_gbps=2.0, decode_gbps=50.0, prefill_tflops=1.0, kv_disk_read_gbps=1.0)
    p = plan(model, hw, Workload(context_tokens=32768, new_tokens=64), Overrides(kv_budget_tokens={"device": 0}))
    assert set(p.tiers) == {"device"} and p.kv_blocks["device"] == 0
    read_blocks = 32 * (128 if window is None else 17)
    assert p.predicted.decode.disk_s == pytest.approx(read_blocks * KV_BLOCK_TOKENS * model.kv_bytes_per_token_layer
                                                      / 1e9)
