"""gpt-oss against transformers on tiny random checkpoints built with its own classes: attention
sinks (random, some large), biases everywhere, YaRN rope at positions past its original length,
layers alternating a sliding window narrower than the prompt and full attention, experts top-2
of 8 and top-4 of 16, saved in fp32, in bf16 and packed in MXFP4 (transformers reads those with
``Mxfp4Config(dequantize=True)``) — fully resident, every layer streamed from disk with no
expert cache, KV paged to disk, and 8 concurrent requests of different lengths. Then what the
MXFP4 experts cost: a routed expert's read is its packed bytes, the expert cache holds them
packed, and the checkpoint errors a wrong file gets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.adapters.mxfp4 import dequantize, packed_bytes, quantize
from tierflow.errors import CheckpointError, ShapeMismatchError, UnsupportedModelError
from tierflow.testing import (build_random_checkpoint, check_greedy_tokens, check_logit_rows, oracle_greedy,
                              oracle_logits, pack_mxfp4_experts)
from tierflow.tiers.checkpoint.index import CheckpointIndex

YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 16}
SHAPE = dict(hidden_size=64, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
             sliding_window=8, rope_parameters=YARN)
# name -> (builder kwargs, packed in MXFP4)
CHECKPOINTS = {
    "top2of8-fp32": (dict(num_local_experts=8, num_experts_per_tok=2), False),
    "top4of16-mxfp4": (dict(num_local_experts=16, num_experts_per_tok=4), True),
    "top2of8-bf16": (dict(num_local_experts=8, num_experts_per_tok=2, dtype="bfloat16"), False),
    "top4of16-mxfp4-bf16": (dict(num_local_experts=16, num_experts_per_tok=4, dtype="bfloat16"), True),
}
PROMPT = [(i * 37) % 500 + 1 for i in range(40)]       # 40 tokens: past the window (8) and YaRN's original (16)
NEW_TOKENS = 32
# fp32 agrees to rounding. A bf16 run's logits are compared with transformers' fp32 run of the same
# bf16 weights, within 3e-2 as for the other bf16 families (tests/test_correctness.py): gpt-oss's
# eager attention takes its softmax, sinks included, in bf16, and on these checkpoints its own bf16
# logits are up to 24% off its fp32 ones on some prompt rows, where tierflow (fp32 accumulation in
# attention) stays within about 1%. In bf16 a router's near-tie can also pick another expert for a
# token than fp32 does (both transformers' bf16 run and tierflow's show such rows, 15-20% off), so
# bf16 holds 90% of the rows to 3e-2 rather than all; greedy tokens must equal transformers' bf16
# run exactly. MXFP4 weights are the same numbers on both sides (dequantized bit for bit alike).
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}


def _dtype(name: str) -> str:
    return CHECKPOINTS[name][0].get("dtype", "float32")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt_oss")
    paths = {}
    for seed, (name, (kwargs, mxfp4)) in enumerate(CHECKPOINTS.items()):
        path = build_random_checkpoint(root / f"{name}-float", "gpt_oss", seed=seed, vocab_size=512,
                                       **SHAPE, **kwargs)
        paths[name] = pack_mxfp4_experts(path, root / name) if mxfp4 else path
    return paths


@pytest.fixture(scope="module")
def oracle(checkpoints):
    cache: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def get(name: str, prompt: list[int] = PROMPT) -> tuple[torch.Tensor, list[int]]:
        key = f"{name}:{len(prompt)}"
        if key not in cache:
            path, dtype = checkpoints[name], _dtype(name)
            cache[key] = oracle_logits(path, prompt, "float32"), oracle_greedy(path, prompt, NEW_TOKENS, dtype)
        return cache[key]

    return get


def _config(name: str, placement: str, path: Path, spill: Path) -> EngineConfig:
    base = EngineConfig(device="cpu", dtype=_dtype(name), kv_reserve_tokens=256, prefill_chunk_tokens=64,
                        max_num_seqs=8, profile=HARDWARE)
    if placement == "resident":
        return base
    if placement == "streamed":     # every decoder layer read from disk each sweep, no expert kept between layers
        layers = CheckpointIndex.open(path).spec.num_layers
        return dataclasses.replace(base, expert_cache_bytes=0,
                                   profile={**HARDWARE, "overrides": {"tiers": {f"layers.0-{layers - 1}": "disk"}}})
    assert placement == "kv-on-disk"
    return dataclasses.replace(base, kv_cache_dir=spill, kv_device_bytes=0, kv_host_bytes=0)


async def _run(path: Path, config: EngineConfig):
    async with await Engine.open(path, config) as engine:
        logits = await engine.logits(PROMPT)
        out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        return logits, list(out.token_ids), engine.pipeline_statistics(), engine.index


def _check_tokens(path: Path, tokens: list[int], expected: list[int], exact: bool) -> None:
    """fp32: transformers' greedy tokens exactly; bf16: the same, or parted at a tie at bf16's
    precision, not before a quarter of the tokens (``check_greedy_tokens``)."""
    check_greedy_tokens(path, PROMPT, tokens, expected, exact=exact, tolerance=TOLERANCE["bfloat16"],
                        min_shared=NEW_TOKENS // 4)


def _check_logits(name: str, logits: torch.Tensor, expected: torch.Tensor) -> None:
    rows = ((logits - expected).abs().amax(dim=-1) / expected.abs().amax(dim=-1))
    if _dtype(name) == "float32":
        assert rows.max() <= TOLERANCE["float32"], f"relative logit error {rows.max():.2e}"
    else:
        check_logit_rows(logits, expected, tolerance=TOLERANCE["bfloat16"], share=0.9)


@pytest.mark.parametrize("placement", ["resident", "streamed", "kv-on-disk"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_matches_transformers(checkpoints, oracle, tmp_path, name, placement):
    path = checkpoints[name]
    logits, tokens, stats, index = asyncio.run(_run(path, _config(name, placement, path, tmp_path)))
    expected_logits, expected_tokens = oracle(name)
    _check_logits(name, logits, expected_logits)
    _check_tokens(checkpoints[name], tokens, expected_tokens, exact=_dtype(name) == "float32")
    assert len(set(tokens)) > 1
    if placement == "streamed":       # a routed expert's read is its own slice: packed bytes for MXFP4
        # (slices of a stacked tensor start anywhere in a 4 KiB page: their aligned reads differ in size)
        payload = {layout.payload_bytes for layout in index.experts.values()}
        largest = max(layout.buffer_bytes for layout in index.experts.values())
        assert len(payload) == 1
        assert stats.experts.misses * payload.pop() <= stats.experts.bytes_read <= stats.experts.misses * largest
        assert stats.experts.capacity_bytes == 0 and stats.experts.misses > 0
    if placement == "kv-on-disk":
        assert stats.kv_blocks.by_tier()["disk"].capacity > 0
        assert list(tmp_path.iterdir()) == []                # the spill file is gone after close


@pytest.mark.parametrize("name", ["top2of8-fp32", "top4of16-mxfp4"])
def test_concurrent_requests_of_different_lengths(checkpoints, oracle, name):
    """8 requests at once, prompts of 9 to 40 tokens (some within the window, some past YaRN's
    original length): each gets transformers' greedy tokens for its own prompt."""
    prompts = [PROMPT[:length] for length in (40, 9, 23, 31, 12, 17, 36, 27)]

    async def main():
        async with await Engine.open(checkpoints[name], _config(name, "resident", checkpoints[name], Path())) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
                                          for p in prompts))
            return [list(o.token_ids) for o in outs], engine.stats()

    results, stats = asyncio.run(main())
    for prompt, tokens in zip(prompts, results):
        assert tokens == oracle(name, prompt)[1], len(prompt)
    assert stats.sweeps < len(prompts) * NEW_TOKENS / 2        # the requests shared sweeps


