"""Bad directories and paths are named errors: a kv_cache_dir / prefix_cache_dir that is a file,
lies under one, is a whole missing tree or takes no files, and a trace_path that is a directory,
are ConfigErrors at Engine.open that leave nothing behind; a read-only TIERFLOW_CACHE_DIR costs
the probe its cache (with a warning) and stops the demo conversion with a named error; a disk that
fills while the spill file grows fails the request, and the engine goes on."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tierflow import ConfigError, Engine, EngineConfig, SamplingParams, TierCapacityError
from tierflow.tiers.io import spill as spill_mod
from tierflow.testing import oracle_greedy

HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}
BASE = dict(device="cpu", dtype="float32", profile=HARDWARE, kv_reserve_tokens=2048, prefill_chunk_tokens=256)


def _open(model, **kw):
    async def main():
        async with await Engine.open(model, EngineConfig(**BASE, **kw)):
            pass
    asyncio.run(main())


@pytest.mark.parametrize("field", ["kv_cache_dir", "prefix_cache_dir"])
@pytest.mark.parametrize("case,phrase", [("a file", "is a file"), ("under a file", "lies under"),
                                         ("missing tree", "nor does its parent")])
def test_a_bad_directory_is_a_config_error_naming_the_field(tiny_model, tmp_path, field, case, phrase):
    afile = tmp_path / "afile"
    afile.write_text("x")
    path = {"a file": afile, "under a file": afile / "sub", "missing tree": tmp_path / "typo" / "path"}[case]
    extra = dict(kv_device_bytes=0, kv_host_bytes=0) if field == "kv_cache_dir" else {}
    with pytest.raises(ConfigError, match=phrase) as info:
        _open(tiny_model, **{field: path}, **extra)
    assert f"EngineConfig.{field}" in str(info.value) and str(path) in str(info.value)
    assert info.value.settings == (field,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]      # no tree made


def test_a_missing_last_directory_is_made_and_a_failed_open_removes_it(tiny_model, tmp_path, monkeypatch):
    kv, prefix = tmp_path / "kv", tmp_path / "prefix"
    from tierflow.engine import build

    async def broken(*args, **kwargs):
        raise RuntimeError("injected after the KV store and prefix cache were made")

    monkeypatch.setattr(build, "start_host", broken)
    with pytest.raises(RuntimeError, match="injected"):
        _open(tiny_model, kv_cache_dir=kv, kv_device_bytes=0, kv_host_bytes=0, prefix_cache_dir=prefix)
    assert list(tmp_path.iterdir()) == []                               # no directory, no spill file
    monkeypatch.undo()
    _open(tiny_model, kv_cache_dir=kv, kv_device_bytes=0, kv_host_bytes=0, prefix_cache_dir=prefix)
    assert kv.is_dir() and list(kv.iterdir()) == [] and prefix.is_dir()


def test_a_trace_path_that_is_a_directory_is_a_config_error_at_open(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        _open(tiny_model, trace_path=tmp_path)
    assert info.value.settings == ("trace_path",)
    with pytest.raises(ConfigError, match="does not exist"):
        _open(tiny_model, trace_path=tmp_path / "missing" / "trace.json")


def test_a_disk_that_fills_while_the_spill_file_grows_fails_the_request_and_the_engine_goes_on(
        tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(spill_mod, "EXTENT_BYTES", 4096)     # every new slot grows the file
    prompt = [(i * 37) % 500 + 1 for i in range(600)]
    expected = oracle_greedy(tiny_model, prompt[:300], 6)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main():
        config = EngineConfig(**BASE, kv_cache_dir=tmp_path, kv_device_bytes=0, kv_host_bytes=0)
        async with await Engine.open(tiny_model, config) as engine:
            monkeypatch.setattr(os, "posix_fallocate", full)
            try:
                await engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
                failure = None
            except TierCapacityError as exc:
                failure = exc
            monkeypatch.setattr(os, "posix_fallocate", real)
            after = await engine.generate(prompt[:300], SamplingParams(max_new_tokens=6, ignore_eos=True))
            return failure, list(after.token_ids)

    real = os.posix_fallocate
    failure, tokens = asyncio.run(asyncio.wait_for(main(), 120))
    assert failure is not None and "the disk is full" in str(failure) and "kv_disk_bytes" in str(failure)
    assert failure.settings == ("kv_disk_bytes", "kv_cache_dir")
    assert tokens == expected
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- read-only, for real
@pytest.fixture
def shared_dir():
    """A directory others may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tierflow-ro-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def _unprivileged(code: str, **env: str) -> dict:
    """Run ``code`` (which sets ``result``) after dropping to nobody when root; the directories
    the test made read-only (0o555) are then read-only to it. Skips when that cannot be seen."""
    script = textwrap.dedent("""
        import json, os, sys, tempfile
        import tierflow, tierflow.engine.api, tierflow.convert.demo, tierflow.tiers.probe.probe
        probe_dir = sys.argv[1]
        if os.getuid() == 0:
            try:
                os.setgroups([]); os.setgid(65534); os.setuid(65534)
            except OSError as exc:
                print(json.dumps({"skip": f"cannot drop privileges: {exc}"})); sys.exit()
        try:
            tempfile.mkstemp(dir=probe_dir)
            print(json.dumps({"skip": "a read-only directory takes files here"})); sys.exit()
        except OSError:
            pass
    """) + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    ro = env.pop("probe_dir")
    out = subprocess.run([sys.executable, "-c", script, ro], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HOME": ro, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result | {"stderr": out.stderr}


def test_a_read_only_kv_cache_dir_is_a_config_error(shared_dir):
    ro = shared_dir / "ro"
    ro.mkdir(mode=0o555)
    ro.chmod(0o555)
    result = _unprivileged(f"""
        import asyncio
        from tierflow import Engine, EngineConfig, ConfigError
        try:
            asyncio.run(Engine.open("/nonexistent-model", EngineConfig(device="cpu", kv_cache_dir={str(ro)!r})))
            result = {{"error": None}}
        except ConfigError as exc:
            result = {{"error": str(exc)}}
    """, probe_dir=str(ro))
    assert result["error"] and "EngineConfig.kv_cache_dir" in result["error"] and "cannot create files" in \
        result["error"]


def test_read_only_cache_and_model_dirs_the_probe_warns_and_measures_elsewhere(shared_dir):
    model, cache = shared_dir / "model", shared_dir / "cache"
    for d in (model, cache):
        d.mkdir()
        d.chmod(0o555)
    result = _unprivileged(f"""
        import asyncio, functools, torch
        from pathlib import Path
        from tierflow.adapters import adapter_for
        from tierflow.tiers.plan.costmodel import costs_from_spec
        from tierflow.tiers.probe import probe as p
        from tierflow.tiers.probe.cache import default_cache
        config = {{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
                  "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 16, "intermediate_size": 128, "vocab_size": 512}}
        adapter = adapter_for(config)
        costs = costs_from_spec(adapter.spec_from_config(config), adapter, "float32", name="tiny")
        p.measure_disk = functools.partial(p.measure_disk, file_bytes=8 << 20, seconds=0.1)
        hw, prov = asyncio.run(p.probe(torch.device("cpu"), torch.float32, costs, {str(model)!r},
                                       cache=default_cache()))
        result = {{"gbps": hw.disk_read_gbps, "dir": prov["disk"]["directory"]}}
    """, probe_dir=str(model), TIERFLOW_CACHE_DIR=str(cache))
    assert result["gbps"] > 0 and result["dir"] == tempfile.gettempdir()
    assert result["stderr"].count("cannot write the probe cache") == 1
    assert list(cache.iterdir()) == [] and list(model.iterdir()) == []


def test_a_read_only_cache_stops_the_demo_conversion_with_a_named_error(shared_dir):
    gguf = shared_dir / "demo.gguf"
    gguf.write_bytes(b"GGUF" + bytes(4096))
    cache = shared_dir / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    result = _unprivileged(f"""
        from pathlib import Path
        from tierflow.convert import demo
        from tierflow.errors import CheckpointError
        demo.find_demo_gguf = lambda: Path({str(gguf)!r})
        def convert(src, out_dir, **kw):
            out_dir.mkdir()
        demo.convert_gguf = convert
        try:
            demo.demo_model_dir(progress=False)
            result = {{"error": None}}
        except CheckpointError as exc:
            result = {{"error": str(exc)}}
    """, probe_dir=str(cache), TIERFLOW_CACHE_DIR=str(cache))
    assert result["error"] and "set TIERFLOW_CACHE_DIR to a writable directory" in result["error"]
