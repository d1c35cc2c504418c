"""Hazards of the CUDA path that only a GPU shows, caught on the CPU by the strict
``SimulatedCuda``: blocks freed or rewritten while a stream still uses them, work on the legacy
default stream, host synchronisations inside a sweep, pinning, the device index, device memory.

Each test runs the engine on the simulated device with a compute lag (the device finishes a
unit's kernels after the host has moved on, as a GPU does), compares with transformers, and
asks the simulation for hazards (``ops.check()``; tests/conftest.py also checks every
simulation a test makes).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.testing import SimulatedCuda, build_random_checkpoint, oracle_greedy, oracle_logits
from tierflow.tiers.checkpoint.index import CheckpointIndex

PROMPT = [5, 17, 99, 3, 250, 7, 8, 9, 300, 41, 2, 77]
GPU_HARDWARE = {"device": "cuda", "device_memory_bytes": 2**30, "host_memory_bytes": 2**30, "disk_read_gbps": 2.0,
                "decode_gbps": 100.0, "prefill_tflops": 10.0, "h2d_gbps": 20.0, "d2h_gbps": 20.0}
SMALL = dict(kv_reserve_tokens=256, prefill_chunk_tokens=64, max_num_seqs=4)


def _profile(tmp_path: Path, tiers: dict[str, str], **overrides: object) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"version": 1, "hardware": GPU_HARDWARE, "overrides": {"tiers": tiers, **overrides}}))
    return str(path)


async def _generate(path: Path, config: EngineConfig, ops: SimulatedCuda, new_tokens: int = 8):
    async with await Engine.open(path, config, device_ops=ops) as engine:
        logits = await engine.logits(PROMPT)
        out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        return logits, out, engine.stats()


def _check_oracle(path: Path, logits: torch.Tensor, tokens: tuple[int, ...], new_tokens: int) -> None:
    expected = oracle_logits(path, PROMPT)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert list(tokens) == oracle_greedy(path, PROMPT, new_tokens)


def _moe_layout(mixtral: Path) -> tuple[int, int, dict[str, str]]:
    """The largest expert's bytes, the MoE layers, and tiers that stream every layer from disk."""
    index = CheckpointIndex.open(mixtral)
    layers = len({layer for layer, _ in index.experts})
    expert = max(layout.buffer_bytes for layout in index.experts.values())
    return expert, layers, {f"layers.0-{layers - 1}": "disk", "embed": "device", "head": "device"}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("mixtral") / "mixtral", "mixtral", seed=3)


def test_expert_weights_outlive_the_kernels_that_read_them(mixtral, tmp_path):
    """An expert cache smaller than a sweep's experts, with read-ahead: layer l's experts are
    evicted as soon as its kernels are queued, and layer l+1's read-ahead allocates their
    blocks. The caching allocator would hand it the very blocks the queued kernels still read
    unless the compute stream's use of them is recorded."""
    expert, layers, tiers = _moe_layout(mixtral)
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, tiers), expert_cache_bytes=layers * 2 * expert,
                          **SMALL)
    ops = SimulatedCuda(copy_delay_s=0.001, compute_lag_s=0.02)
    logits, out, stats = asyncio.run(_generate(mixtral, config, ops))
    assert stats.expert_requests > stats.expert_hits > 0, "the cache this test is about did not run"
    ops.check()
    _check_oracle(mixtral, logits, out.token_ids, 8)


MIXED = {"embed": "host", "layers.0": "host", "layers.1": "disk", "layers.2": "device", "head": "disk"}
PER_TOKEN = 2 * 3 * 2 * 16 * 4      # K and V, 3 layers, 2 KV heads, head_dim 16, fp32


def _paged(tmp_path: Path, **more: object) -> EngineConfig:
    """Weights on every tier and a paged KV over device, host and disk."""
    settings = dict(kv_reserve_tokens=1024, prefill_chunk_tokens=256, kv_cache_dir=str(tmp_path / "kv"),
                    kv_device_bytes=PER_TOKEN * 256, kv_host_bytes=PER_TOKEN * 256)
    return EngineConfig(device="cuda", profile=_profile(tmp_path, MIXED), **{**settings, **more})