def test_mxfp4_experts_are_read_and_held_packed(checkpoints):
    index = CheckpointIndex.open(checkpoints["top4of16-mxfp4"])
    spec = index.spec
    assert spec.expert_format == "mxfp4" and spec.attention_sinks
    h, i = spec.hidden_size, spec.moe_intermediate_size
    layout = index.experts[(1, 5)]
    shapes = {t.local: (t.dtype, t.shape) for t in layout.tensors}
    assert shapes["gate_up_proj_blocks"] == (torch.uint8, (2 * i, h // 32, 16))
    assert shapes["down_proj_scales"] == (torch.uint8, (h, i // 32))
    bias_bytes = (2 * i + h) * 4
    assert layout.payload_bytes == packed_bytes(2 * i, h) + packed_bytes(h, i) + bias_bytes
    # against the same experts in fp32: the weights' bytes shrink by 4.25 bits / 32 bits
    float_layout = CheckpointIndex.open(checkpoints["top4of16-mxfp4"].parent / "top4of16-mxfp4-float").experts[(1, 5)]
    weights = float_layout.payload_bytes - bias_bytes
    assert (layout.payload_bytes - bias_bytes) / weights == pytest.approx(4.25 / 32)

    async def held():
        async with await Engine.open(index.directory, EngineConfig(device="cpu", dtype="float32", profile=HARDWARE,
                                                                    kv_reserve_tokens=64)) as engine:
            return engine.pipeline_statistics().experts
    experts = asyncio.run(held())
    assert experts.cached == len(index.experts)                           # all preloaded, resident
    assert experts.cached_bytes == sum(e.buffer_bytes for e in index.experts.values())   # as read: packed


def test_expert_slices_are_the_stacked_tensors_rows(checkpoints):
    """Expert e's slice of the stacked tensor, read through the index, is row e of the tensor."""
    path = checkpoints["top4of16-mxfp4"]
    tensors = load_file(path / "model.safetensors")
    index = CheckpointIndex.open(path)
    layout = index.experts[(2, 11)]
    with open(layout.ranges[0].path, "rb") as f:
        for t in layout.tensors:
            r = next(r for r in layout.ranges if r.buffer_offset <= t.buffer_offset < r.buffer_offset + r.nbytes)
            f.seek(r.file_offset + t.buffer_offset - r.buffer_offset)
            got = torch.frombuffer(bytearray(f.read(t.nbytes)), dtype=t.dtype).view(t.shape)
            assert torch.equal(got, tensors[f"model.layers.2.mlp.experts.{t.local}"][11]), t.local


def test_quantize_roundtrip_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(8, 96) * torch.logspace(-3, 2, 8)[:, None]
    blocks, scales = quantize(w)
    back = dequantize(blocks, scales, torch.float32)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)     # FP4's coarsest step is 2 x scale
    assert torch.all((back - w).abs() <= step + 1e-12)
    assert torch.equal(dequantize(*quantize(back), torch.float32), back)   # representable values stay exact


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_errors(checkpoints, tmp_path):
    src = checkpoints["top4of16-mxfp4"]
    bad = _copy(src, tmp_path / "method")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quant_method='gptq'"):
        CheckpointIndex.open(bad)

    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    for label, change, error in (("experts", lambda t: t[:-1], ShapeMismatchError),
                                 ("dtype", lambda t: t.float(), CheckpointError)):
        bad = _copy(src, tmp_path / label)
        save_file({**tensors, name: change(tensors[name]).contiguous()}, bad / "model.safetensors")
        with pytest.raises(error, match="down_proj_scales"):
            CheckpointIndex.open(bad)


# ----------------------------------------------------------------------------- the CUDA path
CUDA_HARDWARE = {"device": "cuda", "device_memory_bytes": 2**30, "host_memory_bytes": 2**30, "disk_read_gbps": 2.0,
                 "decode_gbps": 100.0, "prefill_tflops": 10.0, "h2d_gbps": 20.0, "d2h_gbps": 20.0}


def _cuda_config(path: Path, tmp_path: Path, device_memory: int) -> EngineConfig:
    """Every decoder layer streamed through the copy stream, experts read when routed (no cache)."""
    layers = CheckpointIndex.open(path).spec.num_layers
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"version": 1, "hardware": {**CUDA_HARDWARE, "device_memory_bytes": device_memory},
                                   "overrides": {"tiers": {f"layers.0-{layers - 1}": "disk", "embed": "device",
                                                           "head": "device"}}}))
    return EngineConfig(device="cuda", dtype="float32", profile=str(profile), expert_cache_bytes=0,
                        kv_reserve_tokens=256, prefill_chunk_tokens=64, max_num_seqs=4)


