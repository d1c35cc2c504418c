"""What the server's routes share: the frozen ``ServerConfig`` and the mutable ``State`` (the
engine, the metrics, the count of live requests). It is its own module so that the request
checks, the completion call, the metrics and the uvicorn runner read it without importing the
application."""

from __future__ import annotations

from dataclasses import dataclass

from tierflow.engine.api import Engine
from tierflow.errors import ConfigError
from tierflow.server.metrics import ServerMetrics


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """served_model_name: the model id clients send and ``/v1/models`` lists. api_key: when set,
    every ``/v1`` request needs ``Authorization: Bearer <key>``. max_queue: requests that may
    wait beyond the ``max_num_seqs`` the engine runs at once (more get 429). max_body_bytes:
    the largest request body (413 past it). default_max_tokens: the generation limit of a chat
    request that sets neither ``max_tokens`` nor ``max_completion_tokens``."""

    served_model_name: str
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 2**20
    default_max_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ConfigError("the served model name must not be empty")
        for name in ("max_queue", "max_body_bytes", "default_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                raise ConfigError(f"ServerConfig.{name} must be a positive int, got {value!r}")


class State:
    """What the routes share: the engine, the metrics, the count of live requests."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.metrics = ServerMetrics(self)
        self.live = 0
        self.draining = False

    def queue_length(self) -> int:
        if self.engine is None:
            return 0
        return max(0, self.live - self.engine.config.max_num_seqs)