def test_a_decode_sweep_synchronises_the_host_once(tiny_models, tmp_path):
    """The only host synchronisation of a decode sweep on the compute thread is the copy of its
    logits to the host: batch tensors go up through pinned memory, KV blocks move on the copy
    stream, nothing inside attention waits for the device."""
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(700)]      # KV on the device, the host and the disk
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.002)

    async def main():
        async with await Engine.open(path, _paged(tmp_path), device_ops=ops) as engine:
            counts = {}
            # the first sweep fills the rope tables' device cache: one blocking copy, once
            await engine.generate(prompt[:20], SamplingParams(max_new_tokens=1))
            for new_tokens in (2, 10):
                with ops.count_syncs() as syncs:
                    out = await engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                counts[new_tokens] = [what for thread, what in syncs if thread.startswith("tierflow-compute")]
            return counts, list(out.token_ids), engine.pipeline_statistics().kv_blocks

    counts, tokens, kv = asyncio.run(main())
    assert kv.disk.capacity > 0 and kv.host.capacity > 0
    assert len(counts[10]) - len(counts[2]) == 8, counts          # eight more decode sweeps, a sync each
    assert all("to('cpu')" in what for what in counts[10]), counts[10]     # the logits, and nothing else
    assert tokens == oracle_greedy(path, prompt, 10)


def test_the_prefix_cache_on_the_device_path(tiny_models, tmp_path):
    """Attaching a cached prefix writes the sequence's device KV, and remembering reads it: both
    on the compute stream, ordered with the sweeps' kernels."""
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(300)]
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.005)

    async def main():
        async with await Engine.open(path, _paged(tmp_path, prefix_cache_bytes=2**22), device_ops=ops) as engine:
            first = await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
            second = await engine.generate(prompt + [7, 8], SamplingParams(max_new_tokens=4, ignore_eos=True))
            return first, second, engine.stats()

    first, second, stats = asyncio.run(main())
    assert stats.prompt_tokens_cached > 0
    ops.check()
    assert list(first.token_ids) == oracle_greedy(path, prompt, 4)
    assert list(second.token_ids) == oracle_greedy(path, prompt + [7, 8], 4)


def test_every_thread_that_touches_cuda_1_binds_it(tiny_models, tmp_path):
    """On ``cuda:1`` every thread that makes a CUDA call (the compute worker, the event waiters,
    the KV readers and writer, the loop) first makes that device its own: an unbound thread's
    first call would create a context on GPU 0."""
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(700)]
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.002, index=1)

    async def main():
        async with await Engine.open(path, _paged(tmp_path), device_ops=ops) as engine:
            return await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))

    out = asyncio.run(main())
    assert ops.unbound == set(), f"threads that touched cuda:1 unbound: {sorted(ops.unbound)}"
    assert list(out.token_ids) == oracle_greedy(path, prompt, 4)


def test_several_sequences_share_sweeps_on_the_device_path(tiny_models, tmp_path):
    """Prefill chunks that start mid-sequence ride in the same sweeps as other sequences' decode
    tokens, over KV on every tier, with the device lagging the host."""
    path = tiny_models["gqa-untied-fp32"]
    prompts = [[(i * 37 + k) % 500 + 1 for i in range(n)] for k, n in enumerate((600, 40, 300, 5))]
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.002)

    async def main():
        async with await Engine.open(path, _paged(tmp_path, prefill_chunk_tokens=128), device_ops=ops) as engine:
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            return await asyncio.gather(*(engine.generate(p, params) for p in prompts))

    outs = asyncio.run(main())
    ops.check()
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == oracle_greedy(path, prompt, 6)


