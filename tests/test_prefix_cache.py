"""The prefix cache in the engine: a request sharing a long prefix with an earlier one reuses
its whole KV blocks (at least one prompt token is always prefilled) and answers exactly as a
cold engine and transformers do — across processes through the directory, past a corrupt
block file, with paged KV on disk, over the turns of a conversation, among concurrent and
cancelled requests. Another model never sees the blocks; score requests bypass the cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierflow import ConfigError, Engine, EngineConfig, SamplingParams
from tierflow.testing import build_random_llama, oracle_greedy, oracle_logits
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.kv.prefix import PrefixCache
from tierflow.tiers.kv.prefix_files import SUFFIX
from tierflow.tiers.kv.prefix_keys import block_keys, model_fingerprint

BT = 256                                  # the plan's kv_block_tokens
NEW = 16
HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}
BASE = dict(device="cpu", dtype="float32", kv_reserve_tokens=4096, profile=HARDWARE)
PARAMS = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[1]


def _run(coro, limit_s: float = 60):
    return asyncio.run(asyncio.wait_for(coro, limit_s))      # a hung engine fails the test


def _tail(seed: int, n: int = 12) -> list[int]:
    return [(seed * 131 + j * 17) % 499 + 1 for j in range(n)]


DOC = [(i * 37) % 500 + 1 for i in range(900)]         # three full blocks and 132 tokens
A, B, C = DOC + _tail(1), DOC + _tail(2), DOC + _tail(3)
EXACT = DOC + _tail(4, 4 * BT - len(DOC))                # exactly four blocks
EXACT_PLUS = EXACT + [7]
TURN1 = DOC + _tail(5, 110)                              # 1010 tokens: 16 new ones complete block 3
MANY = [DOC + _tail(10 + i) for i in range(8)]
CANCELLED = {1, 4, 6}
SHARED = 3 * BT                                          # what a DOC + question prompt reuses


def _turn2(turn1_answer: list[int]) -> list[int]:
    return TURN1 + turn1_answer + _tail(6, 8)


async def _generate_each(path, config, prompts):
    out = []
    async with await Engine.open(path, config) as engine:
        for prompt in prompts:
            out.append(await engine.generate(prompt, PARAMS))
    return out


@pytest.fixture(scope="module")
def cold(tiny_model):
    """Greedy tokens of a cold engine (no prefix cache), each prompt alone."""
    async def main():
        result = {}
        async with await Engine.open(tiny_model, EngineConfig(**BASE)) as engine:
            for prompt in (A, B, C, EXACT, EXACT_PLUS, TURN1, *MANY):
                result[tuple(prompt)] = list((await engine.generate(prompt, PARAMS)).token_ids)
            turn2 = _turn2(result[tuple(TURN1)])
            result[tuple(turn2)] = list((await engine.generate(turn2, PARAMS)).token_ids)
            assert engine.stats().prompt_tokens_cached == 0
        return result

    tokens = _run(main(), 180)
    return lambda prompt: tokens[tuple(prompt)]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The same architecture as tiny_model, other weights."""
    return build_random_llama(tmp_path_factory.mktemp("other") / "model", seed=7)


