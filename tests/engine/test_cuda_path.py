"""The engine's CUDA path — copy stream, events, pinned host tier, host-resident units —
against transformers, run on the CPU through ``SimulatedCuda``: its copy stream is a thread
that lands every copy late, so a compute that did not wait for its upload's event, or a slot
reused before the device was done with it, reads stale bytes and the logits show it.

The same checks run on a real GPU in the ``gpu``-marked tests at the end (skipped without CUDA).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.errors import ConfigError, TierCapacityError
from tierflow.testing import SimulatedCuda, build_random_checkpoint, oracle_greedy, oracle_logits
from tests.conftest import TINY_MODELS

PROMPT = [5, 17, 99, 3, 250, 7, 8, 9, 300, 41, 2, 77]
SMALL = dict(kv_reserve_tokens=256, prefill_chunk_tokens=64, max_num_seqs=4)
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
GPU_HARDWARE = {"device": "cuda", "device_memory_bytes": 2**30, "host_memory_bytes": 2**30, "disk_read_gbps": 2.0,
                "decode_gbps": 100.0, "prefill_tflops": 10.0, "h2d_gbps": 20.0, "d2h_gbps": 20.0}
# unit placements (profile selectors), for a model of 3 decoder layers
PLACEMENTS = {
    "resident": {"all": "device"},
    "host": {"all": "host"},
    "disk": {"layers.0-2": "disk", "embed": "device", "head": "device"},
    "mixed": {"embed": "host", "layers.0": "host", "layers.1": "disk", "layers.2": "device", "head": "disk"},
}


def _profile(tmp_path: Path, tiers: dict[str, str], **overrides: object) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"version": 1, "hardware": GPU_HARDWARE, "overrides": {"tiers": tiers, **overrides}}))
    return str(path)


def _dtype(name: str) -> str:
    return TINY_MODELS[name].get("dtype", "float32")


async def _run(path: Path, config: EngineConfig, ops: object, new_tokens: int = 16):
    async with await Engine.open(path, config, device_ops=ops) as engine:
        logits = await engine.logits(PROMPT)
        out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        return engine, logits, out, engine.stats(), engine.pipeline_statistics()


def _check(path: Path, dtype: str, logits: torch.Tensor, tokens: tuple[int, ...], new_tokens: int = 16) -> None:
    expected = oracle_logits(path, PROMPT, dtype)
    rel = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert rel <= TOLERANCE[dtype], f"relative logit error {rel:.2e}"
    assert list(tokens) == oracle_greedy(path, PROMPT, new_tokens, dtype)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name", ["gqa-untied-fp32", "mha-tied-fp32", "gqa-tied-bf16"])
def test_matches_transformers(tiny_models, tmp_path, name, placement):
    path, dtype = tiny_models[name], _dtype(name)
    tiers = PLACEMENTS[placement]
    if placement == "mixed" and "tied" in name:     # a tied embedding and head share one tier
        tiers = {**tiers, "head": "host"}
    ops = SimulatedCuda(copy_delay_s=0.002)
    config = EngineConfig(device="cuda", dtype=dtype, profile=_profile(tmp_path, tiers), **SMALL)
    engine, logits, out, stats, pipeline = asyncio.run(_run(path, config, ops))
    _check(path, dtype, logits, out.token_ids)

    placed = engine.plan.tiers
    if placement == "resident":
        assert set(placed) == {"device"} and stats.bytes_streamed == 0 and ops.copies == 0
    elif placement == "host":
        assert set(placed) == {"host"} and stats.bytes_streamed == 0
        assert ops.copies > 0 and pipeline.pinned.used_bytes > 0
    elif placement == "disk":
        assert set(placed[1:-1]) == {"disk"} and stats.bytes_streamed > 0
    else:
        assert {"host", "disk", "device"} <= set(placed)
    # the pinned arena was sized exactly and given back
    if pipeline.pinned is not None:
        assert pipeline.pinned.used_bytes == pipeline.pinned.capacity_bytes
        # the arena and the sweeps' small-upload staging buffer
        assert sorted(ops.pinned) == sorted(ops.unpinned) and len(ops.pinned) == 2
    assert stats.gpu_busy_s is not None and 0.0 <= stats.gpu_idle_fraction <= 1.0


class _NoWait(SimulatedCuda):
    """A device path whose compute does not wait for the uploads: what the events prevent."""

    def wait(self, stream, event) -> None:
        return None


@pytest.mark.hazards_expected
def test_compute_that_skips_the_upload_event_reads_stale_weights(tiny_models, tmp_path):
    """The negative control: the checks above can fail. Without the wait, layers read their
    staging slot before the late copy has landed, and the logits are wrong."""
    path = tiny_models["gqa-untied-fp32"]
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["disk"]), **SMALL)
    engine, logits, *_ = asyncio.run(_run(path, config, _NoWait(copy_delay_s=0.02), new_tokens=1))
    expected = oracle_logits(path, PROMPT, "float32")
    assert not torch.allclose(logits, expected, rtol=1e-3, atol=1e-3)


def _check_overlap(doc: dict, layers: int) -> None:
    """Every compute of a layer follows an upload of it that had finished (the compute stream
    waited for its event), and uploads of later layers run while earlier layers compute."""
    names = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    uploads = [e for e in spans if e["tid"] == names["upload"]]
    computes = [e for e in spans if e["tid"] == names["gpu compute"]]
    order = {f"layer.{i}": i for i in range(layers)}
    assert {e["name"] for e in uploads} == set(order)
    for c in (e for e in computes if e["name"] in order):
        before = [u for u in uploads if u["name"] == c["name"] and u["ts"] + u["dur"] <= c["ts"] + 1.0]
        assert before, f"{c['name']} computed at {c['ts']} before any upload of it had finished"
    overlapped = any(u["ts"] < c["ts"] + c["dur"] and u["ts"] + u["dur"] > c["ts"] and order[u["name"]] > order[c["name"]]
                     for c in computes if c["name"] in order for u in uploads)
    started_early = any(u["ts"] < c["ts"] and order[u["name"]] > order[c["name"]]
                        for c in computes if c["name"] in order for u in uploads)
    assert overlapped or started_early


def test_trace_shows_uploads_before_their_compute_and_overlapping_the_previous(tiny_models, tmp_path):
    path = tiny_models["sharded-fp32"]       # 4 decoder layers
    trace = tmp_path / "trace.json"
    tiers = {"layers.0-3": "host", "embed": "device", "head": "device"}
    ops = SimulatedCuda(copy_delay_s=0.01)
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, tiers, prefetch_depth=2),
                          trace_path=str(trace), **SMALL)
    engine, logits, out, stats, pipeline = asyncio.run(_run(path, config, ops, new_tokens=4))
    _check(path, "float32", logits, out.token_ids, new_tokens=4)

    _check_overlap(json.loads(trace.read_text()), 4)
    # the copies are slow here (9 tensors x 10 ms per layer), so the device mostly waited
    assert stats.gpu_idle_fraction > 0.5
    assert stats.upload_s >= 0.01 * 9 * 4


def test_slots_come_back_through_the_event_bridge_when_the_device_lags(tiny_models, tmp_path):
    """The device finishes each unit's kernels after the host has enqueued them: the slots are
    released by the bridge's waiter once the compute events complete, and nothing is lost."""
    path = tiny_models["gqa-untied-fp32"]
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["disk"]), **SMALL)
    ops = SimulatedCuda(copy_delay_s=0.001, compute_lag_s=0.005)
    engine, logits, out, stats, pipeline = asyncio.run(_run(path, config, ops))
    _check(path, "float32", logits, out.token_ids)
    assert pipeline.events.waited > 0 and pipeline.events.pending == 0


