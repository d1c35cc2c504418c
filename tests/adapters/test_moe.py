"""Mixture-of-experts families (Mixtral, Qwen2-MoE with a shared expert and a dense layer,
Qwen3-MoE) against transformers on tiny random checkpoints — with every expert resident,
with experts read on demand and every decoder layer streamed, and with a small expert
cache — plus the statistics that show decode reads only the routed experts, the expert
cache's reuse between tokens, checkpoint errors, and the planner's expert cache."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.errors import CheckpointError, ShapeMismatchError
from tierflow.engine.planning import index_costs
from tierflow.testing import (build_random_checkpoint, check_greedy_tokens, check_logit_rows, oracle_greedy,
                              oracle_logits)
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.plan.costmodel import Workload
from tierflow.tiers.plan.planner import minimum_device_bytes, plan
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides

# name -> (family, builder kwargs)
FAMILIES = {
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe-shared": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                           shared_expert_intermediate_size=80, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    norm_topk_prob=True)),
    "mixtral-bf16": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, dtype="bfloat16")),
}
PROMPT = [(i * 37) % 500 + 1 for i in range(40)]
NEW_TOKENS = 32
SWEEPS = NEW_TOKENS              # one prefill sweep (the 40-token prompt), then one sweep per further token
# fp32 agrees to rounding. bf16 (as for gpt-oss and Qwen3-Next, tests/adapters/test_gpt_oss.py): logits
# against transformers' fp32 run of the same bf16 weights, 90% of the rows within 3e-2, and greedy tokens
# equal to transformers' bf16 run's up to a tie at bf16's precision. bf16 rounding moves a router's logits
# by about 1e-2, and over a prompt's 40 tokens and 3 layers some token's second and third experts are
# nearly always closer than that (0.0003 apart on this checkpoint): which expert such a token gets
# depends on how each implementation's kernels round, on this CPU transformers' bf16 run picks one other
# than its fp32 run (20% off on those rows), so neither bf16 run is the other's oracle, row for row.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}


def _dtype(name: str) -> str:
    return FAMILIES[name][1].get("dtype", "float32")


def _small(name: str, **extra) -> EngineConfig:
    return EngineConfig(device="cpu", dtype=_dtype(name), kv_reserve_tokens=256, prefill_chunk_tokens=64,
                        max_num_seqs=4, profile=HARDWARE, **extra)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: build_random_checkpoint(root / name, family, seed=i, **kw)
            for i, (name, (family, kw)) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="module")
def oracle(checkpoints):
    cache: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def get(name: str) -> tuple[torch.Tensor, list[int]]:
        if name not in cache:
            path, dtype = checkpoints[name], _dtype(name)
            cache[name] = oracle_logits(path, PROMPT, "float32"), oracle_greedy(path, PROMPT, NEW_TOKENS, dtype)
        return cache[name]

    return get


def _relative_error(logits: torch.Tensor, expected: torch.Tensor) -> float:
    return ((logits - expected).abs().max() / expected.abs().max()).item()


def _expert_size(index: CheckpointIndex) -> int:
    """One expert's read; the test checkpoints' experts all have the same aligned size."""
    sizes = {layout.buffer_bytes for layout in index.experts.values()}
    assert len(sizes) == 1, sizes
    return sizes.pop()


def _disk_bytes(layout) -> int:
    """What reading ``layout`` delivers: its aligned ranges, cut at the end of the file."""
    return sum(min(r.nbytes, os.path.getsize(r.path) - r.file_offset) for r in layout.ranges)


async def _settle(engine: Engine) -> None:
    """Wait until the weight stream's read-ahead is full and no read is in flight, so two
    snapshots taken between sweeps differ by whole sweeps of streamed units."""
    last = None
    for _ in range(500):
        stream = engine._runtime.stream.statistics() if engine._runtime.stream else None
        now = (stream.units_read if stream else 0, stream.units_consumed if stream else 0,
               engine._runtime.reader.statistics().bytes_read)
        full = stream is None or now[0] - now[1] == engine.plan.num_slots
        if full and now == last:
            return
        last = now
        await asyncio.sleep(0.01)
    raise AssertionError(f"the weight stream did not settle: {now}")


class _Recorder:
    """Records, per expert request of the engine's expert stage, (sweep, layer, experts asked,
    hits), and per disk read of an expert, (sweep, layer, expert)."""

    def __init__(self, engine: Engine) -> None:
        self.requests: list[tuple[int, int, tuple[int, ...], int]] = []
        self.reads: list[tuple[int, int, int]] = []
        names = {layout.name: key for key, layout in engine.index.experts.items()}
        stage, reader, runner = engine._runtime.experts, engine._runtime.reader, engine._runtime.runner
        get, read = stage.get, reader.read

        async def recorded_get(layer, experts):
            hits = stage.statistics().hits
            result = await get(layer, experts)
            self.requests.append((runner.num_sweeps, layer, tuple(experts), stage.statistics().hits - hits))
            return result

        async def recorded_read(layout, buffer):
            if layout.name in names:
                self.reads.append((runner.num_sweeps, *names[layout.name]))
            return await read(layout, buffer)

        stage.get, reader.read = recorded_get, recorded_read


async def _run(path, config, record: bool = False):
    async with await Engine.open(path, config) as engine:
        recorder = _Recorder(engine) if record else None
        await _settle(engine)
        opened = engine.stats()
        logits = await engine.logits(PROMPT)
        await _settle(engine)
        before = engine.stats()
        stream_before = engine._runtime.stream.statistics() if engine._runtime.stream else None
        out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        await _settle(engine)
        after = engine.stats()
        stream_after = engine._runtime.stream.statistics() if engine._runtime.stream else None
        stage = engine._runtime.experts
        parts = {layer: list(part) for layer, part in stage._cache.items()} if stage else None
        ahead = set(stage._ahead) if stage else None      # read ahead, not yet asked for
        return dict(parts=parts, ahead=ahead, engine=engine, logits=logits, tokens=list(out.token_ids), opened=opened, before=before,
                    after=after, stream=(stream_before, stream_after), recorder=recorder,
                    experts=engine.pipeline_statistics().experts)


def _config(path: Path, name: str, placement: str) -> EngineConfig:
    if placement == "resident":
        return _small(name)
    if placement == "streamed":     # every decoder layer pinned to disk, no expert kept between layers
        layers = CheckpointIndex.open(path).spec.num_layers
        streamed = {**HARDWARE, "overrides": {"tiers": {f"layers.0-{layers - 1}": "disk"}}}
        return dataclasses.replace(_small(name, expert_cache_bytes=0), profile=streamed)
    assert placement == "small-cache"
    return _small(name, expert_cache_bytes=3 * _expert_size(CheckpointIndex.open(path)))


@pytest.mark.parametrize("placement", ["resident", "streamed", "small-cache"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_matches_transformers(checkpoints, oracle, name, placement):
    path = checkpoints[name]
    r = asyncio.run(_run(path, _config(path, name, placement), record=True))
    engine, before, after, experts = r["engine"], r["before"], r["after"], r["experts"]

    expected_logits, expected_tokens = oracle(name)
    exact = _dtype(name) == "float32"
    if exact:
        rel = _relative_error(r["logits"], expected_logits)
        assert rel <= TOLERANCE["float32"], f"relative logit error {rel:.2e}"
    else:
        check_logit_rows(r["logits"], expected_logits, tolerance=TOLERANCE["bfloat16"], share=0.9)
    check_greedy_tokens(path, PROMPT, r["tokens"], expected_tokens, exact=exact, tolerance=TOLERANCE["bfloat16"],
                        min_shared=NEW_TOKENS // 4)
    assert len(set(r["tokens"])) > 1

    index = engine.index
    size, every = _expert_size(index), len(index.experts)
    assert every == len(engine.spec.moe_layers) * engine.spec.num_experts
    assert after.expert_requests > before.expert_requests > 0
    assert after.expert_hits + experts.misses == after.expert_requests
    preloaded = every if placement == "resident" else 0
    # every expert read is a preload, a miss or a read-ahead (a read-ahead later asked for is a hit)
    assert after.expert_bytes_read == experts.bytes_read == (experts.misses + experts.prefetched + preloaded) * size
    assert len(r["recorder"].reads) == experts.misses + experts.prefetched     # the sweeps' expert reads
    moe = engine.spec.moe_layers
    if placement == "resident":
        assert set(engine.plan.tiers) == {"device"}
        assert engine.plan.expert_cache_bytes >= every * size
        assert r["opened"].expert_bytes_read == every * size       # preloaded when the engine opened
        assert after.expert_bytes_read == r["opened"].expert_bytes_read   # nothing read by any sweep
        assert after.expert_hit_rate == 1.0 and experts.misses == 0
        assert experts.prefetched == 0 and r["recorder"].reads == []
    elif placement == "streamed":
        assert set(engine.plan.tiers[1:-1]) == {"disk"}, engine.plan.tiers
        assert experts.capacity_bytes == 0 and after.expert_hits == 0
        assert after.bytes_streamed > before.bytes_streamed
        assert experts.cached == 0
        assert experts.prefetched == 0                                    # no cache: no read-ahead
    else:
        assert experts.capacity_bytes == 3 * size
        # 3 experts split in whole experts over the MoE layers, the first layers one more
        counts = [3 // len(moe) + (i < 3 % len(moe)) for i in range(len(moe))]
        ahead, parts = r["ahead"], r["parts"]
        # each layer's part is full; beyond them only what the last layer read ahead for the first,
        # held until the next sweep's first MoE layer is done with it
        assert {layer for layer, _ in ahead} <= {moe[0]}
        assert [len([e for e in parts[layer] if (layer, e) not in ahead]) for layer in moe] == counts
        assert experts.cached == 3 + len(ahead) and experts.cached_bytes == (3 + len(ahead)) * size
        assert len(ahead) <= engine.spec.experts_per_token
        # decode tokens route alike often enough for reading ahead to pay
        assert experts.prefetched > 0 and 0 < experts.prefetch_used <= min(experts.prefetched, experts.hits)
        assert 0 < after.expert_bytes_read - before.expert_bytes_read < SWEEPS * every * size


def test_qwen2_moe_dense_layer_has_no_experts(checkpoints):
    index = CheckpointIndex.open(checkpoints["qwen2_moe-shared"])
    assert index.spec.moe_layers == (0, 2)
    assert {layer for layer, _ in index.experts} == {0, 2}
    assert "shared_gate_proj" in {t.local for t in index.units[1].tensors}           # layer 0 (unit 1)
    assert {t.local for t in index.units[2].tensors} >= {"gate_proj", "up_proj", "down_proj"}   # layer 1: dense


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe-shared"])
def test_decode_reads_only_the_routed_experts(checkpoints, oracle, name):
    path = checkpoints[name]
    base = _config(path, name, "streamed")
    routed = asyncio.run(_run(path, base, record=True))
    everything = asyncio.run(_run(path, EngineConfig(**{**_fields(base), "expert_reads": "all"}), record=True))

    tokens = oracle(name)[1]
    assert routed["tokens"] == everything["tokens"] == tokens
    engine = routed["engine"]
    spec, index = engine.spec, engine.index
    moe, k, experts_per_layer = spec.moe_layers, spec.experts_per_token, spec.num_experts
    assert k < experts_per_layer
    size = _expert_size(index)
    sweep_bytes = sum(_disk_bytes(index.units[u]) for u in engine.plan.streamed)
    every_expert_bytes = sum(_disk_bytes(layout) for layout in index.experts.values())
    assert every_expert_bytes == len(index.experts) * size

    for run, mode in ((routed, "routed"), (everything, "all")):
        before, after = run["before"], run["after"]
        (s0, s1), rec = run["stream"], run["recorder"]
        assert after.sweeps - before.sweeps == SWEEPS and after.decode_sweeps - before.decode_sweeps == SWEEPS - 1
        assert s1.units_consumed - s0.units_consumed == SWEEPS * len(engine.plan.streamed)
        streamed = after.bytes_streamed - before.bytes_streamed
        expert_bytes = after.expert_bytes_read - before.expert_bytes_read
        assert streamed == SWEEPS * sweep_bytes
        assert after.bytes_read_from_disk - before.bytes_read_from_disk == streamed + expert_bytes
        assert after.expert_hits == 0                              # no cache: every expert is read
        assert run["experts"].prefetched == 0                      # ... when picked, never ahead
        window = [(sweep, layer, e) for sweep, layer, e in rec.reads if sweep > before.sweeps]
        assert expert_bytes == len(window) * size
        requests = after.expert_requests - before.expert_requests
        assert requests == len(window)
        for sweep in range(before.sweeps + 1, after.sweeps + 1):
            for layer in range(spec.num_layers):
                read = [e for s, l, e in window if s == sweep and l == layer]
                assert len(read) == len(set(read))
                if layer not in moe:
                    assert read == []
                elif mode == "all":
                    assert sorted(read) == list(range(experts_per_layer))
                elif sweep > before.sweeps + 1:           # a decode token: at most its k experts
                    asked = [a for s, l, a, _ in rec.requests if s == sweep and l == layer]
                    assert len(asked) == 1 and sorted(read) == sorted(asked[0])
                    assert 1 <= len(read) <= k
                else:
                    assert 1 <= len(read) <= experts_per_layer
        if mode == "all":
            assert expert_bytes == SWEEPS * every_expert_bytes
            assert requests == SWEEPS * len(moe) * experts_per_layer
        else:
            decode = [w for w in window if w[0] > before.sweeps + 1]
            assert len(decode) <= (SWEEPS - 1) * len(moe) * k < (SWEEPS - 1) * len(moe) * experts_per_layer
    assert routed["after"].expert_bytes_read - routed["before"].expert_bytes_read < \
        everything["after"].expert_bytes_read - everything["before"].expert_bytes_read


def _fields(config: EngineConfig) -> dict:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}


def test_cache_of_one_tokens_experts_serves_the_next_token(checkpoints, oracle):
    """With room for exactly one token's experts (k per MoE layer), from the second decode
    token on, a layer finds every expert the previous token also used in that layer."""
    name = "qwen3_moe"
    path = checkpoints[name]
    probe = CheckpointIndex.open(path)
    capacity = len(probe.spec.moe_layers) * probe.spec.experts_per_token * _expert_size(probe)
    r = asyncio.run(_run(path, _small(name, expert_cache_bytes=capacity), record=True))
    assert r["tokens"] == oracle(name)[1]
    before, stats, rec = r["before"], r["experts"], r["recorder"]
    first_decode = before.sweeps + 2
    by_sweep = {(s, layer): (set(asked), hits) for s, layer, asked, hits in rec.requests}
    found = 0
    for (sweep, layer), (asked, hits) in by_sweep.items():
        if sweep > first_decode:
            previous, _ = by_sweep[(sweep - 1, layer)]
            assert hits == len(asked & previous), (sweep, layer, asked, previous)
            found += hits
    assert found > 0
    # each layer keeps the previous token's experts: from the second decode token on nothing is
    # read ahead, and what is read is exactly the experts a layer did not find
    later = [read for read in rec.reads if read[0] > first_decode]
    assert len(later) == sum(len(asked) - hits for (sweep, _), (asked, hits) in by_sweep.items()
                             if sweep > first_decode) > 0
    assert stats.cached_bytes <= capacity and not r["ahead"]
    assert stats.prefetch_used <= stats.prefetched and stats.prefetch_used <= stats.hits
    assert stats.hits + stats.misses == stats.requests
    assert stats.bytes_read == (stats.misses + stats.prefetched) * _expert_size(probe) == len(rec.reads) * \
        _expert_size(probe)


# ----------------------------------------------------------------------------- checkpoint errors
def _edited(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    shutil.copyfile(source / "config.json", target / "config.json")
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


MIXTRAL_EXPERT = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"


def _drop(*names):
    def edit(tensors):
        for n in names:
            del tensors[n]
    return edit


def _set(name, shape):
    def edit(tensors):
        tensors[name] = torch.randn(shape)
    return edit


@pytest.mark.parametrize("name,edit,error,message", [
    ("mixtral", _drop(MIXTRAL_EXPERT.format(2, 1, "w3")), CheckpointError,
     r"unit layer\.2\.expert\.1 lacks tensor\(s\) \['up_proj'\]"),
    ("mixtral", _drop(*(MIXTRAL_EXPERT.format(0, 3, w) for w in ("w1", "w2", "w3"))), CheckpointError,
     r"unit layer\.0\.expert\.3 lacks tensor\(s\) \['down_proj', 'gate_proj', 'up_proj'\]"),
    ("mixtral", _set(MIXTRAL_EXPERT.format(0, 4, "w1"), (128, 64)), ShapeMismatchError,
     r"names expert 4 of layer 0, which config\.json does not have \(4 experts"),
    ("mixtral", _set(MIXTRAL_EXPERT.format(1, 2, "w2"), (64, 96)), ShapeMismatchError,
     r"experts\.2\.w2\.weight' has shape \[64, 96\], config\.json implies \[64, 128\]"),
    ("qwen2_moe-shared", _set("model.layers.1.mlp.experts.0.gate_proj.weight", (48, 64)), ShapeMismatchError,
     r"names expert 0 of layer 1, which config\.json does not have \(4 experts in layers \[0, 2\]\)"),
    ("qwen3_moe", _drop("model.layers.1.mlp.gate.weight"), CheckpointError,
     r"unit layer\.1 lacks tensor\(s\) \['router'\]"),
])
def test_checkpoint_errors_name_the_expert(checkpoints, tmp_path, name, edit, error, message):
    path = _edited(checkpoints[name], tmp_path / "edited", edit)
    with pytest.raises(error, match=message):
        CheckpointIndex.open(path)


# ----------------------------------------------------------------------------- planner
CPU = HardwareProfile(device="cpu", device_memory_bytes=2**40, host_memory_bytes=2**40, disk_read_gbps=2.0,
                      decode_gbps=50.0, prefill_tflops=1.0)


def test_planner_gives_experts_the_memory_the_dense_part_leaves(checkpoints):
    index = CheckpointIndex.open(checkpoints["qwen3_moe"])
    costs = index_costs(index, torch.float32)
    every = costs.experts.all_resident_bytes
    assert every == sum(layout.buffer_bytes for layout in index.experts.values())
    work = Workload(context_tokens=256, new_tokens=64)
    budget = lambda b: Overrides(device_memory_bytes=b, prefill_chunk_tokens=64)   # noqa: E731

    full = plan(costs, CPU, work, budget(2**34))
    assert full.expert_cache_bytes == every and set(full.tiers) == {"device"}
    dense_only = full.predicted.peak_device_bytes - every
    least = minimum_device_bytes(costs, CPU, work, budget(None))
    assert least < dense_only

    budgets = [least, (least + dense_only) // 2] + [dense_only + every * f // 8 for f in (1, 3, 5, 7)] + \
        [dense_only + every]
    plans = [plan(costs, CPU, work, budget(b)) for b in budgets]
    disk = [p.predicted.decode.disk_s * CPU.disk_read_gbps * 1e9 for p in plans]
    for b, p in zip(budgets, plans):
        assert p.predicted.peak_device_bytes <= b
    for p in plans[2:-1]:                        # every dense unit resident, some experts cached
        assert set(p.tiers) == {"device"}
        assert 0 < p.expert_cache_bytes < every
    assert plans[-1].expert_cache_bytes == every and disk[-1] == 0
    caches = [p.expert_cache_bytes for p in plans]
    assert caches[2:] == sorted(caches[2:]) and len(set(caches[2:])) == len(caches[2:])
    assert all(a > b for a, b in zip(disk, disk[1:])), disk   # more memory, fewer bytes read per token