@pytest.fixture(scope="module")
def oracle_kv(tiny_model):
    """KV of token ids from transformers: [layers, 2, kv_heads, tokens, head_dim], keys after
    RoPE, as tierflow keeps them. Greedy tokens of a small random model hardly depend on
    where in a long context a block of KV sits, so the KV itself is compared."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    def kv(ids):
        with torch.inference_mode():
            cache = model(torch.tensor([ids]), use_cache=True).past_key_values
        return torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])

    return kv


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def _capture_attached_kv(engine) -> list[torch.Tensor]:
    """Record, for each request admitted from now on, the KV the prefix cache put into it:
    [layers, 2, kv_heads, cached tokens, head_dim]."""
    prefix, captured = engine._runtime.prefix, []
    attach = prefix.attach

    def attach_and_read(kv, prompt_ids):
        n = attach(kv, prompt_ids)
        captured.append(torch.stack([kv.read(layer, 0, n) for layer in range(prefix.num_layers)]))
        return n

    prefix.attach = attach_and_read
    return captured


def _fingerprint(path) -> str:
    index = CheckpointIndex.open(path)
    return model_fingerprint(index.config, index.files, torch.float32)


# ------------------------------------------------------------------------------ in process
def test_a_shared_prefix_is_reused_and_answers_like_a_cold_engine_and_transformers(tiny_model, cold, oracle_kv):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(**BASE, prefix_cache_bytes=2**26)) as engine:
            attached = _capture_attached_kv(engine)
            first = await engine.generate(A, PARAMS)
            second = await engine.generate(B, PARAMS)
            return first, second, engine.stats(), engine.pipeline_statistics().prefix_cache, attached

    first, second, stats, cache, attached = _run(main())
    assert first.cached_tokens == 0 and second.cached_tokens == SHARED
    assert attached[0].shape[3] == 0 and _close(attached[1], oracle_kv(DOC[:SHARED]))
    assert stats.prompt_tokens_cached == SHARED
    assert stats.prompt_tokens == len(A) + len(B) - SHARED
    assert cache.hit_blocks == 3 and cache.stored_blocks == 3 and cache.rejected_files == 0
    assert list(first.token_ids) == cold(A)
    assert list(second.token_ids) == cold(B) == oracle_greedy(tiny_model, B, NEW)


def test_a_prompt_of_whole_blocks_leaves_its_last_block_to_prefill(tiny_model, cold):
    assert len(EXACT) == 4 * BT

    async def main():
        async with await Engine.open(tiny_model, EngineConfig(**BASE, prefix_cache_bytes=2**26)) as engine:
            outs = [await engine.generate(p, PARAMS) for p in (EXACT, EXACT, EXACT_PLUS)]
            return outs, engine.stats()

    (cold_run, again, plus), stats = _run(main())
    assert cold_run.cached_tokens == 0
    assert again.cached_tokens == 3 * BT           # keys cover prompt[:-1]: the fourth block is prefilled
    assert plus.cached_tokens == 4 * BT            # ... although it was stored: one more token reuses it
    assert stats.prompt_tokens_cached == 7 * BT
    assert list(cold_run.token_ids) == list(again.token_ids) == cold(EXACT)
    assert list(plus.token_ids) == cold(EXACT_PLUS)


def test_a_conversation_reuses_blocks_that_cover_generated_tokens(tiny_model, cold, oracle_kv):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(**BASE, prefix_cache_bytes=2**26)) as engine:
            attached = _capture_attached_kv(engine)
            turn1 = await engine.generate(TURN1, PARAMS)
            turn2 = await engine.generate(_turn2(list(turn1.token_ids)), PARAMS)
            return turn1, turn2, attached

    turn1, turn2, attached = _run(main())
    assert list(turn1.token_ids) == cold(TURN1)
    # turn 1's KV: 1010 prompt + 15 generated tokens (the last is sampled, not computed) = 4 blocks
    assert turn2.cached_tokens == 4 * BT > len(TURN1)
    assert _close(attached[1], oracle_kv(_turn2(cold(TURN1))[:4 * BT]))
    assert list(turn2.token_ids) == cold(_turn2(cold(TURN1)))


def test_paged_kv_on_disk_with_the_prefix_cache(tiny_model, cold, oracle_kv, tmp_path):
    config = EngineConfig(**BASE, kv_cache_dir=tmp_path / "kv", kv_device_bytes=0, kv_host_bytes=0,
                          prefill_chunk_tokens=100,     # chunks that start and end inside blocks
                          prefix_cache_bytes=2**26, prefix_cache_dir=tmp_path / "prefix")
    (tmp_path / "kv").mkdir()

    async def main():
        async with await Engine.open(tiny_model, config) as engine:
            attached = _capture_attached_kv(engine)
            return [await engine.generate(p, PARAMS) for p in (A, B, TURN1)], attached

    (first, second, third), attached = _run(main())
    assert (first.cached_tokens, second.cached_tokens, third.cached_tokens) == (0, SHARED, SHARED)
    assert _close(attached[1], oracle_kv(DOC[:SHARED])) and torch.equal(attached[1], attached[2])
    assert list(first.token_ids) == cold(A)
    assert list(second.token_ids) == cold(B)
    assert list(third.token_ids) == cold(TURN1)
    assert list((tmp_path / "kv").iterdir()) == []
    written = list((tmp_path / "prefix").rglob(f"*{SUFFIX}"))
    assert len(written) == 4                        # DOC's three blocks, and TURN1's fourth


def test_concurrent_requests_some_cancelled(tiny_model, cold):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(**BASE, prefix_cache_bytes=2**26)) as engine:
            warm = await engine.generate(A, PARAMS)
            streamed = asyncio.Event()

            async def survivor(prompt):
                return await engine.generate(prompt, PARAMS)

            async def cancelled_midway(prompt):
                got = []
                async with contextlib.aclosing(engine.stream(prompt, PARAMS)) as chunks:
                    async for chunk in chunks:
                        got += chunk.token_ids
                        if len(got) >= 2:
                            streamed.set()
                            break
                return got

            tasks = [asyncio.create_task(cancelled_midway(p) if i in CANCELLED else survivor(p))
                     for i, p in enumerate(MANY)]
            await streamed.wait()
            tasks[0].cancel()                       # a generate() cancelled by its caller, midway
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)
            after = await engine.generate(C, PARAMS)
            return warm, results, after, engine.pipeline_statistics()

    warm, results, after, pipeline = _run(main())
    assert list(warm.token_ids) == cold(A)
    assert isinstance(results[0], asyncio.CancelledError)
    for i, result in enumerate(results):
        if i in CANCELLED:
            assert 2 <= len(result) < NEW and result == cold(MANY[i])[:len(result)]
        elif i:
            assert result.cached_tokens == SHARED
            assert list(result.token_ids) == cold(MANY[i]), i
    assert after.cached_tokens == SHARED and list(after.token_ids) == cold(C)
    assert pipeline.requests == 0 and pipeline.prefix_cache.rejected_files == 0


def test_score_requests_bypass_the_cache(tiny_model):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(**BASE, prefix_cache_bytes=2**26)) as engine:
            await engine.generate(A, PARAMS)
            before = engine.pipeline_statistics().prefix_cache
            logits = await engine.logits(B)
            return logits, before, engine.pipeline_statistics().prefix_cache, engine.stats()

    logits, before, after, stats = _run(main())
    assert before.stored_blocks == 3
    assert after == before                          # no lookup, no hit, nothing stored
    assert stats.prompt_tokens_cached == 0
    expected = oracle_logits(tiny_model, B)
    assert logits.shape == expected.shape
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_another_model_on_the_same_directory_reuses_nothing(tiny_model, other_model, tmp_path):
    config = EngineConfig(**BASE, prefix_cache_dir=tmp_path)
    (mine,) = _run(_generate_each(tiny_model, config, [A]))
    assert mine.cached_tokens == 0
    theirs = _run(_generate_each(other_model, config, [B, C]))
    (reference,) = _run(_generate_each(other_model, EngineConfig(**BASE), [C]))
    assert theirs[0].cached_tokens == 0             # tiny_model's DOC blocks are not other_model's
    assert theirs[1].cached_tokens == SHARED        # its own are
    assert list(theirs[1].token_ids) == list(reference.token_ids)
    subdirs = sorted(p.name for p in tmp_path.iterdir())
    assert subdirs == sorted((_fingerprint(tiny_model)[:32], _fingerprint(other_model)[:32]))


# ---------------------------------------------------------------------------- two processes
SCRIPT = r"""
import asyncio, json, sys
from tierflow import Engine, EngineConfig, SamplingParams