def test_cancelled_and_failed_requests_leave_the_device_path_sound(tiny_models, tmp_path, monkeypatch):
    """A request cancelled while its uploads and KV copies are in flight, and a sweep that fails
    half-way (its remaining slots handed back after their uploads), leave nothing racing: the
    next request is exact and every KV block is free again."""
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(700)]
    ops = SimulatedCuda(copy_delay_s=0.002, compute_lag_s=0.003)

    async def main():
        async with await Engine.open(path, _paged(tmp_path), device_ops=ops) as engine:
            params = SamplingParams(max_new_tokens=50, ignore_eos=True)
            task = asyncio.create_task(engine.generate(prompt, params))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            adapter = engine.index.adapter
            forward = adapter.forward_unit
            failed = []

            def fail_once(spec, unit, weights, hidden, *args, **kwargs):
                if unit == 2 and hidden.shape[0] == 100 and not failed:     # the 100-token request's sweep
                    failed.append(unit)
                    raise RuntimeError("an injected fault in layer 1")
                return forward(spec, unit, weights, hidden, *args, **kwargs)

            monkeypatch.setattr(adapter, "forward_unit", fail_once)
            with pytest.raises(Exception, match="injected fault"):
                await engine.generate(prompt[:100], SamplingParams(max_new_tokens=4, ignore_eos=True))
            out = await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
            return out, failed, engine.pipeline_statistics().kv_blocks

    out, failed, kv = asyncio.run(main())
    assert failed == [2]
    ops.check()
    assert list(out.token_ids) == oracle_greedy(path, prompt, 4)
    assert kv.device.used == kv.host.used == kv.disk.used == 0


def test_a_moe_decode_sweep_waits_once_per_moe_layer(mixtral, tmp_path):
    """Beyond the logits, a mixture-of-experts decode sweep waits for the device once per MoE
    layer: the router's picks must reach the host to say which experts to read."""
    _, layers, tiers = _moe_layout(mixtral)
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, tiers), **SMALL)
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.002)

    async def main():
        async with await Engine.open(mixtral, config, device_ops=ops) as engine:
            await engine.generate(PROMPT, SamplingParams(max_new_tokens=1))
            counts = {}
            for new_tokens in (2, 6):
                with ops.count_syncs() as syncs:
                    await engine.generate(PROMPT, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                counts[new_tokens] = [what for thread, what in syncs if thread.startswith("tierflow-compute")]
            return counts

    counts = asyncio.run(main())
    assert len(counts[6]) - len(counts[2]) == 4 * (1 + layers), counts
    assert {what.split(" ")[0] for what in counts[6]} == {"Tensor.tolist()", "Tensor.to('cpu')"}, counts[6]


# ----------------------------------------------------------------------------- on a GPU
# The same paths on a real device (skipped without CUDA): exact against transformers within the
# GPU's kernels' tolerance, and with PyTorch's own sync detector counting what waits.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_profile(tmp_path: Path, tiers: dict[str, str]) -> str:
    hardware = {**GPU_HARDWARE, "device_memory_bytes": torch.cuda.mem_get_info()[0]}
    path = tmp_path / "gpu-profile.json"
    path.write_text(json.dumps({"version": 1, "hardware": hardware, "overrides": {"tiers": tiers}}))
    return str(path)


async def _gpu_generate(path: Path, config: EngineConfig, prompts: list[list[int]], new_tokens: int):
    async with await Engine.open(path, config) as engine:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        return await asyncio.gather(*(engine.generate(p, params) for p in prompts))


@pytest.mark.gpu
@gpu
def test_experts_with_a_cache_and_read_ahead_on_cuda(mixtral, tmp_path):
    expert, layers, tiers = _moe_layout(mixtral)
    config = EngineConfig(device="cuda", profile=_gpu_profile(tmp_path, tiers), expert_cache_bytes=layers * 2 * expert,
                          **SMALL)
    [out] = asyncio.run(_gpu_generate(mixtral, config, [PROMPT], 8))
    assert list(out.token_ids) == oracle_greedy(mixtral, PROMPT, 8)


@pytest.mark.gpu
@gpu
def test_paged_kv_prefix_cache_and_several_sequences_on_cuda(tiny_models, tmp_path):
    path = tiny_models["gqa-untied-fp32"]
    prompts = [[(i * 37 + k) % 500 + 1 for i in range(n)] for k, n in enumerate((700, 40, 300))]
    settings = dict(kv_reserve_tokens=1024, prefill_chunk_tokens=128, kv_cache_dir=str(tmp_path / "kv"),
                    kv_device_bytes=PER_TOKEN * 256, kv_host_bytes=PER_TOKEN * 256, prefix_cache_bytes=2**22)
    config = EngineConfig(device="cuda", profile=_gpu_profile(tmp_path, MIXED), **settings)
    outs = asyncio.run(_gpu_generate(path, config, prompts + [prompts[0] + [7]], 6))
    for prompt, out in zip(prompts + [prompts[0] + [7]], outs):
        assert list(out.token_ids) == oracle_greedy(path, prompt, 6)


@pytest.mark.gpu
@gpu
def test_a_decode_sweep_does_not_wait_for_the_device_on_cuda(tiny_models, tmp_path):
    """PyTorch's sync debug mode warns on every call that waits for the device: a decode sweep
    makes one (its logits)."""
    import warnings

    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(700)]
    config = EngineConfig(device="cuda", profile=_gpu_profile(tmp_path, MIXED), kv_reserve_tokens=1024,
                          prefill_chunk_tokens=256, kv_cache_dir=str(tmp_path / "kv"),
                          kv_device_bytes=PER_TOKEN * 256, kv_host_bytes=PER_TOKEN * 256)

    async def main():
        async with await Engine.open(path, config) as engine:
            await engine.generate(prompt[:20], SamplingParams(max_new_tokens=1))
            counts = {}
            for new_tokens in (2, 10):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        await engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                counts[new_tokens] = len(caught)
            return counts

    counts = asyncio.run(main())
    assert counts[10] - counts[2] <= 8, counts


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_an_engine_on_the_second_gpu_leaves_the_first_alone(tiny_models, tmp_path):
    path = tiny_models["gqa-untied-fp32"]
    before = torch.cuda.memory_reserved(0)
    config = EngineConfig(device="cuda:1", profile=_gpu_profile(tmp_path, MIXED), **SMALL)
    [out] = asyncio.run(_gpu_generate(path, config, [PROMPT], 4))
    assert list(out.token_ids) == oracle_greedy(path, PROMPT, 4)
    assert torch.cuda.memory_reserved(0) == before


