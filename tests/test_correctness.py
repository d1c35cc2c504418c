"""tierflow against transformers (fully in memory) on tiny random checkpoints: logits of
every prompt position and 32 greedy tokens, resident and with every layer streamed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.testing import oracle_greedy, oracle_logits, streaming_budget
from tests.conftest import TINY_MODELS

PROMPT = [5, 17, 99, 3, 250, 7, 8, 9, 300, 41, 2, 77]
SMALL = dict(kv_reserve_tokens=256, prefill_chunk_tokens=64, max_num_seqs=4)

# fp32: the same operations in the same order as transformers, so agreement is to
# rounding (1e-5 relative). bf16: both sides round every activation to
# 8 mantissa bits; one ulp is 2^-8 = 0.4% of a value, and logits pass ~10 roundings (norms,
# projections, residual adds) per layer, so we allow 3% of the largest logit — still far
# below the gap between distinct greedy choices, which we check exactly.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


def _dtype(name: str) -> str:
    return TINY_MODELS[name].get("dtype", "float32")


async def _run(path, config, ids, new_tokens):
    async with await Engine.open(path, config) as engine:
        logits = await engine.logits(ids)
        before = engine.stats()
        out = await engine.generate(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        consumed = engine._runtime.stream.statistics().units_consumed if engine._runtime.stream else 0
        return engine, logits, out, before, engine.stats(), consumed


@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_matches_transformers(tiny_models, name, placement):
    path, dtype = tiny_models[name], _dtype(name)
    config = EngineConfig(device="cpu", dtype=dtype, **SMALL)
    if placement == "streamed":
        config = EngineConfig(device="cpu", dtype=dtype, device_memory_bytes=streaming_budget(path, config), **SMALL)
    engine, logits, out, before, after, consumed = asyncio.run(_run(path, config, PROMPT, 32))

    expected = oracle_logits(path, PROMPT, dtype)
    rel = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert rel <= TOLERANCE[dtype], f"relative logit error {rel:.2e}"
    assert list(out.token_ids) == oracle_greedy(path, PROMPT, 32, dtype)
    assert out.finish_reason == "length"

    layers = engine.plan.tiers[1:-1]
    if placement == "resident":
        assert set(engine.plan.tiers) == {"device"}
        assert after.bytes_streamed == 0
    else:
        assert set(layers) == {"disk"}, engine.plan.tiers
        # every decoder layer was read from disk for every sweep (one sweep per token)
        streamed = engine.plan.streamed
        sweep_bytes = sum(engine.index.units[u].buffer_bytes for u in streamed)
        assert after.sweeps == 33 and consumed == 33 * len(streamed)
        # reads run ahead of compute by up to the ring's size, at both ends of the window
        assert after.bytes_streamed - before.bytes_streamed >= 31 * sweep_bytes


def test_chunked_prefill_matches(tiny_model):
    """A prompt prefilled over several sweeps gives the same logits as one sweep."""
    ids = (PROMPT * 6)[:70]
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=16)

    async def main():
        async with await Engine.open(tiny_model, config) as engine:
            return await engine.logits(ids)

    logits = asyncio.run(main())
    expected = oracle_logits(tiny_model, ids)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_chunked_mlp_matches(tiny_model):
    """The MLP computed 7 tokens at a time (a prefill chunk of 64 in ten pieces) gives the
    same logits as transformers."""
    ids = (PROMPT * 6)[:70]
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=64,
                          mlp_chunk_tokens=7)

    async def main():
        async with await Engine.open(tiny_model, config) as engine:
            return engine.plan.mlp_chunk_tokens, await engine.logits(ids)

    mlp_chunk, logits = asyncio.run(main())
    assert mlp_chunk == 7
    expected = oracle_logits(tiny_model, ids)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_stream_yields_the_generated_tokens(tiny_model):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", **SMALL)) as engine:
            chunks = [c async for c in engine.stream(PROMPT, SamplingParams(max_new_tokens=10, ignore_eos=True))]
            full = await engine.generate(PROMPT, SamplingParams(max_new_tokens=10, ignore_eos=True))
            return chunks, full

    chunks, full = asyncio.run(main())
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_seeded_sampling_is_reproducible(tiny_model):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)

    async def main():
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", **SMALL)) as engine:
            a = await engine.generate(PROMPT, params)
            b = await engine.generate(PROMPT, params)
            c = await engine.generate(PROMPT, dataclasses.replace(params, seed=99))
            return a, b, c

    a, b, c = asyncio.run(main())
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_concurrent_requests_share_sweeps(tiny_model):
    prompts = [PROMPT, PROMPT[:5], [1, 2, 3], PROMPT[::-1]]

    async def main():
        config = EngineConfig(device="cpu", **SMALL)
        config = EngineConfig(device="cpu", device_memory_bytes=streaming_budget(tiny_model, config), **SMALL)
        async with await Engine.open(tiny_model, config) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
                                          for p in prompts))
            return outs, engine.stats()

    outs, stats = asyncio.run(main())
    for p, out in zip(prompts, outs):
        assert list(out.token_ids) == oracle_greedy(tiny_model, p, 8)
    assert stats.sweeps < 4 * 8   # the four requests shared sweeps


def test_stop_token_and_stop_ids(tiny_model):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", **SMALL)) as engine:
            ref = await engine.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
            stop = ref.token_ids[3]
            cut = await engine.generate(PROMPT, SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
            return ref, cut, stop

    ref, cut, stop = asyncio.run(main())
    first = list(ref.token_ids).index(stop)
    assert list(cut.token_ids) == list(ref.token_ids[:first + 1])
    assert cut.finish_reason == "stop"


def test_cancelled_generate_frees_its_sequence(tiny_model):
    async def main():
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", **SMALL)) as engine:
            task = asyncio.create_task(engine.generate(PROMPT, SamplingParams(max_new_tokens=200, ignore_eos=True)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            ok = await engine.generate(PROMPT, SamplingParams(max_new_tokens=4, ignore_eos=True))
            return ok, engine._driver.batcher.statistics(), len(engine._driver.requests)

    ok, batcher, live = asyncio.run(main())
    assert len(ok.token_ids) == 4
    assert batcher.num_running == 0 and batcher.num_waiting == 0 and live == 0


def test_two_engines_and_a_transformers_model_in_one_process(tiny_models):
    from transformers import AutoModelForCausalLM

    a_path, b_path = tiny_models["gqa-untied-fp32"], tiny_models["mha-tied-fp32"]
    plain = AutoModelForCausalLM.from_pretrained(b_path, dtype=torch.float32)

    async def main():
        async with await Engine.open(a_path, EngineConfig(device="cpu", **SMALL)) as a, \
                await Engine.open(b_path, EngineConfig(device="cpu", **SMALL)) as b:
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            return await asyncio.gather(a.generate(PROMPT, params), b.generate(PROMPT, params))

    out_a, out_b = asyncio.run(main())
    with torch.inference_mode():
        logits = plain(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(logits, oracle_logits(b_path, PROMPT), rtol=0, atol=0)
    assert list(out_a.token_ids) == oracle_greedy(a_path, PROMPT, 6)
    assert list(out_b.token_ids) == oracle_greedy(b_path, PROMPT, 6)
