"""An engine serves the event loop it was opened on: used from another one it raises
``EventLoopError`` at once instead of waiting for ever; ``SyncEngine`` after close raises
``EngineClosedError``."""

from __future__ import annotations

import asyncio

import pytest

from tierflow import Engine, EngineClosedError, EngineConfig, EventLoopError, SamplingParams, SyncEngine
from tierflow.testing import oracle_greedy


def test_an_engine_used_from_a_second_asyncio_run_raises_at_once(tiny_model):
    engine = asyncio.run(Engine.open(tiny_model, EngineConfig(device="cpu")))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(EventLoopError, match="another event loop.*has ended.*SyncEngine"):
        asyncio.run(asyncio.wait_for(engine.generate([1, 2, 3], params), timeout=30))
    with pytest.raises(EventLoopError):
        asyncio.run(asyncio.wait_for(engine.close(), timeout=30))


def test_an_engine_on_a_running_loop_refuses_another_loop_and_keeps_serving(tiny_model):
    import threading

    async def main():
        async with await Engine.open(tiny_model, EngineConfig(device="cpu")) as engine:
            params = SamplingParams(max_new_tokens=4, ignore_eos=True)
            errors = []

            def other_loop():
                try:
                    asyncio.run(engine.generate([1, 2, 3], params))
                except EventLoopError as exc:
                    errors.append(exc)

            thread = threading.Thread(target=other_loop)
            thread.start()
            await asyncio.to_thread(thread.join)
            out = await engine.generate([1, 2, 3], params)
            return errors, out

    errors, out = asyncio.run(main())
    assert len(errors) == 1 and "another event loop" in str(errors[0])
    assert list(out.token_ids) == oracle_greedy(tiny_model, [1, 2, 3], 4)


def test_sync_engine_after_close_says_so(tiny_model):
    engine = SyncEngine(tiny_model, EngineConfig(device="cpu"))
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2))
