"""The ``tierflow`` command: ``run``, ``plan``, ``probe`` and ``sync`` (see ``main``)."""

from __future__ import annotations

from tierflow.cli.main import main

__all__ = ["main"]
