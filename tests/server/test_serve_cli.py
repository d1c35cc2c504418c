"""`tierflow serve` as a user runs it: a process on loopback that the official client talks to,
and a SIGTERM that lets the request in flight finish, refuses new ones, closes the engine (its
KV spill file removed) and exits by itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from tierflow.testing import build_chat_llama
from tests.server.serving import http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_then_closes_the_engine_and_removes_its_files(tmp_path):
    model = build_chat_llama(tmp_path / "m", seed=2)
    spill = tmp_path / "kv"
    port = free_port()
    env = {**os.environ, "TIERFLOW_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "tierflow.cli", "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", "--kv-cache-dir", str(spill), "--kv-device-memory", "0",
                             "--kv-host-memory", "0", "--served-model-name", "m", "--grace", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if http("GET", f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert list(spill.iterdir()), "the KV spill file should exist while serving"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0) \
                .chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Count to nine."}],
                                                max_tokens=48, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True},
                                                stream_options={"include_usage": True})
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices[0].delta.role == "assistant"
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)                       # the request in flight runs to its end
        assert rest[-1].usage.completion_tokens == 48
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err, err
        assert "stopped by signal" in err
        assert list(spill.iterdir()) == [], "the spill file must be removed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_refuses_a_bad_port_and_a_missing_model_without_a_traceback(tmp_path):
    for argv, code in ((["--port", "70000", "--model", str(tmp_path)], 2), (["--model", str(tmp_path / "nope")], 1)):
        done = subprocess.run([sys.executable, "-m", "tierflow.cli", "serve", *argv], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr and "error" in done.stderr.lower()