model, directory, hardware, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])

async def main():
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=4096, profile=hardware,
                          prefix_cache_dir=directory)
    async with await Engine.open(model, config) as engine:
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=16, ignore_eos=True))
    cache = engine.pipeline_statistics().prefix_cache
    print(json.dumps({"tokens": list(out.token_ids), "cached_tokens": out.cached_tokens,
                      "rejected_files": cache.rejected_files, "written": cache.disk_blocks_written}))

asyncio.run(main())
"""


def _in_a_process(model, directory, prompt) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(directory), json.dumps(HARDWARE),
                           json.dumps(prompt)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _doc_blocks_on_disk(fingerprint, directory) -> torch.Tensor:
    """DOC's three blocks as a later process finds them, joined along the tokens."""
    check = PrefixCache(fingerprint, (3, 2, 2, BT, 16), torch.float32, directory=directory)
    blocks = check.load(block_keys(fingerprint, DOC, BT))
    assert len(blocks) == 3 and check.statistics().rejected_files == 0
    check.close()
    return torch.cat(blocks, dim=3)


def test_blocks_are_reused_by_a_later_process_and_a_corrupt_one_is_prefilled(tiny_model, cold, oracle_kv,
                                                                             tmp_path):
    fingerprint = _fingerprint(tiny_model)
    expected = oracle_kv(DOC[:SHARED])
    first = _in_a_process(tiny_model, tmp_path, A)
    assert first == {"tokens": cold(A), "cached_tokens": 0, "rejected_files": 0, "written": 3}
    assert _close(_doc_blocks_on_disk(fingerprint, tmp_path), expected)

    second = _in_a_process(tiny_model, tmp_path, B)     # another question over the same document
    assert second == {"tokens": cold(B), "cached_tokens": SHARED, "rejected_files": 0, "written": 0}

    keys = block_keys(fingerprint, DOC, BT)
    directory = tmp_path / fingerprint[:32]
    assert sorted(p.name for p in directory.iterdir()) == sorted(f"{k}{SUFFIX}" for k in keys)
    damaged = directory / f"{keys[1]}{SUFFIX}"
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0x40
    damaged.write_bytes(data)

    third = _in_a_process(tiny_model, tmp_path, C)
    assert third == {"tokens": cold(C), "cached_tokens": BT, "rejected_files": 1, "written": 1}

    # the third process prefilled blocks 1 and 2 and wrote block 1 again: all three are whole
    assert _close(_doc_blocks_on_disk(fingerprint, tmp_path), expected)