def test_idle_fraction_is_low_when_nothing_streams(tiny_models, tmp_path):
    path = tiny_models["gqa-untied-fp32"]
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["host"]), **SMALL)
    slow = asyncio.run(_run(path, config, SimulatedCuda(copy_delay_s=0.01), new_tokens=2))[3]
    resident = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["resident"]), **SMALL)
    fast = asyncio.run(_run(path, resident, SimulatedCuda(), new_tokens=2))[3]
    assert slow.gpu_idle_fraction > fast.gpu_idle_fraction


def test_concurrent_requests_on_the_device_path(tiny_models, tmp_path):
    path = tiny_models["gqa-untied-fp32"]
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["mixed"]), **SMALL)
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:], [9, 8, 7]]

    async def main():
        async with await Engine.open(path, config, device_ops=SimulatedCuda(copy_delay_s=0.002)) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
                                          for p in prompts))
            return [list(o.token_ids) for o in outs], engine.pipeline_statistics()

    tokens, pipeline = asyncio.run(main())
    assert tokens == [oracle_greedy(path, p, 6, "float32") for p in prompts]
    assert pipeline.ring.acquired_total > 0 and pipeline.events is not None


def test_paged_kv_over_device_host_and_disk_on_the_device_path(tiny_models, tmp_path):
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(1000)]
    per_token = 2 * 3 * 2 * 16 * 4      # K and V, 3 layers, 2 KV heads, head_dim 16, fp32
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["mixed"]), kv_reserve_tokens=1024,
                          prefill_chunk_tokens=256, kv_cache_dir=str(tmp_path / "kv"),
                          kv_device_bytes=per_token * 256, kv_host_bytes=per_token * 256)

    ops = SimulatedCuda(copy_delay_s=0.001)

    async def main():
        async with await Engine.open(path, config, device_ops=ops) as engine:
            logits = await engine.logits(prompt)
            out = await engine.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
            return logits, list(out.token_ids), engine.pipeline_statistics().kv_blocks

    logits, tokens, kv = asyncio.run(main())
    assert kv.disk.capacity > 0 and kv.host.capacity > 0 and kv.device.capacity > 0
    # the weight arena, the KV host pool, the KV read window and the small-upload staging buffer were
    # pinned, and unpinned at close
    assert len(ops.pinned) == 4 and sorted(ops.pinned) == sorted(ops.unpinned)
    expected = oracle_logits(path, prompt, "float32")
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert tokens == oracle_greedy(path, prompt, 8, "float32")


