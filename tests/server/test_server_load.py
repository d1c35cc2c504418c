"""Load on loopback: 64 concurrent streaming clients, a quarter of them leaving at random
moments. Every client that stays gets exactly the tokens its request gets alone; the ones that
leave cancel their engine requests; afterwards the engine's live requests, KV block pools and
threads are back where they started, and the whole test ends on its own within a bound."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import replace

import openai
import pytest

from tierflow import EngineConfig, SamplingParams, SyncEngine
from tierflow.testing import build_chat_llama, streaming_budget
from tests.server.serving import serving

CLIENTS = 64
LEAVING = CLIENTS // 4
NEW = 16
PROMPTS = [[{"role": "user", "content": text}] for text in
           ("What is the capital of France?", "Name three primary colours.", "Write one sentence about the sea.",
            "Count from 0 to 9.")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_chat_llama(tmp_path_factory.mktemp("load") / "m", seed=5)


def test_64_streaming_clients_a_quarter_leaving_early(model, tmp_path):
    config = EngineConfig(device="cpu", max_num_seqs=CLIENTS, kv_device_bytes=16 * 2**20, kv_host_bytes=0,
                          kv_cache_dir=tmp_path)
    config = replace(config, device_memory_bytes=streaming_budget(model, config))
    with SyncEngine(model, config) as solo:
        assert solo.engine.plan.streamed
        want = [solo.generate(p, SamplingParams(max_new_tokens=NEW, ignore_eos=True)).text for p in PROMPTS]

    rng = random.Random(7)
    leaving = set(rng.sample(range(CLIENTS), LEAVING))
    leave_after = {i: rng.randint(1, NEW // 2) for i in leaving}

    with serving(model, config, max_queue=CLIENTS) as server:
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as warm:
            for _ in range(2):     # the reader pools start their threads on first use
                list(warm.chat.completions.create(model="tiny", messages=PROMPTS[0], max_tokens=NEW, stream=True))
        baseline_threads = _threads()

        async def client_run(client: openai.AsyncOpenAI, i: int) -> str | None:
            stream = await client.chat.completions.create(
                model="tiny", messages=PROMPTS[i % len(PROMPTS)], max_tokens=NEW, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            text, chunks = [], 0
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    chunks += 1
                if i in leaving and chunks >= leave_after[i]:
                    break
            else:
                return "".join(text)
            await stream.close()                  # the client goes away mid-stream
            return None

        async def everyone() -> list[str | None]:
            async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                          timeout=120) as client:
                return await asyncio.gather(*(client_run(client, i) for i in range(CLIENTS)))

        started = time.monotonic()
        results = asyncio.run(asyncio.wait_for(everyone(), timeout=300))
        for i, text in enumerate(results):
            if i in leaving:
                assert text is None
            else:
                assert text == want[i % len(PROMPTS)], i

        def settled() -> tuple[int, int, int, int]:
            engine = server.state.engine
            pipeline = engine.pipeline_statistics()
            pools = pipeline.kv_blocks
            used = sum(p.used for p in pools.by_tier().values())
            return server.state.live, pipeline.requests, pipeline.batcher.num_running + pipeline.batcher.num_waiting, used

        deadline = time.monotonic() + 30
        while (state := server.in_loop(settled)) != (0, 0, 0, 0):
            assert time.monotonic() < deadline, f"not back to baseline: live, requests, sequences, KV blocks = {state}"
            time.sleep(0.05)
        stats = server.in_loop(lambda: server.state.engine.stats())
        # the clients that left did not run to the end: fewer tokens than everyone's NEW
        assert stats.tokens_generated < CLIENTS * NEW
        deadline = time.monotonic() + 10        # a pool's thread may still be winding down; a leaked one stays
        while _threads() > baseline_threads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _threads() <= baseline_threads, [t.name for t in threading.enumerate()]
        assert time.monotonic() - started < 300


def _threads() -> int:
    """Live threads but tqdm's monitor, which comes and goes with any progress bar in the process
    (transformers' loading bars, in other tests): not the server's."""
    return sum(1 for t in threading.enumerate() if t.name != "tqdm_monitor")
