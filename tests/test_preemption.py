"""KV on demand under pressure, end to end: 16 concurrent requests whose KV together exceeds
every tier (host and disk budgets of a few blocks each, none on the device) are admitted on
demand, preempted when the cache runs full and recomputed when they resume, and each finishes
with exactly the tokens it produces alone, greedy or seeded. A cancellation storm while
requests are being preempted leaves the pools, the spill file and the threads as they were."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from tierflow import Engine, EngineConfig, SamplingParams

BLOCK = 256                     # the plan's KV block, in tokens


def _work(n: int = 16) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(11)
    work = []
    for i in range(n):
        # prompts of 180-300 tokens that cross a block boundary while they decode
        prompt = [rng.randrange(1, 500) for _ in range(rng.randrange(180, 300))]
        params = SamplingParams(max_new_tokens=80, ignore_eos=True) if i % 2 == 0 else \
            SamplingParams(max_new_tokens=80, ignore_eos=True, temperature=0.8, top_p=0.9, seed=100 + i)
        work.append((prompt, params))
    return work


def _config(tmp_path, **extra) -> EngineConfig:
    block = 2 * 2 * BLOCK * 16 * 4      # one layer's keys and values of a block: 2 KV heads of 16, fp32
    return EngineConfig(device="cpu", dtype="float32", prefill_chunk_tokens=512, kv_cache_dir=tmp_path,
                        kv_device_bytes=0, kv_host_bytes=8 * block, kv_disk_bytes=16 * block, **extra)


def test_requests_whose_kv_exceeds_every_tier_all_finish_with_their_solo_tokens(tiny_model, tmp_path):
    work = _work()

    async def main():
        async with await Engine.open(tiny_model, _config(tmp_path)) as engine:
            pools = engine.pipeline_statistics().kv_blocks.by_tier()
            need = sum(-(-(len(p) + s.max_new_tokens) // BLOCK) * engine.spec.num_layers for p, s in work)
            assert pools["device"].capacity == 0 and need > pools["host"].capacity + pools["disk"].capacity
            alone = [(await engine.generate(p, s)).token_ids for p, s in work]
            assert engine.stats().preemptions == 0
            together = await asyncio.gather(*(engine.generate(p, s) for p, s in work))
            return alone, together, engine.stats(), engine.pipeline_statistics()

    alone, together, stats, pipeline = asyncio.run(main())
    assert stats.preemptions > 0 and stats.preempted_tokens_recomputed > 0
    assert [list(out.token_ids) for out in together] == [list(a) for a in alone]
    assert all(pool.used == 0 for pool in pipeline.kv_blocks.by_tier().values())
    assert pipeline.batcher.kv_held_blocks == 0 and pipeline.batcher.num_waiting == 0
    assert list(tmp_path.iterdir()) == []                           # the spill file is gone


def test_with_a_prefix_cache_a_preempted_request_gets_its_kv_back(tiny_model, tmp_path):
    work = _work()

    async def main():
        config = _config(tmp_path / "kv", prefix_cache_bytes=64 << 20)
        async with await Engine.open(tiny_model, config) as engine:
            alone = [(await engine.generate(p, s)).token_ids for p, s in work]
            together = await asyncio.gather(*(engine.generate(p, s) for p, s in work))
            return alone, together, engine.stats()

    alone, together, stats = asyncio.run(main())
    assert stats.preemptions > 0 and stats.preempted_tokens_restored > 0
    assert [list(out.token_ids) for out in together] == [list(a) for a in alone]


def test_a_cancellation_storm_during_preemption_leaves_pools_files_and_threads_at_baseline(tiny_model, tmp_path):
    work = _work()
    rng = random.Random(5)
    threads_before = threading.active_count()

    async def main():
        engine = await Engine.open(tiny_model, _config(tmp_path))
        try:
            alone = [(await engine.generate(p, s)).token_ids for p, s in work]
            tasks = [asyncio.create_task(engine.generate(p, s)) for p, s in work]
            doomed = rng.sample(range(len(work)), 8)
            while engine.stats().preemptions == 0:      # cancel once the cache is under pressure
                await asyncio.sleep(0.005)
            for i in doomed:
                await asyncio.sleep(rng.uniform(0, 0.05))
                tasks[i].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2))   # one more sweep boundary
            return alone, doomed, results, engine.pipeline_statistics(), list(tmp_path.iterdir())
        finally:
            await engine.close()

    alone, doomed, results, after, files = asyncio.run(main())
    for i, result in enumerate(results):
        if i not in doomed or not isinstance(result, BaseException):
            assert not isinstance(result, BaseException), result
            assert list(result.token_ids) == list(alone[i])
    assert any(isinstance(r, asyncio.CancelledError) for r in results)
    assert after.requests == 0 and after.batcher.num_running == after.batcher.num_waiting == 0
    assert after.batcher.kv_held_blocks == 0
    assert all(pool.used == 0 for pool in after.kv_blocks.by_tier().values())
    assert len(files) == 1                                         # the one spill file, while open
    assert list(tmp_path.iterdir()) == []                          # and none after close
    assert threading.active_count() == threads_before


def test_reserving_kv_never_preempts_and_gives_the_same_tokens(tiny_model, tmp_path):
    work = _work(8)

    async def main():
        async with await Engine.open(tiny_model, _config(tmp_path, kv_allocation="reserve")) as engine:
            alone = [(await engine.generate(p, s)).token_ids for p, s in work]
            together = await asyncio.gather(*(engine.generate(p, s) for p, s in work))
            return alone, together, engine.stats()

    alone, together, stats = asyncio.run(main())
    assert stats.preemptions == 0 and stats.kv_allocation == "reserve"
    assert [list(out.token_ids) for out in together] == [list(a) for a in alone]


@pytest.mark.parametrize("bad", [dict(kv_allocation="lazy"), dict(kv_disk_bytes=-1)])
def test_bad_kv_settings_are_config_errors(bad, tmp_path):
    from tierflow import ConfigError
    with pytest.raises(ConfigError, match="kv_allocation|kv_disk_bytes"):
        EngineConfig(kv_cache_dir=tmp_path, **bad)
