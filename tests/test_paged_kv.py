"""The paged KV cache: at 4k tokens of context, KV all on disk, all in host memory, or split
over device, host and disk gives the logits and tokens of the in-memory run and of
transformers; corrupt, missing or unwritable spill files fail the request, never silently,
and the engine goes on serving."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from tierflow import Engine, EngineConfig, SamplingParams, TierCapacityError, TransferError
from tierflow.errors import KVCorruptionError
from tierflow.testing import oracle_greedy, oracle_logits

CONTEXT = 4096
NEW_TOKENS = 16
PROMPT = [(i * 37) % 500 + 1 for i in range(CONTEXT - NEW_TOKENS - 8)]
BASE = dict(device="cpu", dtype="float32", kv_reserve_tokens=CONTEXT, prefill_chunk_tokens=1024)
HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}


async def _run(path, config, prompt=PROMPT, new_tokens=NEW_TOKENS):
    async with await Engine.open(path, config) as engine:
        logits = await engine.logits(prompt)
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        return logits, list(out.token_ids), engine.costs.kv_bytes_per_token, engine.pipeline_statistics()


@pytest.fixture(scope="module")
def reference(tiny_model):
    logits, tokens, per_token, _ = asyncio.run(_run(tiny_model, EngineConfig(**BASE, profile=HARDWARE)))
    return logits, tokens, per_token


@pytest.mark.parametrize("layout", ["all on disk", "all on host", "device, host and disk"])
def test_tiered_kv_matches_in_memory_and_transformers(tiny_model, reference, tmp_path, layout):
    ref_logits, ref_tokens, per_token = reference
    third = per_token * CONTEXT // 3
    budgets = {"all on disk": dict(kv_device_bytes=0, kv_host_bytes=0),
               "all on host": dict(kv_device_bytes=0, kv_host_bytes=per_token * CONTEXT),
               "device, host and disk": dict(kv_device_bytes=third, kv_host_bytes=third)}[layout]
    spill = {} if layout == "all on host" else dict(kv_cache_dir=tmp_path)    # with a directory, disk has room too
    config = EngineConfig(**BASE, profile=HARDWARE, **spill, **budgets)
    logits, tokens, _, stats = asyncio.run(_run(tiny_model, config))

    pools = stats.kv_blocks.by_tier()
    used_tiers = {tier for tier, pool in pools.items() if pool.capacity}
    assert used_tiers == {"all on disk": {"disk"}, "all on host": {"host"},
                          "device, host and disk": {"device", "host", "disk"}}[layout]
    assert all(pool.used == 0 for pool in pools.values())          # freed when the requests ended
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert rel <= 1e-5, rel
    expected = oracle_logits(tiny_model, PROMPT)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert tokens == ref_tokens == oracle_greedy(tiny_model, PROMPT, NEW_TOKENS)
    assert list(tmp_path.iterdir()) == []                          # the spill file is removed on close


def test_without_a_spill_directory_kv_that_does_not_fit_is_a_config_error(tiny_model):
    from tierflow import ConfigError
    with pytest.raises(ConfigError, match="set EngineConfig.kv_cache_dir"):
        asyncio.run(Engine.open(tiny_model, EngineConfig(**BASE, profile=HARDWARE, kv_device_bytes=0)))


def _disk_config(tmp_path):
    return EngineConfig(device="cpu", kv_reserve_tokens=2048, prefill_chunk_tokens=256, profile=HARDWARE,
                        kv_cache_dir=tmp_path, kv_device_bytes=0, kv_host_bytes=0)


def _spill_file(tmp_path):
    (path,) = tmp_path.iterdir()
    return path


def _inject(fault, directory, monkeypatch):
    (path,) = directory.iterdir()
    if fault == "flipped byte":            # in the first block's keys
        with open(path, "r+b") as raw:
            raw.seek(100)
            byte = raw.read(1)
            raw.seek(100)
            raw.write(bytes([byte[0] ^ 0xFF]))
    elif fault == "deleted file":
        os.unlink(path)
    else:                                  # the next block written to disk meets a full disk
        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "pwrite", full)


@pytest.mark.parametrize("fault,error,message", [
    ("flipped byte", KVCorruptionError, "fails its checksum"),
    ("deleted file", TransferError, "was deleted while in use"),
    ("disk full", TierCapacityError, "is full"),
])
def test_a_spill_fault_fails_its_request_and_the_engine_goes_on(tiny_model, tmp_path, monkeypatch, fault, error,
                                                                message):
    prompt = PROMPT[:600]        # the prefill puts two full 256-token blocks per layer on disk
    expected = oracle_greedy(tiny_model, prompt[:300], 6)

    async def main():
        async with await Engine.open(tiny_model, _disk_config(tmp_path)) as engine:
            failure = None
            try:
                async for _ in engine.stream(prompt, SamplingParams(max_new_tokens=400, ignore_eos=True)):
                    if failure is None:
                        failure = "injected"
                        _inject(fault, tmp_path, monkeypatch)
            except Exception as exc:      # noqa: BLE001 - checked below
                failure = exc
            monkeypatch.undo()
            after = await engine.generate(prompt[:300], SamplingParams(max_new_tokens=6, ignore_eos=True))
            return failure, list(after.token_ids), engine.pipeline_statistics()

    failure, tokens, stats = asyncio.run(asyncio.wait_for(main(), 120))
    assert isinstance(failure, error) and message in str(failure), failure
    assert tokens == expected                       # the same engine serves the next request correctly
    assert all(pool.used == 0 for pool in stats.kv_blocks.by_tier().values())
    assert list(tmp_path.iterdir()) == []           # closing removed the spill file


def test_a_full_disk_fails_only_the_request_whose_block_it_was(tiny_model, tmp_path, monkeypatch):
    """B decodes with its blocks in the tail buffer; A's prefill commits a block per layer to
    disk and meets a full disk: A fails, B's tokens are those it gets alone."""
    b_prompt, a_prompt = PROMPT[:100], PROMPT[:256]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)

    async def main():
        async with await Engine.open(tiny_model, _disk_config(tmp_path)) as engine:
            alone = list((await engine.generate(b_prompt, params)).token_ids)
            real, calls = os.pwrite, []

            def full_once(fd, data, offset):
                calls.append(offset)
                if len(calls) == 1:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(fd, data, offset)

            b_tokens, a_error = [], None
            stream = engine.stream(b_prompt, params)
            async for chunk in stream:
                b_tokens += chunk.token_ids
                if a_error is None:
                    monkeypatch.setattr(os, "pwrite", full_once)
                    try:
                        await engine.generate(a_prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
                    except TierCapacityError as exc:
                        a_error = exc
            monkeypatch.undo()
            return alone, b_tokens, a_error, engine.pipeline_statistics()

    alone, b_tokens, a_error, stats = asyncio.run(asyncio.wait_for(main(), 120))
    assert isinstance(a_error, TierCapacityError) and "is full" in str(a_error)
    assert b_tokens == alone
    assert stats.requests == 0 and all(pool.used == 0 for pool in stats.kv_blocks.by_tier().values())


def test_a_conversation_turn_after_turn_gives_the_tokens_of_a_fresh_full_context_run(tiny_model, tmp_path):
    """Three turns, each prompt the whole conversation so far plus a new message, on one engine
    with KV on disk: every turn's answer equals a fresh engine's answer to the same context."""
    messages = [PROMPT[:700], PROMPT[1000:1300], PROMPT[2000:2100]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    async def conversation():
        async with await Engine.open(tiny_model, _disk_config(tmp_path)) as engine:
            context, answers = [], []
            for message in messages:
                context += message
                answer = list((await engine.generate(context, params)).token_ids)
                answers.append(answer)
                context += answer
            return answers

    async def fresh(context):
        async with await Engine.open(tiny_model, EngineConfig(device="cpu", kv_reserve_tokens=2048,
                                                               prefill_chunk_tokens=256, profile=HARDWARE)) as engine:
            return list((await engine.generate(context, params)).token_ids)

    answers = asyncio.run(conversation())
    context = []
    for message, answer in zip(messages, answers):
        context += message
        assert asyncio.run(fresh(context)) == answer == oracle_greedy(tiny_model, context, 12)
        context += answer


def test_disk_blocks_come_back_in_order_from_runs_and_a_window_skips_the_blocks_before_it(tmp_path, monkeypatch):
    """Blocks in consecutive spill slots are read with one request each run (up to KV_READ_RUN),
    in order and intact; with a sliding window, blocks wholly before every new token's window
    are not read at all."""
    import torch

    from tierflow.stages.kv import KVLoadPlan, KVRead, KVStages
    from tierflow.tiers.kv.paged import KVStore
    from tierflow.tiers.io.spill import SpillFile

    KV_READ_RUN = 4                                     # runs of at most 4 blocks: 10 blocks make 3 runs
    monkeypatch.setattr("tierflow.stages.kv_plan.KV_READ_RUN", KV_READ_RUN)

    store = KVStore(num_layers=1, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"),
                    block_tokens=16, device_blocks=0, host_blocks=0, disk_blocks=12, spill_dir=tmp_path)
    requests: list[int] = []
    read_run = SpillFile.read_run
    monkeypatch.setattr(SpillFile, "read_run", lambda self, first, count, buffer, nbytes=None, expected=None:
                        requests.append(count) or read_run(self, first, count, buffer, nbytes, expected))
    stages = KVStages(store)

    def sweep(kv, first_position=0):
        """One sweep's attention over layer 0: the plan is what kv_load prefetches."""
        plan = KVLoadPlan(tuple(KVRead(0, 0, b.index, b.ref) for b in kv.off_device(0, first_position)))
        stages.begin(plan, [kv])
        try:
            return [(k.clone(), first) for k, _, first in kv.blocks(0, first_position)]
        finally:
            stages.after_layer(0)
            asyncio.run(stages.end())

    try:
        kv = store.sequence(0)
        keys, values = torch.randn(160, 2, 8), torch.randn(160, 2, 8)
        kv.append(0, keys, values)                          # between sweeps: 10 full blocks written to disk
        blocks = sweep(kv)
        assert sorted(requests) == sorted([KV_READ_RUN, KV_READ_RUN, 10 - 2 * KV_READ_RUN])   # reader threads race
        assert [first for _, first in blocks] == list(range(0, 160, 16))
        got = torch.cat([k for k, _ in blocks], dim=1)
        assert torch.equal(got, keys.transpose(0, 1))     # 10 blocks <= store.window_blocks: no buffer reused

        requests.clear()
        more_k, more_v = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
        window = 40                                         # the new token (position 160) sees 121..160
        kv.append(0, more_k, more_v)
        firsts = [first for _, first in sweep(kv, 160 - window + 1)]
        assert firsts == [112, 128, 144, 160]               # blocks 0..6 end before position 121: not read
        assert requests[0] == 3                             # one run: blocks 7..9
        # the next sweep's plan (this layer again) also starts where the window begins: 3 more blocks, not 10
        sweep(kv, 161 - window + 1)
    finally:
        store.close()
    assert requests == [3, 3]
    assert stages.loader.statistics().unplanned == 0



@pytest.mark.parametrize("tier", ["host", "disk"])
def test_decode_merges_a_layers_blocks_a_run_at_a_time_never_past_a_read_run(tmp_path, monkeypatch, tier):
    """Prefill chunks commit a few blocks of each layer in turn, yet each layer's blocks lie in
    consecutive slots (every pool hands a layer its slots KV_READ_RUN at a time), so decode's
    attention merges them in runs (``adapters/block_runs.py``): the host pool's slots all at once,
    disk blocks one read run at a time (runs of 4 here) and never across two, since taking a
    later run's block gives the earlier run's buffers back. The result is attention over the
    keys stored."""
    import torch

    import tierflow.adapters.attention as attention
    from tests.adapters.test_attention import _reference
    from tierflow.stages.kv import KVLoadPlan, KVRead, KVStages
    from tierflow.tiers.kv.paged import KVStore

    monkeypatch.setattr("tierflow.stages.kv_plan.KV_READ_RUN", 4)
    runs: list[int] = []
    merge = attention.merge_run
    monkeypatch.setattr(attention, "merge_run", lambda q, k, *rest: runs.append(k.shape[0]) or merge(q, k, *rest))
    store = KVStore(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, device=torch.device("cpu"),
                    block_tokens=16, device_blocks=0, host_blocks=64 if tier == "host" else 0,
                    disk_blocks=64 if tier == "disk" else 0, spill_dir=tmp_path)
    try:
        kv = store.sequence(0)
        stored = [(torch.randn(160, 2, 8), torch.randn(160, 2, 8)) for _ in range(2)]
        for chunk in range(0, 160, 32):                     # 2 blocks of each layer in turn
            for layer, (k, v) in enumerate(stored):
                kv.append(layer, k[chunk:chunk + 32], v[chunk:chunk + 32])
        for layer in range(2):
            slots = [ref.slot for ref in store.tables.table(0, layer)]
            assert {ref.tier for ref in store.tables.table(0, layer)} == {tier}
            assert slots == list(range(slots[0], slots[0] + 10))
        stages = KVStages(store)
        plan = KVLoadPlan(tuple(KVRead(0, layer, b.index, b.ref) for layer in range(2) for b in kv.off_device(layer)))
        stages.begin(plan, [kv])
        q = torch.randn(1, 8, 8)
        try:
            for layer, (k, v) in enumerate(stored):
                got = attention.attend_kv(q, kv.blocks(layer), 160)
                torch.testing.assert_close(got, _reference(q, k.transpose(0, 1), v.transpose(0, 1), 160),
                                           rtol=1e-5, atol=1e-5)
                stages.after_layer(layer)
        finally:
            asyncio.run(stages.end())
    finally:
        store.close()
    assert runs == ([10, 10] if tier == "host" else [4, 4, 2, 4, 4, 2])
