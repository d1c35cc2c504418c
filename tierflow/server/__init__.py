"""``tierflow serve``: the OpenAI-compatible HTTP API on the streaming engine (the ``serve``
extra: Starlette on uvicorn, prometheus_client). ``create_app`` builds the ASGI application
around an engine opener; ``make_server`` runs it on uvicorn with a draining shutdown."""

from tierflow.server.app import create_app
from tierflow.server.run import make_server
from tierflow.server.state import ServerConfig

__all__ = ["ServerConfig", "create_app", "make_server"]