# ----------------------------------------------------------------------------- device memory
PLACEMENTS = {
    "resident": {"all": "device"},
    "host": {"all": "host"},
    "disk": {"layers.0-2": "disk", "embed": "device", "head": "device"},
    "mixed": MIXED,
}


@pytest.mark.parametrize("kv", ["contiguous", "paged"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_peak_device_memory_stays_within_the_plan(tiny_models, tmp_path, placement, kv):
    """The simulation accounts every device allocation (weights, staging slots, KV, the
    activations and attention workspace of a prefill chunk, the KV's growth); its peak stays
    within what the plan counted for them. (The runtime's fixed overheads, which the plan adds
    on top — cuBLAS workspaces, the allocator's rounding — do not exist in the simulation.)"""
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(500)]
    more = dict(kv_cache_dir=str(tmp_path / "kv"), kv_device_bytes=PER_TOKEN * 256, kv_host_bytes=PER_TOKEN * 256) \
        if kv == "paged" else {}
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS[placement]), kv_reserve_tokens=1024,
                          prefill_chunk_tokens=256, max_num_seqs=2, **more)
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.001)

    async def main():
        async with await Engine.open(path, config, device_ops=ops) as engine:
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            await asyncio.gather(engine.generate(prompt, params), engine.generate(prompt[:300], params))
            return engine.plan.memory["device"]

    memory = asyncio.run(main())
    counted = memory.total - memory.overhead
    assert 0 < ops.max_memory_reserved() <= counted, (ops.max_memory_reserved(), memory)
    assert memory.total <= memory.budget


def test_peak_device_memory_with_an_expert_cache_stays_within_the_plan(mixtral, tmp_path):
    _, layers, tiers = _moe_layout(mixtral)
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, tiers), **SMALL)
    ops = SimulatedCuda(copy_delay_s=0.0005, compute_lag_s=0.001)

    async def main():
        async with await Engine.open(mixtral, config, device_ops=ops) as engine:
            await engine.generate(PROMPT * 10, SamplingParams(max_new_tokens=6, ignore_eos=True))
            return engine.plan, engine.stats()

    plan, stats = asyncio.run(main())
    memory = plan.memory["device"]
    assert plan.expert_cache_bytes > 0 and stats.expert_hits > 0
    assert 0 < ops.max_memory_reserved() <= memory.total - memory.overhead, (ops.max_memory_reserved(), memory)
