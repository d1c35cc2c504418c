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


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("mixtral") / "mixtral", "mixtral", seed=3)


def test_expert_weights_outlive_the_kernels_that_read_them(mixtral, tmp_path):
    """An expert cache smaller than a sweep's experts, with read-ahead: layer l's experts are
    evicted as soon as its kernels are queued, and layer l+1's read-ahead allocates their
    blocks. The caching allocator would hand it the very blocks the queued kernels still read
    unless the compute stream's use of them is recorded."""
    index = CheckpointIndex.open(mixtral)
    expert = max(layout.buffer_bytes for layout in index.experts.values())
    layers = len({layer for layer, _ in index.experts})
    tiers = {f"layers.0-{layers - 1}": "disk", "embed": "device", "head": "device"}
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, tiers), expert_cache_bytes=layers * 2 * expert,
                          **SMALL)
    ops = SimulatedCuda(copy_delay_s=0.001, compute_lag_s=0.02)
    logits, out, stats = asyncio.run(_generate(mixtral, config, ops))
    assert stats.expert_requests > stats.expert_hits > 0, "the cache this test is about did not run"
    ops.check()
    _check_oracle(mixtral, logits, out.token_ids, 8)
