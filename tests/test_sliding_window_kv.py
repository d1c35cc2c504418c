"""Sliding-window rings in the paged KV cache, end to end: a Mistral-shape model at 4k tokens
of context with every KV block on disk, and a Gemma 3 model mixing window and full layers,
give transformers' greedy tokens while each windowed layer holds only the blocks its window
still sees (counted in the store's block tables); the prefix cache stays exact over rings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.testing import SimulatedCuda, build_random_checkpoint, oracle_greedy

SLIDING, FULL = "sliding_attention", "full_attention"
WINDOW = 64
HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}
# ~4k tokens whose decode crosses the block boundary at 4096, so a ring both holds a block and lets one go
PROMPT = [(i * 37) % 500 + 1 for i in range(4090)]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("mistral-window"), "mistral", num_layers=3,
                                   sliding_window=WINDOW, max_position_embeddings=8192, seed=3)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(
        tmp_path_factory.mktemp("gemma3-mixed"), "gemma3_text", num_layers=3, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=WINDOW, tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=8192,
        layer_types=[SLIDING, FULL, SLIDING], seed=4, rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "default", "rope_theta": 1_000_000.0}})


def _disk_config(tmp_path: Path, **extra) -> EngineConfig:
    return EngineConfig(**(dict(device="cpu", dtype="float32", profile=HARDWARE, kv_cache_dir=tmp_path,
                                kv_device_bytes=0, kv_host_bytes=0, kv_reserve_tokens=5000,
                                prefill_chunk_tokens=1024) | extra))


async def _generate_watching_rings(path: Path, config: EngineConfig, prompt: list[int], new_tokens: int):
    """Greedy tokens, and after every streamed token the blocks each layer of the sequence holds."""
    async with await Engine.open(path, config) as engine:
        store = engine._runtime.kv_store
        tokens, held = [], []
        async for chunk in engine.stream(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
            tokens += chunk.token_ids
            held += [store.tables.held(seq) for seq in store.tables.sequences()]
        loads = engine._runtime.runner.kv.loader.statistics()
        return tokens, held, store.layout.windows, engine.costs, engine.pipeline_statistics(), loads


def test_mistral_window_at_4k_with_kv_on_disk_matches_transformers_and_keeps_rings(mistral, tmp_path):
    tokens, held, windows, costs, stats, loads = asyncio.run(_generate_watching_rings(
        mistral, _disk_config(tmp_path), PROMPT, NEW_TOKENS))

    assert windows == (WINDOW,) * 3 and costs.windows == (WINDOW,) * 3
    assert tokens == oracle_greedy(mistral, PROMPT, NEW_TOKENS)
    assert len(set(tokens)) > 1
    # after the last prefill chunk (positions 3072..4089) the ring holds blocks 11..14, what that
    # chunk's queries saw; in decode, at most the blocks a window spans — never the 16 of 4k tokens
    prefill, decode = held[0], held[1:]
    assert prefill == (15 - (3072 - WINDOW + 1) // 256,) * 3 == (4, 4, 4)
    assert max(max(layers) for layers in decode) <= -(-WINDOW // 256) + 1 == 2
    assert {layers[0] for layers in decode} == {0, 1}    # the tail alone, then the block 4096 closed
    pools = stats.kv_blocks.by_tier()
    assert {tier for tier, pool in pools.items() if pool.capacity} == {"disk"}
    assert all(pool.used == 0 for pool in pools.values())            # freed when the request ended
    assert loads.read > 0 and loads.unplanned == 0                   # every block taken was prefetched
    assert list(tmp_path.iterdir()) == []


def test_gemma3_mixing_window_and_full_layers_matches_transformers(gemma3, tmp_path):
    prompt = PROMPT[:1500]
    tokens, held, windows, _, _, _ = asyncio.run(_generate_watching_rings(
        gemma3, _disk_config(tmp_path, prefill_chunk_tokens=256), prompt, NEW_TOKENS))

    assert windows == (WINDOW, None, WINDOW)
    assert tokens == oracle_greedy(gemma3, prompt, NEW_TOKENS)
    full_blocks = len(prompt) // 256
    assert held and all(layers[1] >= full_blocks for layers in held)      # the full layer keeps every block
    assert max(max(layers[0], layers[2]) for layers in held) <= 2      # the windowed ones a ring


def test_rings_over_device_host_and_disk_on_the_device_path(mistral, tmp_path):
    """Through ``SimulatedCuda`` (copies land late): ring slots freed in every tier are taken by
    the next blocks while loads and spills of the same sweep are on the copy stream."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"version": 1, "overrides": {"tiers": {"all": "device"}}, "hardware": {
        "device": "cuda", "device_memory_bytes": 2**30, "host_memory_bytes": 2**30, "disk_read_gbps": 2.0,
        "decode_gbps": 100.0, "prefill_tflops": 10.0, "h2d_gbps": 20.0, "d2h_gbps": 20.0}}))
    block_bytes = 2 * 2 * 256 * 16 * 4          # K and V, 2 KV heads, 256 tokens, head_dim 16, fp32
    config = _disk_config(tmp_path / "kv", device="cuda", profile=str(profile), prefill_chunk_tokens=256,
                          kv_device_bytes=2 * block_bytes, kv_host_bytes=2 * block_bytes)
    prompt = PROMPT[:1500]

    async def main():
        async with await Engine.open(mistral, config, device_ops=SimulatedCuda(copy_delay_s=0.001,
                                                                               compute_lag_s=0.002)) as engine:
            out = await engine.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            return list(out.token_ids), engine.pipeline_statistics().kv_blocks

    tokens, pools = asyncio.run(main())
    assert pools.device.capacity == pools.host.capacity == 2 and pools.disk.capacity > 0
    assert tokens == oracle_greedy(mistral, prompt, NEW_TOKENS)


def test_prefix_cache_over_rings_is_exact(mistral, tmp_path):
    """A 600-token document prefilled in one sweep: its two blocks are remembered while every
    layer still holds them; a second question over it attaches them (the rings trimmed to what
    a prefill from there keeps) and answers as transformers does."""
    doc = PROMPT[:520]
    first, second = doc + PROMPT[2000:2080], doc + PROMPT[3000:3050]
    config = _disk_config(tmp_path, prefix_cache_bytes=2**26)

    async def main():
        async with await Engine.open(mistral, config) as engine:
            params = SamplingParams(max_new_tokens=8, ignore_eos=True)
            return [await engine.generate(p, params) for p in (first, second)]

    a, b = asyncio.run(main())
    assert a.cached_tokens == 0 and b.cached_tokens == 512
    assert list(a.token_ids) == oracle_greedy(mistral, first, 8)
    assert list(b.token_ids) == oracle_greedy(mistral, second, 8)
