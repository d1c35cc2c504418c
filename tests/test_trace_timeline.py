"""Traces of real engines, checked as Perfetto reads them (``check_trace_file``): every span
source — weights streamed by several reader threads, paged KV read back from disk, routed
experts read on demand, the prefix cache on disk, uploads and the compute stream of the
(simulated) CUDA path — with several requests at once, so spans overlap on their tracks and
must come out on lanes that nest or are disjoint. The checker itself is tested first, on
documents made wrong by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.pipeline.trace import LANE_SEPARATOR, TRACKS, Tracer, check_trace, check_trace_file
from tierflow.testing import SimulatedCuda, build_random_checkpoint, oracle_greedy, streaming_budget

NEW_TOKENS = 4
PARAMS = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
# four requests at once; the longer ones fill 256-token KV blocks that then live on disk
PROMPTS = [[(i * (7 + 6 * k)) % 500 + 1 for i in range(n)] for k, n in enumerate((40, 300, 520, 610))]


def _meta(tid: int, name: str) -> dict:
    return {"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}


def _x(tid: int, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}


# -- the checker -------------------------------------------------------------------------------

def test_the_checker_accepts_nested_touching_and_disjoint_spans_and_balanced_async_slices():
    doc = {"traceEvents": [_meta(1, "a"), _x(1, "outer", 0.0, 10.0), _x(1, "inner", 2.0, 3.0),
                           _x(1, "inner end", 5.0, 5.0), _x(1, "touching", 10.0, 1.0),
                           _x(1, "rounded", 11.0 + 4e-4, 1.0),           # starts a float's rounding early
                           {"ph": "b", "pid": 1, "tid": 1, "cat": "io", "id": 7, "name": "r", "ts": 1.0},
                           {"ph": "b", "pid": 1, "tid": 1, "cat": "io", "id": 8, "name": "r", "ts": 1.5},
                           {"ph": "e", "pid": 1, "tid": 1, "cat": "io", "id": 7, "name": "r", "ts": 4.0},
                           {"ph": "e", "pid": 1, "tid": 1, "cat": "io", "id": 8, "name": "r", "ts": 9.0}]}
    assert check_trace(doc) == []


def test_the_checker_finds_a_span_that_overlaps_its_neighbour_without_nesting():
    doc = {"traceEvents": [_meta(1, "disk: weights"), _x(1, "layers.0", 0.0, 10.0), _x(1, "layers.1", 5.0, 10.0)]}
    (problem,) = check_trace(doc)
    assert "'layers.1'" in problem and "overlaps 'layers.0'" in problem and "'disk: weights'" in problem
    # the same spans on two tracks are fine
    doc["traceEvents"][2]["tid"] = 2
    assert check_trace({"traceEvents": [*doc["traceEvents"], _meta(2, "disk: weights · 2")]}) == []


def test_the_checker_finds_a_declared_track_with_no_span():
    doc = {"traceEvents": [_meta(1, "compute"), _meta(2, "upload"), _x(1, "layers.0", 0.0, 1.0)]}
    assert check_trace(doc) == ["track (1, 2) ('upload') is declared but has no span"]


@pytest.mark.parametrize("event, expected", [
    ({"ph": "X", "pid": 1, "tid": 1, "name": "n", "ts": -1.0, "dur": 1.0}, "ts -1.0 is not a finite"),
    ({"ph": "X", "pid": 1, "tid": 1, "name": "n", "ts": float("nan"), "dur": 1.0}, "ts nan is not a finite"),
    ({"ph": "X", "pid": 1, "tid": 1, "name": "n", "ts": 1.0, "dur": float("inf")}, "dur inf is not a finite"),
    ({"ph": "X", "pid": 1, "tid": 1, "name": "n", "ts": 1.0}, "dur None is not a finite"),
    ({"ph": "X", "pid": "1", "tid": 1, "name": "n", "ts": 1.0, "dur": 1.0}, "pid '1' is not an integer"),
    ({"ph": "Q", "pid": 1, "tid": 1, "name": "n", "ts": 1.0}, "unknown phase 'Q'"),
    ({"ph": "b", "pid": 1, "tid": 1, "cat": "io", "id": 3, "name": "n", "ts": 1.0}, "never closed"),
    ({"ph": "e", "pid": 1, "tid": 1, "cat": "io", "id": 3, "name": "n", "ts": 1.0}, "nothing open to close"),
    ({"ph": "B", "pid": 1, "tid": 1, "name": "n", "ts": 1.0}, "never ends"),
])
def test_the_checker_finds_a_bad_event(event, expected):
    problems = check_trace({"traceEvents": [_meta(1, "t"), _x(1, "ok", 0.0, 0.5), event]})
    assert len(problems) >= 1 and any(expected in p for p in problems), problems


def test_the_checker_reads_files_as_perfetto_does(tmp_path):
    good = {"traceEvents": [_meta(1, "t"), _x(1, "a", 0.0, 1.0)], "otherData": {"list": [1]}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(good))
    assert check_trace_file(path) == []
    path.write_text(json.dumps({"otherData": {"list": [1]}, "traceEvents": good["traceEvents"]}))
    assert any("does not open with its event list" in p for p in check_trace_file(path))
    path.write_text(json.dumps({"traceEvents": [_meta(1, "t"), _x(1, "a", float("nan"), 1.0)]}))
    assert any("not valid JSON" in p for p in check_trace_file(path))      # NaN is not JSON
    path.write_text('{"traceEvents": [')
    assert any("not valid JSON" in p for p in check_trace_file(path))
    assert check_trace({"traceEvents": {}}) == ["expected a traceEvents list, got dict"]
    assert check_trace({"traceEvents": [], "displayTimeUnit": "us"}) == ['displayTimeUnit must be "ms" or "ns", got \'us\'']


# -- the tracer: lanes, and only tracks with spans -------------------------------------------

def test_overlapping_spans_go_on_lanes_and_only_used_tracks_are_declared():
    tracer = Tracer()
    t = tracer._origin
    for i, (start, end) in enumerate([(0, 10), (2, 4), (3, 12), (4, 6), (10, 11), (12, 13)]):
        tracer.span("disk: weights", f"r{i}", t + start * 1e-3, t + end * 1e-3)
    tracer.span("compute", "c", t, t + 0.001)
    tracer.span("compute", "bad", t, float("nan"))                 # not drawable: left out, counted
    tracer.span("upload", "early", t - 0.5, t - 0.4, ratio=float("inf"))   # before the tracer began
    doc = tracer.document()
    assert check_trace(doc) == [] and "displayTimeUnit" not in doc
    assert doc["otherData"]["invalid_spans"] == 1
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert list(names.values()) == ["disk: weights", "disk: weights · 2", "disk: weights · 3", "upload", "compute"]
    lanes: dict[str, list[str]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            lanes.setdefault(names[e["tid"]], []).append(e["name"])
    # at most three reads were in flight at once; a lane takes the first read that finds it free
    assert lanes["disk: weights"] == ["r0", "r4", "r5"]
    assert lanes["disk: weights · 2"] == ["r1", "r3"] and lanes["disk: weights · 3"] == ["r2"]
    (early,) = [e for e in doc["traceEvents"] if e["name"] == "early"]
    assert early["ts"] == 0.0 and early["args"] == {"ratio": "inf"}
    assert json.dumps(doc, allow_nan=False)


def test_recording_is_cheap_on_and_nothing_off():
    import time

    from tierflow.pipeline.trace import NULL_TRACER

    tracer, n = Tracer(), 100_000
    started = time.perf_counter()
    for i in range(n):
        tracer.span("disk: weights", "layers.0", 1.0, 2.0, bytes=i)
    on_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(n):
        NULL_TRACER.span("disk: weights", "layers.0", 1.0, 2.0, bytes=i)
    off_s = time.perf_counter() - started
    assert on_s / n < 20e-6 and off_s / n < 20e-6         # a few hundred ns each; generous for a busy machine
    assert NULL_TRACER.document()["traceEvents"][1:] == []


# -- real engines --------------------------------------------------------------------------------

def _base(name: str) -> str:
    return name.split(LANE_SEPARATOR)[0]


def _run(model: Path, config: EngineConfig, prompts: list[list[int]], ops: object = None) -> tuple[dict, list]:
    async def main():
        async with await Engine.open(model, config, device_ops=ops) as engine:
            outs = await asyncio.gather(*(engine.generate(p, PARAMS) for p in prompts))
            return [list(o.token_ids) for o in outs]
    tokens = asyncio.run(main())
    assert check_trace_file(config.trace_path) == []
    return json.loads(Path(config.trace_path).read_text()), tokens


def _spans(doc: dict) -> dict[str, list[dict]]:
    """Spans by track, the lanes of a track together."""
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    spans: dict[str, list[dict]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            spans.setdefault(_base(names[e["tid"]]), []).append(e)
    return spans


def _streamed(model: Path, **fields) -> EngineConfig:
    config = EngineConfig(device="cpu", dtype="float32", io_threads=4, kv_reserve_tokens=1024,
                          prefill_chunk_tokens=128, max_num_seqs=4, **fields)
    return dataclasses.replace(config, device_memory_bytes=streaming_budget(model, config))


def test_streamed_weights_and_kv_on_disk_with_concurrent_requests(tiny_model, tmp_path):
    (tmp_path / "kv").mkdir()
    config = _streamed(tiny_model, kv_cache_dir=tmp_path / "kv", kv_device_bytes=0, kv_host_bytes=2**16,
                       trace_path=tmp_path / "t.json")
    doc, tokens = _run(tiny_model, config, PROMPTS)
    assert tokens == [oracle_greedy(tiny_model, p, NEW_TOKENS) for p in PROMPTS]
    spans = _spans(doc)
    # a CPU run: no upload, no device compute, no experts, no prefix cache, and none declared
    assert set(spans) == {"sweeps", "disk: weights", "compute", "disk: KV blocks"}
    reads = spans["disk: weights"]
    assert {r["name"] for r in reads} >= {"layer.0", "layer.1", "layer.2"}
    assert all(r["args"]["bytes"] > 0 for r in reads)


def test_experts_read_on_demand(tmp_path):
    model = build_random_checkpoint(tmp_path / "moe", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    config = _streamed(model, expert_cache_bytes=0, trace_path=tmp_path / "t.json")
    doc, tokens = _run(model, config, PROMPTS[:3])
    assert tokens == [oracle_greedy(model, p, NEW_TOKENS) for p in PROMPTS[:3]]
    spans = _spans(doc)
    assert spans["disk: experts"] and spans["disk: weights"]
    assert {"upload", "gpu compute", "prefix cache"}.isdisjoint(spans)


def test_the_prefix_cache_on_disk(tiny_model, tmp_path):
    shared = PROMPTS[3][:512]
    prompts = [shared + [7 + k] * (3 + k) for k in range(4)]
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=2048, max_num_seqs=4,
                          prefix_cache_dir=tmp_path / "prefix", trace_path=tmp_path / "t1.json")
    _run(tiny_model, config, prompts[:1])           # the shared blocks reach the directory
    config = dataclasses.replace(config, trace_path=tmp_path / "t2.json")
    doc, tokens = _run(tiny_model, config, prompts[1:])    # a new engine: reused from disk, three at once
    assert tokens == [oracle_greedy(tiny_model, p, NEW_TOKENS) for p in prompts[1:]]
    reuses = _spans(doc)["prefix cache"]
    assert len(reuses) == 3 and all(r["args"]["tokens"] == 512 for r in reuses)


GPU_HARDWARE = {"device": "cuda", "device_memory_bytes": 2**30, "host_memory_bytes": 2**30, "disk_read_gbps": 2.0,
                "decode_gbps": 100.0, "prefill_tflops": 10.0, "h2d_gbps": 20.0, "d2h_gbps": 20.0}


@pytest.mark.parametrize("tiers", [{"layers.0-2": "disk", "embed": "device", "head": "device"},
                                   {"embed": "host", "layers.0": "host", "layers.1": "disk", "layers.2": "device",
                                    "head": "disk"}], ids=["disk", "mixed"])
def test_the_simulated_cuda_path_with_paged_kv(tiny_model, tmp_path, tiers):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"version": 1, "hardware": GPU_HARDWARE,
                                   "overrides": {"tiers": tiers, "prefetch_depth": 2}}))
    per_token = 2 * 3 * 2 * 16 * 4      # K and V, 3 layers, 2 KV heads, head_dim 16, fp32
    (tmp_path / "kv").mkdir()
    config = EngineConfig(device="cuda", profile=str(profile), kv_reserve_tokens=1024, prefill_chunk_tokens=128,
                          max_num_seqs=4, io_threads=4, kv_cache_dir=tmp_path / "kv", kv_device_bytes=0,
                          kv_host_bytes=per_token * 256, trace_path=tmp_path / "t.json")
    doc, tokens = _run(tiny_model, config, PROMPTS, ops=SimulatedCuda(copy_delay_s=0.002))
    assert tokens == [oracle_greedy(tiny_model, p, NEW_TOKENS) for p in PROMPTS]
    spans = _spans(doc)
    assert {"sweeps", "disk: weights", "upload", "compute", "gpu compute", "disk: KV blocks"} <= set(spans)
    assert set(spans) <= set(TRACKS)
