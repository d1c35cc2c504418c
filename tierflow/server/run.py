"""Running the application on uvicorn, with a shutdown that loses nothing.

SIGTERM (or Ctrl-C) first marks the server as draining — new completion requests get 503 and
``/health`` turns 503, so a load balancer stops sending — and uvicorn stops accepting
connections; requests in flight finish within ``grace_s`` (past it their connections are closed,
which cancels their engine requests); then the lifespan closes the engine, which removes its files
(the KV spill file). The engine opens before the port does, so a client that can connect is
served at once.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
from types import FrameType
from typing import Awaitable, Callable

import uvicorn

from tierflow.engine.api import Engine
from tierflow.server.app import create_app
from tierflow.server.state import ServerConfig, State

log = logging.getLogger("tierflow.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also tells the application it is draining when told to exit."""

    def __init__(self, config: uvicorn.Config, state: State) -> None:
        super().__init__(config)
        self.state = state
        self.signal: int | None = None      # the signal that stopped it (None: stopped otherwise)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.draining:
            log.info("shutting down: refusing new requests, letting %d in flight finish", self.state.live)
        self.state.draining = True
        self.signal = self.signal or sig
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down (killing the process on SIGTERM);
        # the caller decides the exit status instead, from ``signal``
        self._captured_signals.clear()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(open_engine: Callable[[], Awaitable[Engine]], config: ServerConfig, *, host: str = "127.0.0.1",
                port: int = 8000, grace_s: float = 30.0, log_level: str = "info",
                access_log: bool = False) -> DrainingServer:
    """A server for ``open_engine``'s engine; ``await server.serve()`` (or ``server.run()``)
    runs it until SIGTERM / Ctrl-C or ``server.should_exit = True``."""
    app = create_app(open_engine, config)
    fast_loop = importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    uv = uvicorn.Config(app, host=host, port=port, loop="uvloop" if fast_loop else "asyncio",
                        http="httptools" if fast_http else "h11", lifespan="on", log_level=log_level,
                        access_log=access_log, timeout_graceful_shutdown=grace_s)
    return DrainingServer(uv, app.state.tierflow)