# --------------------------------------------------------------------------------- config
def test_prefix_cache_config_validation(tmp_path):
    assert not EngineConfig().prefix_cache
    assert EngineConfig(prefix_cache_bytes=1).prefix_cache
    assert EngineConfig(prefix_cache_dir=tmp_path).prefix_cache
    assert EngineConfig(prefix_cache_dir=str(tmp_path), prefix_cache_disk_bytes=2**20).prefix_cache
    with pytest.raises(ConfigError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=-1)
    with pytest.raises(ConfigError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=True)
    with pytest.raises(ConfigError, match="prefix_cache_dir must be a path"):
        EngineConfig(prefix_cache_dir=123)
    with pytest.raises(ConfigError, match="prefix_cache_disk_bytes"):
        EngineConfig(prefix_cache_dir=tmp_path, prefix_cache_disk_bytes=0)
    with pytest.raises(ConfigError, match="prefix_cache_disk_bytes"):
        EngineConfig(prefix_cache_dir=tmp_path, prefix_cache_disk_bytes=-5)


def test_a_request_arriving_while_another_attaches_its_prefix_still_reuses_its_own(tiny_model, cold):
    """Requests arrive at any time: one submitted while the driver copies another's cached
    prefix into its KV must get its own prefix lookup before its first sweep too."""
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(**BASE, prefix_cache_bytes=2**26)) as engine:
            await engine.generate(A, PARAMS)
            loop, late = asyncio.get_running_loop(), []
            prefix = engine._runtime.prefix
            attach = prefix.attach

            async def submit_late():
                late.append(asyncio.create_task(engine.generate(C, PARAMS)))
                await asyncio.sleep(0)            # the task's first step submits the request

            def attach_while_another_arrives(kv, prompt_ids):   # runs in the compute worker
                if not late:
                    asyncio.run_coroutine_threadsafe(submit_late(), loop).result(timeout=30)
                return attach(kv, prompt_ids)

            prefix.attach = attach_while_another_arrives
            first = await engine.generate(B, PARAMS)
            second = await late[0]
            return first, second

    first, second = _run(main())
    assert first.cached_tokens == SHARED and list(first.token_ids) == cold(B)
    assert list(second.token_ids) == cold(C)
    assert second.cached_tokens == SHARED


def test_the_prefix_cache_refuses_a_longrope_model(tmp_path):
    from tierflow.testing import build_random_checkpoint

    short = 32
    path = build_random_checkpoint(
        tmp_path / "phi3", "phi3", max_position_embeddings=4 * short, original_max_position_embeddings=short,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                         "long_factor": [2.0] * 8, "original_max_position_embeddings": short}, num_heads=4,
        hidden_size=64)

    async def main():
        await Engine.open(path, EngineConfig(device="cpu", prefix_cache_bytes=2**20))

    with pytest.raises(ConfigError, match="prefix cache cannot serve a longrope model"):
        asyncio.run(main())