@pytest.mark.parametrize("ops_type", [SimulatedCuda, _NoWait])
def test_kv_blocks_from_host_and_disk_reach_attention_through_the_copy_stream(tiny_models, tmp_path, ops_type):
    """Weights resident, so every copy is a KV block's: from the host pool or the disk window to
    a device staging buffer, and new blocks off the device. Copies land late; the compute waits
    for their events. The negative control skips the waits, and attention reads stale bytes."""
    path = tiny_models["gqa-untied-fp32"]
    prompt = [(i * 37) % 500 + 1 for i in range(700)]
    per_token = 2 * 3 * 2 * 16 * 4      # K and V, 3 layers, 2 KV heads, head_dim 16, fp32
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["resident"]), kv_reserve_tokens=1024,
                          prefill_chunk_tokens=256, kv_cache_dir=str(tmp_path / "kv"), kv_device_bytes=0,
                          kv_host_bytes=per_token * 256)
    ops = ops_type(copy_delay_s=0.01)

    async def main():
        async with await Engine.open(path, config, device_ops=ops) as engine:
            return await engine.logits(prompt), engine.pipeline_statistics().kv_blocks

    logits, kv = asyncio.run(main())
    assert kv.disk.capacity > 0 and kv.host.capacity > 0 and kv.device.capacity == 0
    assert ops.copies > 0
    expected = oracle_logits(path, prompt, "float32")
    close = ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert close == (ops_type is SimulatedCuda)


