"""A ``tierflow serve`` application on uvicorn in a background thread, for tests: the engine is
opened in the server's own loop, as the CLI does; the test talks to it over loopback HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tierflow import Engine, EngineConfig
from tierflow.server import ServerConfig, make_server
from tierflow.server.state import State


class RunningServer:
    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread
        self.state: State = server.state
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.loop: asyncio.AbstractEventLoop = server.loop

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run ``coro`` in the server's loop (where its engine lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def in_loop(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return self.call(run())



@contextmanager
def serving(model: Path, engine_config: EngineConfig, **server_config: Any) -> Iterator[RunningServer]:
    server_config.setdefault("served_model_name", "tiny")
    server = make_server(lambda: Engine.open(model, engine_config), ServerConfig(**server_config), port=0,
                         grace_s=5.0, log_level="warning")
    failure: list[BaseException] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        server.loop = loop
        try:
            loop.run_until_complete(server.serve())
        except BaseException as exc:    # reported by the waiting test
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if failure or not thread.is_alive():
            raise RuntimeError(f"the server did not start: {failure}")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start within 120 s")
        time.sleep(0.02)
    running = RunningServer(server, thread)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not shut down"
        assert not failure, failure


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        import json
        return json.loads(self.content)


def http(method: str, url: str, *, body: bytes | None = None, json_body: Any = None,
         headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
    """One plain HTTP request (no client library in between: bodies go as they are)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                           headers=headers)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
