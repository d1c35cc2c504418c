"""The engine: ``Engine`` (api), the runtime it builds (build), its driver loop (driver) and the
request records, sampling, metrics and planning around them."""

from __future__ import annotations

from tierflow.engine.api import Engine

__all__ = ["Engine"]