@pytest.mark.parametrize("tree_width", [1, 3])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_decoding_on_the_device_path(tiny_models, tmp_path, monkeypatch, method, tree_width):
    """Proposals verified on the device path, copies landing late: chains and candidate trees
    (their mask on the device, the accepted path's KV gathered and appended again), rolled back
    over KV blocks of 8 tokens on the device, in host memory and on disk; greedy tokens are
    transformers'."""
    from tierflow import SpeculativeConfig
    from tierflow.testing import layer_copy
    from tierflow.tiers.plan import planner, search
    monkeypatch.setattr(search, "KV_BLOCK_TOKENS", 8)
    monkeypatch.setattr(planner, "KV_BLOCK_TOKENS", 8)
    path = tiny_models["gqa-untied-fp32"]
    prompt = [5, 9, 17, 33, 2, 8] * 30 + [40, 41]            # repetitive: prompt lookup proposes
    per_token = 2 * 3 * 2 * 16 * 4      # K and V, 3 layers, 2 KV heads, head_dim 16, fp32
    draft = layer_copy(path, tmp_path / "draft", extra_layers=1, scale=0.3) if method == "draft" else None
    spec = SpeculativeConfig(method=method, model=draft, num_speculative_tokens=4, tree_width=tree_width,
                             prompt_lookup_max=3)
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["mixed"]), kv_reserve_tokens=1024,
                          prefill_chunk_tokens=64, kv_cache_dir=str(tmp_path / "kv"), speculative=spec,
                          kv_device_bytes=per_token * 64, kv_host_bytes=per_token * 64)
    ops = SimulatedCuda(copy_delay_s=0.001)

    async def main():
        async with await Engine.open(path, config, device_ops=ops) as engine:
            out = await engine.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))
            for _ in range(200):        # the driver frees a finished request's KV between sweeps
                if engine.pipeline_statistics().requests == 0:
                    break
                await asyncio.sleep(0.01)
            return list(out.token_ids), engine.stats().speculative, engine.pipeline_statistics().kv_blocks

    tokens, stats, kv = asyncio.run(main())
    assert kv.disk.capacity > 0 and kv.host.capacity > 0 and kv.device.capacity > 0
    assert stats.steps > 0 and stats.proposed_tokens > stats.accepted_tokens > 0
    if tree_width > 1 and method == "draft":      # an alternative stood: its KV was gathered and moved
        assert stats.alternatives_accepted > 0
    assert tokens == oracle_greedy(path, prompt, 24, "float32")
    assert all(pool.used == 0 for pool in kv.by_tier().values())


def test_mixture_of_experts_on_the_device_path(tmp_path):
    path = build_random_checkpoint(tmp_path / "mixtral", "mixtral", seed=3)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    tiers = {f"layers.0-{layers - 1}": "disk", "embed": "host", "head": "device"}
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, tiers), expert_cache_bytes=0, **SMALL)
    engine, logits, out, stats, _ = asyncio.run(_run(path, config, SimulatedCuda(copy_delay_s=0.001), new_tokens=8))
    _check(path, "float32", logits, out.token_ids, new_tokens=8)
    assert stats.expert_bytes_read > 0


class _OutOfMemory(SimulatedCuda):
    def empty(self, nbytes: int) -> torch.Tensor:
        raise torch.OutOfMemoryError("simulated: no device memory for a staging slot")


def test_a_failed_start_gives_the_pinned_memory_back(tiny_models, tmp_path):
    path = tiny_models["gqa-untied-fp32"]
    ops = _OutOfMemory()
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["mixed"]), **SMALL)
    with pytest.raises(TierCapacityError, match="ran out of memory.*lower device_memory_bytes"):
        asyncio.run(Engine.open(path, config, device_ops=ops))
    assert len(ops.pinned) == 1 and ops.pinned == ops.unpinned


