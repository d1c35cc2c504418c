"""Many concurrent requests on one weight stream: each gets exactly the tokens it gets alone;
cancellation, KV admission and timeouts affect only the request they concern."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from tierflow import Engine, EngineConfig, RequestTimeoutError, SamplingParams, TierCapacityError
from tierflow.testing import streaming_budget

CONFIG = dict(device="cpu", dtype="float32", kv_reserve_tokens=4096, prefill_chunk_tokens=64, max_num_seqs=64)


def requests(n: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """``n`` different prompts (1 to 40 tokens), lengths and sampling: half greedy, half seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 500) for _ in range(rng.randint(1, 40))]
        new = rng.randint(2, 12)
        params = SamplingParams(max_new_tokens=new, ignore_eos=True) if i % 2 == 0 else \
            SamplingParams(max_new_tokens=new, temperature=0.8, top_p=0.95, top_k=40, seed=rng.randrange(10**6),
                           ignore_eos=True)
        out.append((prompt, params))
    return out


@pytest.fixture(scope="module")
def streamed_config(tiny_model):
    """Every decoder layer streamed from disk."""
    return EngineConfig(**CONFIG, device_memory_bytes=streaming_budget(tiny_model, EngineConfig(**CONFIG)))


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_concurrent_requests_get_the_tokens_they_get_alone(tiny_model, streamed_config, n):
    work = requests(n, seed=n)

    async def main():
        async with await Engine.open(tiny_model, streamed_config) as engine:
            assert set(engine.plan.tiers[1:-1]) == {"disk"}
            alone = [(await engine.generate(p, s)).token_ids for p, s in work]
            sweeps = engine.stats().sweeps
            together = await asyncio.gather(*(engine.generate(p, s) for p, s in work))
            return alone, [c.token_ids for c in together], engine.stats().sweeps - sweeps

    alone, together, sweeps = asyncio.run(main())
    assert together == alone
    if n > 1:    # they shared sweeps: fewer than running them one after another
        assert sweeps < sum(len(t) for t in alone)


def test_a_cancellation_storm_leaves_survivors_correct_and_the_pipeline_at_baseline(tiny_model, streamed_config):
    work = requests(64, seed=7)
    rng = random.Random(3)
    threads_before = threading.active_count()

    async def main():
        engine = await Engine.open(tiny_model, streamed_config)
        try:
            alone = [(await engine.generate(p, s)).token_ids for p, s in work]
            baseline = engine.pipeline_statistics()
            tasks = [asyncio.create_task(engine.generate(p, s)) for p, s in work]
            doomed = rng.sample(range(64), 32)

            async def cancel_later(i):
                await asyncio.sleep(rng.uniform(0, 0.05))
                tasks[i].cancel()

            await asyncio.gather(*(cancel_later(i) for i in doomed))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2))   # one more sweep boundary
            return alone, doomed, results, baseline, engine.pipeline_statistics()
        finally:
            await engine.close()

    alone, doomed, results, baseline, after = asyncio.run(main())
    for i, result in enumerate(results):
        if i in doomed and isinstance(result, asyncio.CancelledError):
            continue
        assert not isinstance(result, BaseException), (i, result)
        assert result.token_ids == alone[i]      # a survivor, or a doomed one that finished first
    assert any(isinstance(r, asyncio.CancelledError) for r in results)
    batcher = after.batcher
    assert batcher.num_running == batcher.num_waiting == batcher.kv_held_blocks == 0
    assert after.requests == 0
    for name in ("ring", "channel"):    # read-ahead refills the same slots as before
        now, then = getattr(after, name), getattr(baseline, name)
        assert (now.num_items if name == "channel" else now.num_free) == \
            (then.num_items if name == "channel" else then.num_free)
    assert after.ring.num_waiting == baseline.ring.num_waiting
    assert threading.active_count() == threads_before    # reader pool and compute worker are gone


def test_a_request_that_can_never_fit_the_kv_capacity_fails_at_once(tiny_model):
    async def main():
        config = EngineConfig(device="cpu", kv_reserve_tokens=256, prefill_chunk_tokens=64)
        async with await Engine.open(tiny_model, config) as engine:
            with pytest.raises(TierCapacityError, match=r"need KV cache for 300 tokens.*holds at most 256 tokens for one request.*kv_reserve_tokens"):
                await asyncio.wait_for(engine.generate(list(range(1, 101)), SamplingParams(max_new_tokens=200)), 1)
            return await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))

    assert len(asyncio.run(main()).token_ids) == 3


def test_with_reserved_kv_a_request_that_fits_later_waits_for_capacity(tiny_model):
    async def main():
        config = EngineConfig(device="cpu", kv_reserve_tokens=256, prefill_chunk_tokens=64, kv_allocation="reserve")
        async with await Engine.open(tiny_model, config) as engine:
            alone = await engine.generate([7, 8, 9], SamplingParams(max_new_tokens=50, ignore_eos=True))
            first = asyncio.create_task(engine.generate([1, 2, 3], SamplingParams(max_new_tokens=230, ignore_eos=True)))
            await asyncio.sleep(0.01)
            second = asyncio.create_task(engine.generate([7, 8, 9], SamplingParams(max_new_tokens=50, ignore_eos=True)))
            waited = False
            while not first.done():
                stats = engine.pipeline_statistics().batcher
                assert stats.kv_held_blocks <= stats.kv_capacity_blocks == 256 * engine.spec.num_layers
                waited |= stats.num_waiting == 1 and stats.num_running == 1
                await asyncio.sleep(0.002)
            return alone, await first, await second, waited

    alone, first, second, waited = asyncio.run(main())
    assert waited                       # the second request queued while the first held the capacity
    assert len(first.token_ids) == 230 and second.token_ids == alone.token_ids


def test_a_timeout_cancels_only_its_request(tiny_model):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", kv_reserve_tokens=1024)) as engine:
            other = asyncio.create_task(engine.generate([4, 5, 6], SamplingParams(max_new_tokens=20, ignore_eos=True)))
            with pytest.raises(RequestTimeoutError, match="timeout"):
                await engine.generate([1, 2, 3], SamplingParams(max_new_tokens=900, ignore_eos=True), timeout_s=0.05)
            with pytest.raises(TimeoutError):
                async for _ in engine.stream([1, 2, 3], SamplingParams(max_new_tokens=900, ignore_eos=True),
                                             timeout_s=0.05):
                    pass
            done = await other
            await engine.generate([1], SamplingParams(max_new_tokens=1))
            return done, engine.pipeline_statistics()

    done, stats = asyncio.run(main())
    assert len(done.token_ids) == 20
    assert stats.requests == 0 and stats.batcher.kv_held_blocks == 0


def test_tierflow_entry_points_run_on_uvloop(tiny_model):
    """uvloop is part of the test extra: the SyncEngine (like the CLI) runs the engine on it."""
    import uvloop

    from tierflow import SyncEngine

    with SyncEngine(tiny_model, EngineConfig(device="cpu", kv_reserve_tokens=256)) as engine:
        assert isinstance(engine._loop, uvloop.Loop)
        out = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