async def _run_cuda(path: Path, config: EngineConfig, ops: object):
    async with await Engine.open(path, config, device_ops=ops) as engine:
        logits = await engine.logits(PROMPT)
        out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        return logits.cpu(), list(out.token_ids), engine.pipeline_statistics()


def test_mxfp4_experts_on_the_simulated_cuda_path(checkpoints, oracle, tmp_path):
    """The packed experts cross to the device as uint8 and are dequantized there; layers stream
    through the (simulated, late-landing) copy stream."""
    from tierflow.testing import SimulatedCuda

    path = checkpoints["top4of16-mxfp4"]
    logits, tokens, stats = asyncio.run(_run_cuda(path, _cuda_config(path, tmp_path, 2**30), SimulatedCuda()))
    expected_logits, expected_tokens = oracle("top4of16-mxfp4")
    _check_logits("top4of16-mxfp4", logits, expected_logits)
    assert tokens == expected_tokens
    assert stats.experts.misses > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["top2of8-fp32", "top4of16-mxfp4", "top4of16-mxfp4-bf16"])
def test_matches_transformers_on_cuda(checkpoints, oracle, tmp_path, name):
    path = checkpoints[name]
    config = dataclasses.replace(_cuda_config(path, tmp_path, torch.cuda.mem_get_info()[0]), dtype=_dtype(name))
    logits, tokens, _ = asyncio.run(_run_cuda(path, config, None))
    expected_logits, expected_tokens = oracle(name)
    # the GPU's kernels round differently from the CPU oracle's: the bf16 criteria for both dtypes
    check_logit_rows(logits, expected_logits, tolerance=TOLERANCE["bfloat16"], share=0.9)
    _check_tokens(path, tokens, expected_tokens, exact=False)


@pytest.mark.parametrize("name", ["top2of8-fp32", "top4of16-mxfp4"])
def test_the_probe_times_a_gpt_oss_layer(checkpoints, name):
    """The probe's compute figures run one layer of the family as a dense layer of one expert's form
    (an engine opened without a profile probes the machine first)."""
    from tierflow.engine.planning import layer_benchmark

    index = CheckpointIndex.open(checkpoints[name])
    run = layer_benchmark(index.spec, index.adapter, torch.device("cpu"), torch.float32, cold_bytes=2**20)
    run(1)
    run(16)
