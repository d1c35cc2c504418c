"""The pipeline timeline: spans per stage written as a Chrome-trace JSON file."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tierflow import ConfigError, Engine, EngineConfig, SamplingParams
from tierflow.pipeline import trace as trace_module
from tierflow.pipeline.trace import LANE_SEPARATOR, NULL_TRACER, Tracer, check_trace, check_trace_file
from tierflow.testing import streaming_budget


def _tracks(doc: dict) -> dict[str, list[dict]]:
    """Spans by track, the lanes of a track ("disk: weights · 2") together."""
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    spans: dict[str, list[dict]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            spans.setdefault(names[e["tid"]].split(LANE_SEPARATOR)[0], []).append(e)
    return spans


def test_spans_become_complete_events_on_named_tracks(tmp_path):
    tracer = Tracer()
    t0 = time.perf_counter()
    tracer.span("compute", "layer.0", t0, t0 + 0.002, tokens=3)
    with tracer.timed("disk: weights", "layer.1"):
        time.sleep(0.001)
    path = tracer.write(tmp_path / "t.json")
    doc = json.loads(path.read_text())
    spans = _tracks(doc)
    (compute,) = spans["compute"]
    assert compute["name"] == "layer.0" and compute["args"] == {"tokens": 3}
    assert compute["dur"] == pytest.approx(2000, abs=1) and compute["ts"] >= 0
    (read,) = spans["disk: weights"]
    assert read["dur"] >= 1000 and read["ts"] > compute["ts"]
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]      # no temporary left behind
    assert check_trace_file(path) == []
    # only the two tracks with spans are named; no displayTimeUnit (some Perfetto versions
    # take it for the unit of "ts")
    assert [e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"] == ["disk: weights", "compute"]
    assert "displayTimeUnit" not in doc


def test_the_null_tracer_records_nothing():
    NULL_TRACER.span("compute", "x", 0.0, 1.0)
    with NULL_TRACER.timed("compute", "y"):
        pass
    assert _tracks(NULL_TRACER.document()) == {} and not NULL_TRACER.enabled
    assert check_trace(NULL_TRACER.document()) == []


def test_a_long_run_keeps_the_newest_events_and_says_how_many_it_dropped(monkeypatch):
    monkeypatch.setattr(trace_module, "MAX_EVENTS", 10)
    tracer = Tracer()
    for i in range(25):
        tracer.span("compute", f"u{i}", float(i), i + 0.5)
    doc = tracer.document()
    names = [e["name"] for e in _tracks(doc)["compute"]]
    assert names[-1] == "u24" and len(names) <= 10
    assert doc["otherData"]["dropped_events"] == 25 - len(names)


def test_an_engine_writes_every_stage_of_its_run(tiny_model, tmp_path):
    path = tmp_path / "run.json"
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=1024, prefill_chunk_tokens=256,
                          kv_cache_dir=tmp_path / "kv", kv_device_bytes=0, kv_host_bytes=0, trace_path=path)
    config = EngineConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                             "device_memory_bytes": streaming_budget(tiny_model, config)})
    prompt = [(i * 13) % 500 + 1 for i in range(600)]

    async def main():
        async with await Engine.open(tiny_model, config) as engine:
            await engine.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
            return engine.stats(), engine.plan, engine.spec
    stats, plan, spec = asyncio.run(main())

    assert check_trace_file(path) == []
    spans = _tracks(json.loads(path.read_text()))
    assert set(spans) == {"sweeps", "compute", "disk: weights", "disk: KV blocks"}      # a CPU run's tracks
    assert len(spans["sweeps"]) == stats.sweeps
    assert len(spans["compute"]) == stats.sweeps * spec.num_units                 # every unit of every sweep
    streamed = [spec.unit_name(u) for u in plan.streamed]
    reads = spans["disk: weights"]
    assert {r["name"] for r in reads} == set(streamed) and all(r["args"]["bytes"] > 0 for r in reads)
    assert spans["disk: KV blocks"]                                              # 600 tokens: 2 blocks per layer on disk
    # reads run ahead: unit k's read starts before the compute of the unit before it has ended
    computes = spans["compute"]
    ahead = 0
    for read in reads:
        name = read["name"]
        before = spec.unit_name(next(u for u in range(spec.num_units) if spec.unit_name(u) == name) - 1)
        ends = [c["ts"] + c["dur"] for c in computes if c["name"] == before and c["ts"] + c["dur"] > read["ts"]]
        ahead += bool(ends)
    assert ahead >= len(reads) // 2, (ahead, len(reads))


def test_a_trace_path_in_a_missing_directory_fails_at_open(tiny_model, tmp_path):
    config = EngineConfig(device="cpu", trace_path=tmp_path / "missing" / "t.json")
    with pytest.raises(ConfigError, match="trace_path"):
        asyncio.run(Engine.open(tiny_model, config))


def test_the_cli_writes_a_trace(tmp_path, capsys):
    from tierflow.cli.main import main

    path = tmp_path / "cli.json"      # the demo model (it has a tokenizer)
    assert main(["run", "Hello", "--max-new-tokens", "3", "--device", "cpu", "--trace", str(path)]) == 0
    assert _tracks(json.loads(path.read_text()))["compute"] and check_trace_file(path) == []
    assert str(path) in capsys.readouterr().err.replace("\n", "")      # the summary goes to stderr
