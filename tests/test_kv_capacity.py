"""A paged KV cache holds what its tiers hold: with every block on disk and no capacity setting
(``kv_cache_dir``, ``kv_device_bytes=0``, ``kv_host_bytes=0``, nothing else) a 3,000-token
prompt and its follow-up turn, and a 32k-token prompt on a small model, give transformers'
tokens, and no file is left after close."""

from __future__ import annotations

import asyncio

import pytest

from tierflow import Engine, EngineConfig, SamplingParams, TierCapacityError
from tierflow.testing import build_random_llama, oracle_greedy

DISK_ONLY = dict(device="cpu", dtype="float32", kv_device_bytes=0, kv_host_bytes=0)


def test_a_3000_token_prompt_and_its_follow_up_with_every_block_on_disk(tiny_model, tmp_path):
    prompt = [(i * 37) % 500 + 1 for i in range(3000)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    async def main():
        async with await Engine.open(tiny_model, EngineConfig(kv_cache_dir=tmp_path, **DISK_ONLY)) as engine:
            first = await engine.generate(prompt, params)
            follow_up = prompt + list(first.token_ids) + [(i * 11) % 500 + 1 for i in range(60)]
            second = await engine.generate(follow_up, params)
            pools = engine.pipeline_statistics().kv_blocks.by_tier()
            return first, follow_up, second, pools, list(tmp_path.iterdir())

    first, follow_up, second, pools, files_open = asyncio.run(main())
    assert pools["device"].capacity == pools["host"].capacity == 0 and pools["disk"].capacity > 0
    assert list(first.token_ids) == oracle_greedy(tiny_model, prompt, 12)
    assert list(second.token_ids) == oracle_greedy(tiny_model, follow_up, 12)
    assert len(files_open) == 1 and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return build_random_llama(tmp_path_factory.mktemp("long") / "m", hidden_size=32, num_layers=2, num_heads=2,
                              num_kv_heads=1, intermediate_size=64, max_position_embeddings=40960, seed=5)


def test_a_32k_token_prompt_with_every_block_on_disk(long_model, tmp_path):
    prompt = [(i * 37) % 500 + 1 for i in range(32000)]

    async def main():
        async with await Engine.open(long_model, EngineConfig(kv_cache_dir=tmp_path, **DISK_ONLY)) as engine:
            out = await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
            return out, engine.pipeline_statistics().kv_blocks.disk
    out, disk = asyncio.run(main())
    assert disk.capacity >= 2 * 32000 // 256
    assert list(out.token_ids) == oracle_greedy(long_model, prompt, 4)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_budget_bounds_the_capacity_and_the_error_names_it(tiny_model, tmp_path):
    block = 2 * 2 * 256 * 16 * 4        # one layer's keys and values of a 256-token block, fp32
    config = EngineConfig(kv_cache_dir=tmp_path, kv_disk_bytes=3 * 8 * block, **DISK_ONLY)   # 8 blocks a layer

    async def main():
        async with await Engine.open(tiny_model, config) as engine:
            with pytest.raises(TierCapacityError, match=r"holds at most 2303 tokens.*kv_disk_bytes") as caught:
                await engine.generate([i % 500 + 1 for i in range(2400)], SamplingParams(max_new_tokens=4))
            assert "kv_disk_bytes" in caught.value.settings
            return await engine.generate([i % 500 + 1 for i in range(2200)], SamplingParams(max_new_tokens=4, ignore_eos=True))

    assert len(asyncio.run(main()).token_ids) == 4
    assert list(tmp_path.iterdir()) == []