def test_cuda_without_a_gpu_is_a_clear_error(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        asyncio.run(Engine.open(tiny_model, EngineConfig(device="cuda")))


def test_a_cpu_profile_is_refused_on_the_device_path(tiny_model, tmp_path):
    profile = tmp_path / "cpu.json"
    profile.write_text(json.dumps({"version": 1, "hardware": {**GPU_HARDWARE, "device": "cpu"}}))
    with pytest.raises(ConfigError, match="'cpu' machine"):
        asyncio.run(Engine.open(tiny_model, EngineConfig(device="cuda", profile=str(profile)),
                                device_ops=SimulatedCuda()))


# ----------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name", ["gqa-untied-fp32", "mha-tied-fp32", "gqa-tied-bf16"])
def test_matches_transformers_on_cuda(tiny_models, tmp_path, name, placement):
    path, dtype = tiny_models[name], _dtype(name)
    tiers = PLACEMENTS[placement]
    if placement == "mixed" and "tied" in name:
        tiers = {**tiers, "head": "host"}
    hardware = {**GPU_HARDWARE, "device_memory_bytes": torch.cuda.mem_get_info()[0]}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"version": 1, "hardware": hardware, "overrides": {"tiers": tiers}}))
    config = EngineConfig(device="cuda", dtype=dtype, profile=str(profile), **SMALL)
    engine, logits, out, stats, _ = asyncio.run(_run(path, config, None))
    # on a GPU the kernels differ from the CPU oracle's: bf16 tolerance for both dtypes
    expected = oracle_logits(path, PROMPT, dtype)
    rel = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert rel <= (1e-3 if dtype == "float32" else 3e-2), f"relative logit error {rel:.2e}"
    assert list(out.token_ids) == oracle_greedy(path, PROMPT, 16, dtype)
    assert stats.gpu_busy_s > 0


@pytest.mark.gpu
@gpu
def test_trace_and_idle_fraction_on_cuda(tiny_models, tmp_path):
    path = tiny_models["sharded-fp32"]
    trace = tmp_path / "trace.json"
    hardware = {**GPU_HARDWARE, "device_memory_bytes": torch.cuda.mem_get_info()[0]}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"version": 1, "hardware": hardware, "overrides": {
        "tiers": {"layers.0-3": "disk", "embed": "device", "head": "device"}, "prefetch_depth": 2}}))
    config = EngineConfig(device="cuda", profile=str(profile), trace_path=str(trace), **SMALL)
    engine, logits, out, stats, _ = asyncio.run(_run(path, config, None, new_tokens=8))
    _check_overlap(json.loads(trace.read_text()), 4)
    assert stats.gpu_busy_s > 0 and 0.0 <= stats.gpu_idle_fraction < 1.0


# ----------------------------------------------------------------------------- kvikio
def test_kvikio_reads_land_in_the_device_slots(tiny_models, tmp_path, monkeypatch):
    """``"reader": "kvikio"`` in the profile: streamed units are read straight into the staging
    slots in device memory (a stand-in kvikio module here), with no pinned read buffers."""
    from tests.tiers.io.test_kvikio import FakeKvikio

    fake = FakeKvikio()
    monkeypatch.setitem(sys.modules, "kvikio", fake.module)
    path = tiny_models["gqa-untied-fp32"]
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["disk"], reader="kvikio"), **SMALL)
    ops = SimulatedCuda(copy_delay_s=0.002)
    engine, logits, out, stats, pipeline = asyncio.run(_run(path, config, ops))
    _check(path, "float32", logits, out.token_ids)
    assert fake.preads and stats.io_mode.endswith("+kvikio-compat")
    assert ops.copies == 0                   # nothing went through the copy stream
    assert pipeline.pinned.capacity_bytes == 0
    assert stats.bytes_read_from_disk >= stats.bytes_streamed > 0


def test_kvikio_asked_for_but_absent_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)
    config = EngineConfig(device="cuda", profile=_profile(tmp_path, PLACEMENTS["disk"], reader="kvikio"), **SMALL)
    with pytest.raises(ConfigError, match="kvikio"):
        asyncio.run(Engine.open(tiny_model, config, device_ops=SimulatedCuda()))
